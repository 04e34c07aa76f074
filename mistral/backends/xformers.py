"""xformers' memory_efficient_attention as the attention kernel on CUDA, falling back to SDPA where it cannot run.

Importing this module registers attention() below in mistral.attention.KERNELS for "cuda" (the package's __init__
imports it). Everything that knows xformers is here: the bias equivalent to a BlockMask, the probe that asks
xformers' own dispatch whether an operator takes a kind of step (once per kind), one warning when none does or
xformers cannot be imported, and the call itself. Its kernels need CUDA; its mask classes run anywhere, which the
tests use to check attn_bias() against BlockMask.materialize().
"""
import functools
import logging
import re

import torch

from mistral import attention as _attention
from mistral.attention import BlockMask

log = logging.getLogger(__name__)


def attn_bias(mask: BlockMask, device: torch.device, n_kv_heads: int = 1, group: int = 1):
    """The xformers attention bias equivalent to `mask`.

    Padded decode takes the layout of attention() below: each (row, kv head) pair is a block of `group`
    queries (the query heads that share that kv head) over that row's N slots of that head, so the bias has
    B * n_kv_heads blocks. Rows (2, 1 valid slots of N=4), 2 kv heads, group 3:
    q_seqlen [3, 3, 3, 3], kv_padding 4, kv_seqlen [2, 2, 1, 1]. A single query sees every valid slot, so the
    blocks are not causal; with the defaults it is one query per row over its N slots.
    """
    from xformers.ops.fmha import attn_bias as ab

    q, kv = list(mask.q_seqlens), list(mask.kv_seqlens)
    if mask.kv_padding is not None:
        kv_per_head = [n for n in kv for _ in range(n_kv_heads)]
        return ab.BlockDiagonalPaddedKeysMask.from_seqlens([group] * len(kv_per_head), mask.kv_padding,
                                                           kv_per_head, device=device)
    q, kv = [a for a in q if a], [b for a, b in zip(q, kv) if a]  # sequences with nothing this step are not there
    if q == kv:  # first pre-fill: nothing cached
        bias = ab.BlockDiagonalCausalMask.from_seqlens(q, device=device)
        return bias.make_local_attention(mask.window) if mask.window else bias
    bias = ab.BlockDiagonalMask.from_seqlens(q, kv, device=device)
    if mask.window:
        return bias.make_local_attention_from_bottomright(mask.window)
    return bias.make_causal_from_bottomright()


@functools.cache
def ops():
    """xformers.ops, or None where it is not installed or cannot be imported.

    Not only ImportError: an xformers built for another torch may fail on import with another error, and one that
    imports anyway still cannot run its own kernels, which refuses() finds out at the first step.
    """
    try:
        import xformers.ops
    except ModuleNotFoundError as e:
        if e.name is not None and e.name.split(".")[0] == "xformers":
            return None  # not installed: SDPA is the plain path, nothing to say
        _fall_back(f"importing xformers failed ({_first_line(e)})")
        return None
    except Exception as e:
        _fall_back(f"importing xformers failed ({_first_line(e)})")
        return None
    return xformers.ops


# (device, dtype, bias type, head_dim) -> None where a memory_efficient_attention operator takes such inputs, else why
# none does. Asked once per kind of step (first pre-fill, later chunk, decode), at its first call.
verdicts: dict[tuple, str | None] = {}


def refuses(q5: torch.Tensor, k5: torch.Tensor, v5: torch.Tensor, bias) -> str | None:
    """Why memory_efficient_attention cannot run these inputs (no operator supports them here), or None.

    The answer comes from the dispatch memory_efficient_attention itself uses, which asks every operator for its
    not_supported_reasons: the device, its compute capability, the dtype, the bias type, the head size, and whether
    the operator's library was built and loads against this torch.
    """
    key = (str(q5.device), q5.dtype, type(bias).__name__, q5.shape[-1])
    if key not in verdicts:
        try:
            from xformers.ops import fmha
            from xformers.ops.fmha.dispatch import _dispatch_fw

            inputs = fmha.Inputs(query=q5, key=k5, value=v5, attn_bias=bias)
            inputs.validate_inputs()
            _dispatch_fw(inputs, False)
            verdicts[key] = None
        except Exception as e:  # NotImplementedError lists every operator's reasons; anything else is as telling
            verdicts[key] = _reasons(e)
            _fall_back(f"no xformers operator takes {type(bias).__name__} attention in {q5.dtype} on {q5.device} "
                       f"({verdicts[key]})")
    return verdicts[key]


warned = []


def _fall_back(why: str) -> None:
    """Say once per process that xformers is not used, and why; every later step falls back silently."""
    if not warned:
        warned.append(why)
        log.warning("warning: %s; attention runs on torch SDPA where xformers cannot (each xformers wheel works with "
                    "one torch release: see the README, On a GPU)", why)


def _reasons(e: BaseException) -> str:
    """What xformers' dispatch says, in one line: each operator it tried and why not ("fa2F: device=cpu, ...; ..."),
    or the error's own text when it is not that."""
    tried = re.findall(r"`([^`]+)` is not supported because:\n((?:    .*(?:\n|$))+)", str(e))
    if tried:
        return "; ".join(f"{op}: {', '.join(line.strip() for line in why.splitlines())}" for op, why in tried)[:600]
    return " ".join(str(e).split())[:600] or type(e).__name__


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask) -> torch.Tensor | None:
    """mistral.attention.attention by memory_efficient_attention; None where xformers cannot take the inputs."""
    xops = ops()
    if xops is None:
        return None
    S, H, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv  # query heads per kv head
    if mask.kv_padding is not None and mask.window is not None and mask.window < mask.kv_padding:
        return None  # a layer's window narrower than the slots: its slots are not a prefix of the row (SDPA's mask)
    if mask.kv_padding is not None:
        # Decode over the cache rows as stored, (B, Hkv, N, D): as on the SDPA path, the G query heads that share a
        # kv head become G queries of one head, and every (row, kv head) pair is a block of N slots. Both reshapes
        # are views, so no slot is copied; attn_bias says which slots of each block are valid.
        B, _, N, _ = k.shape
        assert S == B, f"decode: one query per row, got {S} queries for {B} rows"
        q5 = q.reshape(1, B * H, 1, 1, D)  # (1, B*Hkv*G, 1, 1, D): block (b, g) holds query heads g*G .. g*G+G-1
        k5, v5 = (t.view(1, B * Hkv * N, 1, 1, D) for t in (k, v))  # (1, B*Hkv*N, 1, 1, D)
        key = ("xformers", str(q.device), Hkv, G)
    else:
        # xformers takes grouped-query attention as (B, M, G, H, K): Hkv key/value groups of G query heads each.
        q5 = q.reshape(1, S, Hkv, G, D)
        k5 = k[None, :, :, None, :].expand(1, k.shape[0], Hkv, G, D)
        v5 = v[None, :, :, None, :].expand(1, v.shape[0], Hkv, G, D)
        key = ("xformers", str(q.device))
    bias = mask.keep(key, lambda: attn_bias(mask, q.device, Hkv, G))
    if refuses(q5, k5, v5, bias) is not None:
        return None
    out = xops.memory_efficient_attention(q5, k5, v5, attn_bias=bias)
    return out.reshape(S, H, D)


_attention.KERNELS["cuda"] = attention  # the device type xformers' kernels run on
