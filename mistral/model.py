"""The Mistral / Mixtral decoder. Module attributes are the native checkpoint's state-dict keys.

Letters: S packed tokens, H heads, Hkv kv heads, D head_dim, V vocab.
"""
import logging
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mistral import kernels
from mistral.args import ModelArgs, MoeArgs  # noqa: F401  (re-exported: mistral.model.ModelArgs)
from mistral.attention import BlockMask, attention
from mistral.cache import CacheMetadata, CacheView, RotatingBufferCache
from mistral.errors import MistralError
from mistral.moe import MoeLayer
from mistral.rope import apply_rotary_emb, inverse_frequencies, precompute_freqs_cis

log = logging.getLogger(__name__)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x / sqrt(mean(x^2) + eps), in fp32 whatever the model dtype. At decode on a CPU, the same in one C call.
        fast = kernels.rms_norm(x, self.weight, self.eps)
        if fast is not None:
            return fast
        return F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).type_as(x) * self.weight


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (M, in) @ w (out, in)^T -> (M, out).

    Decoding a few rows at a time is bound by reading w. On CPU, mistral.kernels's kernel reads it at the
    memory bandwidth, about twice as fast as MKL (measured on a 2-core AVX2 machine). Without it, w @ x^T
    is used for 2 to 16 rows: MKL's x @ w^T reads w at about a third of the speed there.
    """
    if x.ndim == 2 and x.shape[0] <= kernels.MAX_ROWS:
        if kernels.usable(x, w):
            return kernels.matvec(x, w)
        if x.shape[0] > 1:
            return (w @ x.T).T.contiguous()
    return F.linear(x, w)


def linears(x: torch.Tensor, *layers: nn.Module) -> list[torch.Tensor]:
    """[layer(x) for layer in layers]: several products of the same x.

    Decoding on a CPU, the kernel makes them in one call and one pass over all their weights, side by side
    in one tensor that is returned as views, with the numbers each layer would give alone. The layers are
    Linear, or mistral.quantize's Int8Linear and Bf16Linear: each has its weight in `weight`, and
    `scales` (None but for int8).
    """
    weights = kernel_weights(*layers)
    if kernels.usable_together(x, weights):
        y = kernels.stacked(x, weights)
        return list(y.split_with_sizes([w.shape[0] for w, _ in weights], dim=-1))
    return [layer(x) for layer in layers]


# While a model is steady(): what its decode steps gathered of the weights for the C kernels. kernel_weights' lists by
# the layers asked about, and the blocks plan by the model.
_kept: dict | None = None


def kernel_weights(*layers: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """The (weight, scales) pairs that mistral.kernels takes for these layers; the same list again while the model
    is steady() (so the kernels' check of it is kept as well)."""
    if _kept is not None and (kept := _kept.get(layers)) is not None:
        return kept
    weights = [(member(layer, "weight"), member(layer, "scales")) for layer in layers]
    if _kept is not None:
        weights = _kept[layers] = kernels.KeptWeights(weights)
    return weights


def member(module: nn.Module, name: str):
    """getattr(module, name), looked up where nn.Module keeps parameters, buffers and submodules first.

    Those are not instance attributes: each plain access goes through nn.Module.__getattr__, a Python call of about
    a microsecond, and a decode step on a CPU fetches a few hundred weights for its C kernels. The dicts are read in
    the order __getattr__ reads them; anything else (Linear's class attribute `scales`) is a plain getattr. For the
    names this package reads (submodules, weights, scales), none of which shadows a class attribute, that is
    getattr's answer.
    """
    for found in (module._parameters, module._buffers, module._modules):
        if name in found:
            return found[name]
    return getattr(module, name)


class Linear(nn.Linear):
    """A bias-free nn.Linear (same parameters and keys) computed by `linear`."""

    scales = None  # what `linears` passes the kernel: int8 weights have scales (mistral.quantize), these none

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = Linear(args.dim, args.n_heads * args.head_dim)
        self.wk = Linear(args.dim, args.n_kv_heads * args.head_dim)
        self.wv = Linear(args.dim, args.n_kv_heads * args.head_dim)
        self.wo = Linear(args.n_heads * args.head_dim, args.dim)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: BlockMask, cache: CacheView | None) -> torch.Tensor:
        if cache is not None and cache.meta.decode:  # one token per row: on a CPU, what follows in one C call
            fast = kernels.attention(x, kernel_weights(self.wq, self.wk, self.wv, self.wo), cache.cache_k, cache.cache_v,
                                     cache.meta.step, torch.view_as_real(freqs_cis), self.n_heads)
            if fast is not None:
                return fast
        S = x.shape[0]
        xq, xk, xv = (y.view(S, -1, self.head_dim) for y in linears(x, self.wq, self.wk, self.wv))
        xq, xk = apply_rotary_emb(xq, freqs_cis), apply_rotary_emb(xk, freqs_cis)  # (S, H, D), (S, Hkv, D)
        keys, values = (xk, xv) if cache is None else cache.update(xk, xv)  # (Skv, Hkv, D)
        out = attention(xq, keys, values, mask)  # (S, H, D)
        return self.wo(out.view(S, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = Linear(dim, hidden_dim)
        self.w2 = Linear(hidden_dim, dim)
        self.w3 = Linear(dim, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Decoding on a CPU, the same in one C call.
        fast = kernels.feed_forward(x, kernel_weights(self.w1, self.w3, self.w2))
        if fast is not None:
            return fast
        gate, up = linears(x, self.w1, self.w3)  # (S, hidden) each
        return self.w2(F.silu(gate) * up)  # SwiGLU


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

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: BlockMask, cache: CacheView | None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask, cache)
        return h + self.feed_forward(self.ffn_norm(h))

    def kernel_layer(self) -> kernels.KernelLayer | None:
        """What kernels.blocks takes for this block: its norms' weights, (weight, scales) of wq, wk, wv, wo and then of
        w1, w3, w2 of its FFN or of each expert, and an MoE block's router and experts per token; None for an FFN of
        another kind. Read with `member`: every decode step outside steady() asks."""
        att, ffn = member(self, "attention"), member(self, "feed_forward")
        if isinstance(ffn, FeedForward):
            ffns, router, top_k = [ffn], None, 1
        elif isinstance(ffn, MoeLayer) and isinstance(gate := member(ffn, "gate"), nn.Linear):
            ffns, router, top_k = list(member(ffn, "experts")), member(gate, "weight"), ffn.num_experts_per_tok
            if not all(isinstance(expert, FeedForward) for expert in ffns):
                return None
        else:
            return None
        projections = [member(att, n) for n in ("wq", "wk", "wv", "wo")]
        projections += [member(f, n) for f in ffns for n in ("w1", "w3", "w2")]
        norms = (member(member(self, "attention_norm"), "weight"), member(member(self, "ffn_norm"), "weight"))
        return kernels.KernelLayer(norms, kernel_weights(*projections), router, top_k)


def pipeline_layers(n_layers: int, num_ranks: int, rank: int) -> range:
    """The layers rank `rank` builds: ceil(n_layers / num_ranks) each, the last rank taking the rest.

    n_layers=5, num_ranks=2: rank 0 -> 0,1,2; rank 1 -> 3,4
    n_layers=5, num_ranks=3: rank 0 -> 0,1;   rank 1 -> 2,3;  rank 2 -> 4
    """
    per_rank = -(-n_layers // num_ranks)
    return range(min(rank * per_rank, n_layers), min((rank + 1) * per_rank, n_layers))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, pipeline_rank: int = 0, num_pipeline_ranks: int = 1, max_batch_size: int = 1):
        super().__init__()
        if not 1 <= num_pipeline_ranks <= args.n_layers:
            raise MistralError(f"num_pipeline_ranks must be between 1 and n_layers ({args.n_layers}), got {num_pipeline_ranks}")
        if not pipeline_layers(args.n_layers, num_pipeline_ranks, num_pipeline_ranks - 1):
            raise MistralError(f"{args.n_layers} layers split {-(-args.n_layers // num_pipeline_ranks)} per rank leave the "
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
        self.output = Linear(args.dim, args.vocab_size) if self.is_last else None

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
                rows: list[int] | None = None) -> torch.Tensor:
        """input_ids (S,): the sequences of the batch packed back to back, seqlens[b] tokens each.

        Without a cache, every sequence starts at position 0. With one, row b of the cache continues
        sequence b, and seqlens[b] may be 0. Returns fp32 logits on every pipeline rank: (S, V), or (N, V) for
        the N packed positions in `rows`. Generation needs the logits of a prompt's last token only, and the
        output head is the largest product there is (V x dim per position).
        """
        seqlens = [int(n) for n in seqlens]
        if input_ids.ndim != 1 or input_ids.shape[0] != sum(seqlens):
            raise MistralError(f"input_ids must be 1-D with sum(seqlens)={sum(seqlens)} tokens, got shape {tuple(input_ids.shape)}")
        S = input_ids.shape[0]
        if rows is not None and not all(0 <= r < S for r in rows):
            raise MistralError(f"rows must be positions of the {S} packed tokens, got {rows}")
        if S == 0:  # nothing to run: every row of the cache sits this step out
            return torch.empty(0, self.args.vocab_size, device=self.device)
        if cache is None:
            if any(n <= 0 for n in seqlens):
                raise MistralError(f"without a cache every sequence needs at least one token, got seqlens {seqlens}")
            positions = torch.cat([torch.arange(n) for n in seqlens]).to(self.device)
            mask, meta = BlockMask(tuple(seqlens), tuple(seqlens), self.args.sliding_window), None
        else:
            meta = cache.get_input_metadata(seqlens, self.args.sliding_window)
            positions, mask = meta.positions, meta.mask

        if self.is_first:
            h = self.tok_embeddings(input_ids)  # (S, dim)
        else:
            h = torch.empty(S, self.args.dim, device=self.device, dtype=self.dtype)
            dist.recv(h, src=self.pipeline_rank - 1)
        fast = None if cache is None or not meta.decode else self._decode_in_one_call(h, meta, cache)
        if fast is not None:
            h = fast
        else:
            freqs_cis = precompute_freqs_cis(self.args.head_dim, positions, self.args.rope_theta)  # (S, D/2)
            for local_i, layer in enumerate(self.layers.values()):
                h = layer(h, freqs_cis, mask, None if cache is None else cache.layer(local_i, meta))
        if cache is not None:
            cache.advance(seqlens)

        if not self.is_last or rows == []:
            if not self.is_last:
                dist.send(h, dst=self.pipeline_rank + 1)
            logits = torch.empty(S if rows is None else len(rows), self.args.vocab_size, device=self.device)
        else:
            if rows is not None:
                h = h[torch.tensor(rows, dtype=torch.long, device=h.device)]  # (N, dim)
            logits = self.output(self.norm(h)).float()  # (N, V)
        if self.num_pipeline_ranks > 1:
            dist.broadcast(logits, src=self.num_pipeline_ranks - 1)
        return logits

    @contextmanager
    def steady(self):
        """Within this, no weight of the model is replaced: decode steps reuse what they gathered of the weights for
        the C kernels (kernels.plan_blocks) instead of gathering and checking some 60 tensors again at every step,
        which costs about 0.3 ms of a ~5 ms step. generate_ids runs in it. Changing weights in place is fine."""
        global _kept
        outer, _kept = _kept, {}
        try:
            yield self
        finally:
            _kept = outer

    def _decode_in_one_call(self, h: torch.Tensor, meta: CacheMetadata, cache: RotatingBufferCache) -> torch.Tensor | None:
        """The layers' forward() for one token per row on a CPU: all of them in one C call (kernels.blocks), or None
        where the kernels do not apply. The norms are built with args.norm_eps, so the kernel takes
        one eps; RoPE's rotations are computed there, from the positions."""
        if not kernels.takes_rows(h):  # on CUDA, say: not worth gathering the weights
            return None
        plan = None if _kept is None else _kept.get(self)
        if plan is None:
            layers = [layer.kernel_layer() for layer in self.layers.values()]
            if any(layer is None for layer in layers):
                return None
            plan = kernels.plan_blocks(layers, self.args.norm_eps, self.args.n_heads, self.args.n_kv_heads,
                                       self.args.head_dim)
            if plan is None:
                return None
            if _kept is not None:
                _kept[self] = plan
        inv_freq = inverse_frequencies(self.args.head_dim, self.args.rope_theta, h.device)
        return kernels.blocks(h, plan, cache.cache_k, cache.cache_v, meta.step, inv_freq)

    @staticmethod
    def from_folder(folder: Path | str, max_batch_size: int = 1, num_pipeline_ranks: int = 1,
                    device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                    quantize: str | None = None) -> "Transformer":
        """Load a native folder (params.json + consolidated.*) or a Hugging Face one (config.json + model*.safetensors):
        mistral.checkpoint.load_model, which says what device, dtype and quantize choose."""
        from mistral import checkpoint

        return checkpoint.load_model(folder, max_batch_size, num_pipeline_ranks, device, dtype, quantize)
