"""Sparse mixture of experts (Mixtral): each token runs through only K of the E expert FFNs."""
import torch
import torch.nn.functional as F
from torch import nn


class MoeLayer(nn.Module):
    def __init__(self, experts: list[nn.Module], gate: nn.Module, num_experts_per_tok: int):
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.gate = gate  # (E, dim) router
        self.num_experts_per_tok = num_experts_per_tok

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (S, dim) -> (S, dim): sum over each token's top-K experts, weighted by a softmax over those K."""
        router_logits = self.gate(x)  # (S, E)
        top_logits, chosen = torch.topk(router_logits, self.num_experts_per_tok, dim=-1)  # (S, K)
        weights = F.softmax(top_logits, dim=-1, dtype=torch.float32).to(x.dtype)  # (S, K)
        out = torch.zeros_like(x)
        # Loop over experts, not tokens: an expert no token chose is never read, which is what makes
        # decoding a sparse model cost only its active parameters.
        for e in torch.unique(chosen).tolist():
            token_idx, slot = torch.where(chosen == e)
            out.index_add_(0, token_idx, weights[token_idx, slot, None] * self.experts[e](x[token_idx]))
        return out
