"""The CPU decode engine: one decode step of a loaded model, every block in one C call.

Decoding one token multiplies every weight matrix by a single row (a few, one per sequence), so its speed is the speed
at which those products read the weights from memory; and everything else in a step is many small operations, where
torch's dispatch costs more than the arithmetic (a torch call on a few hundred numbers takes 7-9 us here, 20-30 us in
a step, after the weights streaming through have evicted everything else from the caches). So a step here is: the
embedding, then kernels.blocks (for each layer its norms, its q/k/v products in one pass over their weights, RoPE at
the tokens' positions, the cache write, attention over the cache rows as stored, wo, and the SwiGLU FFN, or a Mixtral
block's router, top-k and chosen experts), then the final norm and the head, also in C.

    decoder = CpuDecoder.of(model)                   # None where it does not apply: then the model runs every step
    logits = decoder.step(ids, seqlens, cache)       # None for a step it does not take

A step of many tokens (pre-fill) is declined: the model's own forward runs it. Its int8 and int4 products still run
in C, as the engine's do: CpuDecoder.of puts mistral/cpu/linears.py's kernel-backed modules in their place, once.

It reads the model's weights as they are (fp32, bf16, int8 or int4: mistral/quantize.py's Bf16Linear, Int8Linear and
Int4Linear; int8 and int4 against x rounded to int8 per group of 32, kernels.c 1b) and gathers them once, when built;
a weight replaced afterwards (a new tensor, not changed in place) needs a new decoder.
Its answers are the model's forward: tests/test_decoder.py checks them against float64 and against the torch model.
"""
import torch
from torch import nn

from mistral.cache import RotatingBufferCache
from mistral.cpu import kernels
from mistral.cpu.linears import with_kernels
from mistral.ggml import GgmlLinear
from mistral.model import FeedForward, Transformer
from mistral.moe import MoeLayer
from mistral.rope import inverse_frequencies


def _pair(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, scales) of a linear layer as kernels.prepare takes it: scales for mistral.quantize's Int8Linear and
    Int4Linear, the type number for a GgmlLinear, None for the others."""
    if isinstance(linear, GgmlLinear):
        return linear.weight, linear.code
    return linear.weight, getattr(linear, "scales", None)


def _layer(block: nn.Module) -> kernels.KernelLayer | None:
    """A TransformerBlock as kernels.blocks takes it; None for a feed-forward of another kind."""
    att, ffn = block.attention, block.feed_forward
    if isinstance(ffn, FeedForward):
        experts, router, top_k = [ffn], None, 1
    elif isinstance(ffn, MoeLayer) and isinstance(ffn.gate, nn.Linear) and all(
            isinstance(e, FeedForward) for e in ffn.experts):
        experts, router, top_k = list(ffn.experts), ffn.gate.weight, ffn.num_experts_per_tok
    else:
        return None
    weights = [_pair(getattr(att, n)) for n in ("wq", "wk", "wv", "wo")]
    weights += [_pair(getattr(e, n)) for e in experts for n in ("w1", "w3", "w2")]
    return kernels.KernelLayer((block.attention_norm.weight, block.ffn_norm.weight), weights, router, top_k)


class CpuDecoder:
    """Decode steps of one model on a CPU: each row brings one token, and all the blocks run in one C call."""

    def __init__(self, model: Transformer, plan: kernels.BlocksPlan, head: kernels.Prepared | None):
        self.model, self.plan, self.head = model, plan, head
        args = model.args
        self.window, self.eps, self.norm = args.window, args.norm_eps, model.norm.weight
        self.inv_freq = inverse_frequencies(args.head_dim, args.rope_theta, torch.device("cpu"))
        self.embed = model.tok_embeddings

    @staticmethod
    def of(model: Transformer) -> "CpuDecoder | None":
        """The engine for this model, or None where it does not apply: not on a CPU, split over pipeline ranks, the
        kernels not built, or weights and blocks of kinds they do not take. On a CPU, the model's int8 and int4 linears
        become mistral/cpu/linears.py's first (in place; a second call changes nothing), whatever the answer."""
        if model.device.type != "cpu":
            return None
        with_kernels(model)
        if model.num_pipeline_ranks > 1 or not kernels.available():
            return None
        layers = [_layer(block) for block in model.layers.values()]
        if any(layer is None for layer in layers) or model.norm.weight.dtype != torch.float32:
            return None
        args = model.args
        plan = kernels.plan_blocks(layers, args.norm_eps, args.n_heads, args.n_kv_heads, args.head_dim)
        head = kernels.prepare([_pair(model.output)], 3)  # None: the head's own forward (a GGUF's Q6_K beside Q4_0)
        if plan is None:
            return None
        return CpuDecoder(model, plan, head)

    def step(self, input_ids: torch.Tensor, seqlens: list[int], cache: RotatingBufferCache | None,
             rows: list[int] | None = None) -> torch.Tensor | None:
        """What model(input_ids, seqlens, cache, rows=rows) returns, for a step in which every row of the cache that
        brings anything brings one token (decode), or a few (a verified draft, a short chunk) as one query each where
        that is exact (cache.takes_per_token), all in C. None, with nothing done, for a step it does not take."""
        M = input_ids.shape[0]
        if cache is None or not 0 < M <= kernels.MAX_ROWS or sum(seqlens) != M:
            return None
        # Rows of several tokens run as one query per token: their keys are all written first, which is exact where
        # no buffer wraps, or where the spare slots keep what the writes overwrite.
        per_token = any(n > 1 for n in seqlens)
        if per_token and not cache.takes_per_token(seqlens, self.model.args.narrowest):
            return None
        grad = torch.is_grad_enabled()
        if not all(kernels.takes_cache(k, v) for k, v in zip(cache.k, cache.v)) or (grad and self.plan.needs_grad):
            return None
        meta = cache.get_input_metadata(seqlens, self.window, per_token)
        h = self.embed(input_ids)  # (M, dim)
        if not kernels.takes_rows(h):
            return None
        # Each layer's step: that of its cache's slot count (a layer of a narrower window keeps fewer); and its window
        # where its slots are more (spare slots): its queries read the slots of their last `window` positions.
        metas = [meta.of(k.shape[2]) for k in cache.k]
        windows = [m.mask.window if m.mask.window is not None and m.mask.window < m.slots else 0 for m in metas]
        h = kernels.blocks(h, self.plan, cache.k, cache.v, [m.step for m in metas], self.inv_freq, windows)
        cache.advance(seqlens)
        if rows is not None:
            h = h[rows]
            if not rows:
                return torch.empty(0, self.model.args.vocab_size)
        h = kernels.rms_norm(h, self.norm, self.eps)
        return kernels.stacked(h, self.head) if self.head is not None else self.model.output(h)  # (N, V)

    def greedy(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Each row's argmax and its log-softmax, in one call; None where the kernel does not take the logits."""
        return kernels.greedy(logits)
