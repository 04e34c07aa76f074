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

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (S, dim) -> the S * K (token, expert) choices sorted by expert: their tokens (S*K,), their weights
        (S*K, 1), a softmax over each token's top-K router logits, and the number each expert took (E,).

        Sorted by expert, each expert's tokens are one slice of them, in token order, and everything stays on the
        device. chosen [[2, 0], [0, 1]] -> order [1, 2, 3, 0] (flat choices 0, 0, 1, 2), tokens [0, 1, 1, 0],
        counts [2, 1, 1, 0]: expert 0 takes tokens [0, 1], expert 1 token [1], expert 2 token [0], expert 3 nothing.
        """
        E, K = len(self.experts), self.num_experts_per_tok
        top_logits, chosen = torch.topk(self.gate(x), K, dim=-1)  # (S, K)
        weights = F.softmax(top_logits, dim=-1, dtype=torch.float32).to(x.dtype)  # (S, K)
        flat = chosen.flatten()  # (S*K,) choice i is token i // K's
        order = flat.argsort(stable=True)  # (S*K,)
        counts = torch.zeros(E, dtype=torch.long, device=x.device).index_add_(0, flat, torch.ones_like(flat))  # (E,)
        return order // K, weights.flatten().index_select(0, order)[:, None], counts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (S, dim) -> (S, dim): sum over each token's top-K experts, weighted by a softmax over those K."""
        tokens, pair_weights, counts = self.route(x)  # (S*K,), (S*K, 1), (E,)
        # What comes to the host is the E slice lengths, in one transfer, because a launch needs its row count. With
        # them an expert no token chose is never run, and its weights never read, which is what makes decoding a
        # sparse model cost only its active parameters. (mistral/grouped.py does without the read, where the GPU has
        # a grouped product that takes the slice lengths from the device.)
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts.tolist()):  # the one host read of the layer
            if n:
                rows = tokens[start : start + n]
                out.index_add_(0, rows, pair_weights[start : start + n] * self.experts[e](x[rows]))
            start += n
        return out
