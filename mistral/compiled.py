"""A decode step that torch.compile captures whole: every layer, one token per row, on the rolling cache.

Eager PyTorch at batch 1 spends more time launching kernels than a GPU spends reading the weights. A step that
torch.compile(fullgraph=True) captures without a break, and that holds no per-step host number, can be replayed as
one CUDA graph (mode="reduce-overhead"). That needs fixed shapes and nothing the host must read back:

- every row of the cache brings one token, so the batch is always the cache's B rows;
- attention reads all N slots of each row, the ones not yet written masked out (attention.SlotMask), so the key
  length never changes;
- the positions live on the device and are advanced in place; the host copy in the cache is only compared with it.

The step runs the model's own layer loop (Transformer.blocks) and head, with caches and a mask of its own. Anything
else (pre-fill, a step some row sits out, a mixture whose routing reads the host, that is MoeLayer rather than
mistral/grouped.py's GroupedMoeLayer, pipeline ranks, quantized weights) is declined, and the model runs it eagerly
(mistral/runners.py).

Letters: B rows, N slots per row, Hkv kv heads, D head_dim, V vocab.
"""
import torch
from torch import nn

from mistral.attention import SlotMask
from mistral.cache import RotatingBufferCache
from mistral.grouped import GroupedMoeLayer
from mistral.model import Attention, FeedForward, RMSNorm, Transformer, TransformerBlock
from mistral.rope import inverse_frequencies, rotations

# The modules a compiled step can trace: the plain definition, nothing swapped in from outside.
_TRACEABLE = (Transformer, nn.ModuleDict, TransformerBlock, Attention, FeedForward, RMSNorm, nn.Linear, nn.Embedding,
              GroupedMoeLayer, nn.ModuleList)


class _SlotView:
    """Attention's cache for one layer of a compiled step: writes row b's new key at slot slots[b] and hands back the
    whole rows (B, Hkv, N, D), which the SlotMask masks."""

    def __init__(self, cache_k: torch.Tensor, cache_v: torch.Tensor, slots: torch.Tensor):
        self.cache_k, self.cache_v, self.slots = cache_k, cache_v, slots

    def update(self, xk: torch.Tensor, xv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.arange(xk.shape[0], device=xk.device)
        self.cache_k[rows, :, self.slots] = xk  # xk (B, Hkv, D)
        self.cache_v[rows, :, self.slots] = xv
        return self.cache_k, self.cache_v


class CompiledDecoder:
    """Decode steps of `model` on `cache`, compiled once: keep one for as long as the cache lives."""

    def __init__(self, model: Transformer, cache: RotatingBufferCache, backend="inductor", mode: str | None = None):
        """backend and mode are torch.compile's: mode="reduce-overhead" replays CUDA graphs."""
        assert CompiledDecoder.takes(model), "CompiledDecoder.takes(model) is False"
        self.model, self.cache = model, cache
        self.inv_freq = inverse_frequencies(model.args.head_dim, model.args.rope_theta, model.device)
        # The cache's buffers are the step's state, like the weights: never copied in as inputs of a CUDA graph.
        for buffer in (cache.cache_k, cache.cache_v):
            torch._dynamo.mark_static_address(buffer)
        self.positions = torch.zeros(cache.max_batch_size, dtype=torch.long, device=model.device)  # (B,)
        self._positions_are = None  # what cache.seq_pos was when self.positions last matched it
        self._decode = torch.compile(self._step, fullgraph=True, backend=backend, mode=mode)

    @staticmethod
    def takes(model: Transformer) -> bool:
        """Whether a step of this model can be captured whole: one process, dense or grouped FFNs, plain weights, one
        window for every layer."""
        return (model.num_pipeline_ranks == 1 and all(type(m) in _TRACEABLE for m in model.modules())
                and not model.args.mixed_windows)

    def step(self, input_ids: torch.Tensor, seqlens: list[int], cache: RotatingBufferCache | None,
             rows: list[int] | None = None) -> torch.Tensor | None:
        """What model(input_ids, seqlens, cache, rows=rows) returns, for a step in which every row of this decoder's
        cache brings one token; None, with nothing done, for any other step."""
        B, N, window = self.cache.max_batch_size, self.cache.slots, self.model.args.window
        if cache is not self.cache or list(seqlens) != [1] * B or cache.cache_k.shape[3] != N or cache.spare:
            return None  # (spare slots: decode reads only some of a row's, which its mask does not say)
        if window is not None and N > window:  # as get_input_metadata refuses it
            return None
        for b, n in enumerate(cache.seq_pos):
            cache.check_room(b, n + 1, window)
        if self._positions_are != cache.seq_pos:  # pre-fill, a reset or a rewind moved them: one copy to the device
            self.positions.copy_(torch.tensor(cache.seq_pos))
        logits = self._decode(input_ids, self.positions, cache.cache_k, cache.cache_v)  # (B, V)
        self.positions += 1
        cache.advance(seqlens)
        self._positions_are = list(cache.seq_pos)
        return logits if rows is None else logits[rows]

    def _step(self, tokens: torch.Tensor, positions: torch.Tensor, cache_k: torch.Tensor,
              cache_v: torch.Tensor) -> torch.Tensor:
        """tokens (B,) at positions (B,), the cache (L, B, Hkv, N, D) -> (B, V) fp32 logits. What is traced."""
        model, N = self.model, cache_k.shape[3]
        h = model.tok_embeddings(tokens)  # (B, dim)
        freqs_cis = rotations(positions, self.inv_freq)  # (B, D/2)
        slots = positions % N  # (B,): position p of a row lives in slot p % N
        seen = torch.clamp(positions + 1, max=N)  # (B,) valid slots once this token is written: they fill from 0 up
        mask = SlotMask((torch.arange(N, device=tokens.device) < seen[:, None])[:, None, None, :])  # (B, 1, 1, N)
        views = [_SlotView(cache_k[i], cache_v[i], slots) for i in range(len(cache_k))]
        h = model.blocks(h, freqs_cis, [mask] * len(views), views)
        return model.head(h)
