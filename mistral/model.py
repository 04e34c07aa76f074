"""The Mistral / Mixtral decoder. Module attributes are the native checkpoint's state-dict keys.

This file is the definition, in plain PyTorch, and runs on any device. Fast paths are applied from outside: quantized
weight formats swap modules (mistral/quantize.py), as grouped experts do for a mixture on a GPU (mistral/grouped.py),
and decode steps go to a compiled step (mistral/compiled.py) or, on a CPU, to the engine in mistral/cpu/ when
mistral/generate.py finds one that takes them. A folder's weights reach it from outside too: mistral.checkpoint's
load_model builds it on the meta device and assigns them.

Letters (mistral/__init__.py): S packed tokens, R positions whose logits are returned, H heads, Hkv kv heads,
D head_dim, V vocab.
"""
import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mistral.args import ModelArgs, MoeArgs  # noqa: F401  (re-exported: mistral.model.ModelArgs)
from mistral.attention import BlockMask, SlotMask, attention
from mistral.cache import CacheMetadata, CacheView, RotatingBufferCache
from mistral.errors import MistralError
from mistral.moe import MoeLayer
from mistral.rope import apply_rotary_emb, precompute_freqs_cis


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x / sqrt(mean(x^2) + eps), in fp32 whatever the model dtype
        return F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: BlockMask,
                cache: CacheView | None) -> torch.Tensor:
        S = x.shape[0]
        xq = self.wq(x).view(S, self.n_heads, self.head_dim)  # (S, H, D)
        xk = self.wk(x).view(S, self.n_kv_heads, self.head_dim)  # (S, Hkv, D)
        xv = self.wv(x).view(S, self.n_kv_heads, self.head_dim)
        xq, xk = apply_rotary_emb(xq, freqs_cis), apply_rotary_emb(xk, freqs_cis)
        keys, values = (xk, xv) if cache is None else cache.update(xk, xv)  # (Skv, Hkv, D)
        out = attention(xq, keys, values, mask)  # (S, H, D)
        return self.wo(out.view(S, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # SwiGLU


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        if args.moe is None:
            self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        else:
            experts = [FeedForward(args.dim, args.hidden_dim) for _ in range(args.moe.num_experts)]
            gate = nn.Linear(args.dim, args.moe.num_experts, bias=False)
            self.feed_forward = MoeLayer(experts, gate, args.moe.num_experts_per_tok)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: BlockMask,
                cache: CacheView | None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask, cache)
        return h + self.feed_forward(self.ffn_norm(h))


def pipeline_layers(n_layers: int, num_ranks: int, rank: int) -> range:
    """The layers rank `rank` builds: ceil(n_layers / num_ranks) each, the last rank taking the rest.

    n_layers=5, num_ranks=2: rank 0 -> 0,1,2; rank 1 -> 3,4
    n_layers=5, num_ranks=3: rank 0 -> 0,1;   rank 1 -> 2,3;  rank 2 -> 4
    """
    per_rank = -(-n_layers // num_ranks)
    return range(min(rank * per_rank, n_layers), min((rank + 1) * per_rank, n_layers))


@dataclass
class Step:
    """One forward's inputs, checked, with what the cache derives from them (Transformer.prepare)."""

    ids: torch.Tensor  # (S,) packed token ids
    seqlens: list[int]  # (B,) tokens of each sequence; with a cache, row b's new ones (0: it sits the step out)
    positions: torch.Tensor | None  # (S,) each token's position; None when S == 0
    mask: BlockMask | None
    cache: RotatingBufferCache | None
    meta: CacheMetadata | None  # the cache's metadata for the step
    rows: list[int] | None  # the packed positions whose logits are returned (None: all)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, pipeline_rank: int = 0, num_pipeline_ranks: int = 1, max_batch_size: int = 1):
        super().__init__()
        if not isinstance(max_batch_size, int) or isinstance(max_batch_size, bool) or max_batch_size < 1:
            raise MistralError(f"max_batch_size must be a whole number >= 1, got {max_batch_size!r}")
        if not 1 <= num_pipeline_ranks <= args.n_layers:
            raise MistralError(f"num_pipeline_ranks must be between 1 and n_layers ({args.n_layers}), "
                               f"got {num_pipeline_ranks}")
        if not pipeline_layers(args.n_layers, num_pipeline_ranks, num_pipeline_ranks - 1):
            per_rank = -(-args.n_layers // num_pipeline_ranks)
            raise MistralError(f"{args.n_layers} layers split {per_rank} per rank leave the "
                               f"last of {num_pipeline_ranks} ranks without layers; use another num_pipeline_ranks")
        self.args = args
        self.max_batch_size = max_batch_size
        self.pipeline_rank, self.num_pipeline_ranks = pipeline_rank, num_pipeline_ranks
        self.layer_ids = pipeline_layers(args.n_layers, num_pipeline_ranks, pipeline_rank)
        self.is_first, self.is_last = pipeline_rank == 0, pipeline_rank == num_pipeline_ranks - 1
        # Only the ranks that use them build the embeddings and the head; keys keep their global layer index.
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim) if self.is_first else None
        self.layers = nn.ModuleDict({str(i): TransformerBlock(args) for i in self.layer_ids})
        self.norm = RMSNorm(args.dim, args.norm_eps) if self.is_last else None
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False) if self.is_last else None

    @property
    def n_local_layers(self) -> int:
        return len(self.layers)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(self, input_ids: torch.Tensor, seqlens: list[int], cache: RotatingBufferCache | None = None,
                rows: list[int] | None = None) -> torch.Tensor | None:
        """input_ids (S,): the sequences of the batch packed back to back, seqlens[b] tokens each.

        Without a cache, every sequence starts at position 0. With one, row b of the cache continues
        sequence b, and seqlens[b] may be 0. Returns fp32 logits (S, V), or (R, V) for the R packed positions in
        `rows`: generation needs the logits of a prompt's last token only, and the output head is the largest
        product there is (V x dim per position). Under pipeline ranks only the last rank, which holds the head, has
        logits; the others return None.
        """
        return self.run(self.prepare(input_ids, seqlens, cache, rows))

    def prepare(self, input_ids: torch.Tensor, seqlens: list[int], cache: RotatingBufferCache | None,
                rows: list[int] | None) -> "Step":
        """Check a step's inputs and derive its positions and mask; nothing is computed or changed yet, so a mistake
        found here is found alike on every pipeline rank."""
        seqlens = [int(n) for n in seqlens]
        if input_ids.ndim != 1 or input_ids.shape[0] != sum(seqlens):
            raise MistralError(f"input_ids must be 1-D with sum(seqlens)={sum(seqlens)} tokens, "
                               f"got shape {tuple(input_ids.shape)}")
        S = input_ids.shape[0]
        if rows is not None and not all(0 <= r < S for r in rows):
            raise MistralError(f"rows must be positions of the {S} packed tokens, got {rows}")
        if S == 0:  # nothing to run: every row of the cache sits this step out
            return Step(input_ids, seqlens, None, None, cache, None, rows)
        if cache is not None:
            if self.args.mixed_windows and cache.windows != self.layer_windows:
                raise MistralError(f"this model's layers have windows of their own ({self.args.sliding_window}), and "
                                   "each keeps a cache of its window: build the cache with windows=model.layer_windows")
            meta = cache.get_input_metadata(seqlens, self.args.window)
            return Step(input_ids, seqlens, meta.positions, meta.mask, cache, meta, rows)
        if any(n <= 0 for n in seqlens):
            raise MistralError(f"without a cache every sequence needs at least one token, got seqlens {seqlens}")
        positions = torch.cat([torch.arange(n) for n in seqlens]).to(self.device)
        return Step(input_ids, seqlens, positions, BlockMask(tuple(seqlens), tuple(seqlens), self.args.window),
                    None, None, rows)

    def run(self, step: "Step") -> torch.Tensor | None:
        """The forward of a prepared step: the embeddings (or the previous rank's output), this rank's layers, then
        the head (or a send to the next rank)."""
        S, V, cache = step.ids.shape[0], self.args.vocab_size, step.cache
        if S == 0:
            return torch.empty(0, V, device=self.device) if self.is_last else None
        if self.is_first:
            h = self.tok_embeddings(step.ids)  # (S, dim)
        else:
            h = torch.empty(S, self.args.dim, device=self.device, dtype=self.dtype)
            dist.recv(h, src=self.pipeline_rank - 1)
        freqs_cis = precompute_freqs_cis(self.args.head_dim, step.positions, self.args.rope_theta)  # (S, D/2)
        if cache is None:
            views, masks = [None] * self.n_local_layers, self.layer_masks(step.mask)
        else:  # each layer's cache has the step's metadata for its slots, the mask of its window among it
            views = [cache.layer(i, step.meta) for i in range(self.n_local_layers)]
            masks = [view.meta.mask for view in views]
        h = self.blocks(h, freqs_cis, masks, views)
        if cache is not None:
            cache.advance(step.seqlens)
        if not self.is_last:
            dist.send(h, dst=self.pipeline_rank + 1)
            return None
        if step.rows == []:
            return torch.empty(0, V, device=self.device)
        if step.rows is not None:
            h = h[torch.tensor(step.rows, dtype=torch.long, device=h.device)]  # (R, dim)
        return self.head(h)  # (R, V)

    def blocks(self, h: torch.Tensor, freqs_cis: torch.Tensor, masks: list[BlockMask | SlotMask],
               caches: list[CacheView | None]) -> torch.Tensor:
        """h (S, dim) through this rank's layers, layer i under masks[i], reading and writing caches[i] (None: no
        cache). The compiled decode step (mistral/compiled.py) runs the same loop with caches of its own."""
        for layer, mask, cache in zip(self.layers.values(), masks, caches, strict=True):
            h = layer(h, freqs_cis, mask, cache)
        return h

    @property
    def layer_windows(self) -> list[int | None]:
        """The window of each of this rank's layers (None: full attention)."""
        return [self.args.windows[i] for i in self.layer_ids]

    def layer_masks(self, mask: BlockMask) -> list[BlockMask]:
        """Without a cache: the mask of each of this rank's layers, the step's (of the widest window) narrowed to the
        layer's own. One mask per window, so that the layers of a window share what it builds."""
        windows = self.layer_windows
        narrowed = {w: mask if w == mask.window else dataclasses.replace(mask, window=w) for w in set(windows)}
        return [narrowed[w] for w in windows]

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """h (R, dim) -> fp32 logits (R, V): the last rank's final norm and output head."""
        return self.output(self.norm(h)).float()
