"""The single attention entry point, and the description of which key each query may see.

Letters (mistral/__init__.py): S packed queries, Skv packed keys, H heads, Hkv kv heads, D head_dim, W window,
N cache slots per row.

Every sequence of a batch is one *block*. Block b has `q_len` queries and `kv_len` keys, and its queries
are the *last* `q_len` of its `kv_len` positions (the keys in front of them come from the cache). In block
coordinates, query i sits at key position `i + kv_len - q_len` and sees key j iff

    0 <= (i + kv_len - q_len) - j < W        (causal from the bottom right, W keys, itself included)

This one rule covers the first pre-fill (kv_len == q_len), a later chunk that sees its unrotated cache
plus itself (kv_len == cached + q_len), and decode (q_len == 1). It is the rule of xformers'
BlockDiagonalCausalMask / BlockDiagonalMask / BlockDiagonalCausalWithOffsetPaddedKeysMask made local.
"""
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class BlockMask:
    q_seqlens: tuple[int, ...]
    kv_seqlens: tuple[int, ...]
    window: int | None  # W; None: plain causal
    # None: the blocks' keys are packed back to back. An int N: block b's keys start at b * N (the
    # rolling cache itself, N slots a row), and only the first kv_len of those N slots are valid. Decode only:
    # slots are not in position order then, which is harmless because a single query sees every valid key.
    kv_padding: int | None = None
    # Decode only: the slot of each row's newest key, so that a window narrower than the N slots (a layer's own, in
    # a model whose layers have windows of their own) can tell which slots hold keys within it.
    newest: tuple[int, ...] | None = None

    def __post_init__(self):
        assert len(self.q_seqlens) == len(self.kv_seqlens), (self.q_seqlens, self.kv_seqlens)
        assert all(0 <= q <= kv for q, kv in zip(self.q_seqlens, self.kv_seqlens)), (self.q_seqlens, self.kv_seqlens)
        if self.kv_padding is not None:
            assert all(q <= 1 for q in self.q_seqlens), f"padded keys are for decode only, got {self.q_seqlens}"
            assert all(kv <= self.kv_padding for kv in self.kv_seqlens), (self.kv_seqlens, self.kv_padding)

    @cached_property
    def blocks(self) -> list[tuple[int, int, int, int]]:
        """(q_start, q_len, kv_start, kv_len) of every block with at least one query."""
        out, q0, k0 = [], 0, 0
        for b, (q, kv) in enumerate(zip(self.q_seqlens, self.kv_seqlens)):
            start = b * self.kv_padding if self.kv_padding is not None else k0
            if q:
                out.append((q0, q, start, kv))
            q0, k0 = q0 + q, k0 + kv
        return out

    @cached_property
    def _built(self) -> dict:
        """Masks made from this description, kept for the other layers of the same forward."""
        return {}

    def keep(self, key: tuple, make):
        """make(), built once per forward: the first layer builds it, the others reuse it. The mask is the same
        object for every layer of a forward and a new one for the next forward, so nothing outlives its step."""
        if key not in self._built:
            self._built[key] = make()
        return self._built[key]

    def tile_mask(self, q_lo: int, q_hi: int, k_lo: int, k_hi: int, offset: int, device) -> torch.Tensor:
        """_window_mask for one tile, built once per forward: every layer, and every tile of the same
        size and relative offset in any block, shares it."""
        key = ("tile", q_hi - q_lo, k_hi - k_lo, q_lo + offset - k_lo, str(device))
        return self.keep(key, lambda: _window_mask(q_lo, q_hi, k_lo, k_hi, offset, self.window, device))

    def key_padding(self, device) -> torch.Tensor | None:
        """Padded decode: (B, 1, 1, L) bool, True on the first kv_len of each row's L = max(kv_len) slots;
        None when every row has L keys. Built once per forward.

        With a window W narrower than the N slots, only the slots of the last W positions are: the newest key's slot
        and the W - 1 before it, counted back around the ring. N=6, newest slot 1, W=3: slots 1, 0, 5."""
        longest = max(self.kv_seqlens)
        narrower = self.window is not None and self.window < self.kv_padding
        if min(self.kv_seqlens) == longest and not narrower:
            return None

        def make():
            lengths = torch.tensor(self.kv_seqlens, device=device)
            slots = torch.arange(longest, device=device)
            valid = slots < lengths[:, None]  # (B, L)
            if narrower:
                newest = torch.tensor(self.newest, device=device)
                valid &= (newest[:, None] - slots) % self.kv_padding < self.window  # steps back from the newest
            return valid[:, None, None, :]

        return self.keep(("padding", str(device)), make)

    @property
    def shape(self) -> tuple[int, int]:
        """(S, Skv) of the attention this mask describes; with padding, Skv counts every slot."""
        n_kv = len(self.kv_seqlens) * self.kv_padding if self.kv_padding is not None else sum(self.kv_seqlens)
        return sum(self.q_seqlens), n_kv

    def materialize(self) -> torch.Tensor:
        """The dense (S, Skv) boolean mask, True where a query sees a key. For tests and pictures only."""
        mask = torch.zeros(self.shape, dtype=torch.bool)
        for q0, q, k0, kv in self.blocks:
            mask[q0 : q0 + q, k0 : k0 + kv] = _window_mask(0, q, 0, kv, kv - q, self.window, torch.device("cpu"))
        return mask


@dataclass(frozen=True, eq=False)
class SlotMask:
    """Decode over whole cache rows, for a step whose shapes never change (mistral/compiled.py): query b sees the
    slots of its row where valid[b] is True. A tensor, not a tuple of lengths as in BlockMask, so that the step holds
    no Python number that changes from one step to the next."""

    valid: torch.Tensor  # (B, 1, 1, N) bool: slot j of row b holds a key query b sees


def _window_mask(q_lo: int, q_hi: int, k_lo: int, k_hi: int, offset: int, window: int | None, device) -> torch.Tensor:
    """(q_hi - q_lo, k_hi - k_lo) bool: which of keys k_lo.. each of queries q_lo.. of a block sees.

    Query i of the block sits at key position i + offset (offset = kv_len - q_len).
    """
    qpos = torch.arange(q_lo + offset, q_hi + offset, device=device)[:, None]
    kpos = torch.arange(k_lo, k_hi, device=device)[None, :]
    dist = qpos - kpos
    return (dist >= 0) & (dist < window) if window is not None else dist >= 0


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: "BlockMask | SlotMask") -> torch.Tensor:
    """q (S, H, D) -> (S, H, D): softmax(q k^T / sqrt(D)) v under `mask`.

    k and v are packed (Skv, Hkv, D), or with mask.kv_padding = N the cache rows as stored, (B, Hkv, N, D).
    Where a faster kernel is registered for the device (KERNELS: xformers' memory_efficient_attention on CUDA) and it
    takes the step, it runs it; elsewhere it is torch SDPA per block, in query tiles that only ever see their
    window of keys. A SlotMask is a decode step over the cache rows (B, Hkv, N, D) too, in one SDPA call of fixed
    shapes.
    """
    assert q.ndim == 3 and k.shape == v.shape, (q.shape, k.shape, v.shape)
    if isinstance(mask, SlotMask):
        assert k.ndim == 4 and mask.valid.shape == (k.shape[0], 1, 1, k.shape[2]), (k.shape, mask.valid.shape)
        return _sdpa_slots(q, k, v, mask.valid)
    if mask.kv_padding is None:
        assert k.ndim == 3 and (q.shape[0], k.shape[0]) == mask.shape, \
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, mask {mask.shape}"
    else:
        assert k.shape[::2] == (len(mask.kv_seqlens), mask.kv_padding), f"k {tuple(k.shape)}, padded mask {mask.shape}"
    kernel = KERNELS.get(q.device.type)
    # Under torch.compile, SDPA: torch traces it, and a backend's own dispatch (xformers') it does not.
    if kernel is not None and not torch.compiler.is_compiling():
        out = kernel(q, k, v, mask)
        if out is not None:
            return out
    return _sdpa_attention(q, k, v, mask)


# Kernels faster than SDPA on a kind of device, tried first there: each takes attention's q, k, v and BlockMask and
# returns None for what it cannot run. mistral/backends/xformers.py puts itself here for "cuda" when imported, which
# the package's __init__ does; tests put "cpu" here to run that path with a reference kernel in xformers' place.
KERNELS: dict[str, Callable[..., torch.Tensor | None]] = {}


# Queries per SDPA call on the fallback path. With a window, a tile of T queries sees T + W - 1 keys,
# so memory is O(T * (T + W)) whatever the prompt length. CPU SDPA never skips masked-out work, so
# smaller tiles waste less; larger ones run its kernel more efficiently. Measured on a 2-core CPU, 256
# was fastest or within 5% of it for W = 256, 1024 and 4096 and without a window (2W ran W = 256 1.3x
# slower, and W = 4096 1.6x).
_TILE = 256


def _sdpa_attention(q, k, v, mask: BlockMask) -> torch.Tensor:
    # SDPA gets 4-D (batch, heads, tokens, D) tensors: with 3-D ones, torch 2.x on CPU takes a path
    # several times slower.
    if mask.kv_padding is not None:
        return _sdpa_decode(q, k, v, mask)
    out = torch.empty_like(q)
    W = mask.window
    tile = _TILE
    for q0, q_len, k0, kv_len in mask.blocks:
        offset = kv_len - q_len  # keys in front of the first query
        for a in range(0, q_len, tile):
            b = min(a + tile, q_len)
            k_hi = offset + b  # the last query of the tile sees up to itself
            k_lo = max(0, offset + a - W + 1) if W is not None else 0
            # A single query sees every key in [k_lo, k_hi): no mask needed.
            tile_mask = None if b - a == 1 else mask.tile_mask(a, b, k_lo, k_hi, offset, q.device)
            qt = q[q0 + a : q0 + b].transpose(0, 1)[None]  # (1, H, T, D)
            kt = k[k0 + k_lo : k0 + k_hi].transpose(0, 1)[None]  # (1, Hkv, Tk, D)
            vt = v[k0 + k_lo : k0 + k_hi].transpose(0, 1)[None]
            o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=tile_mask, enable_gqa=True)
            out[q0 + a : q0 + b] = o[0].transpose(0, 1)
    return out


def _sdpa_decode(q, k, v, mask: BlockMask) -> torch.Tensor:
    """One query per row against that row's cache slots (B, Hkv, N, D), all rows in one call."""
    longest = max(mask.kv_seqlens)  # slots fill from 0 up, so only the first `longest` can be valid
    return _sdpa_slots(q, k[:, :, :longest], v[:, :, :longest], mask.key_padding(q.device))


def _sdpa_slots(q, k, v, valid: torch.Tensor | None) -> torch.Tensor:
    """q (B, H, D), one query per row, against that row's slots k, v (B, Hkv, L, D) where valid (B, 1, 1, L) is True
    (None: all of them)."""
    B, Hkv, L, D = k.shape
    H = q.shape[1]
    # The H // Hkv query heads that share a kv head become that many queries of one head: a single
    # query sees every valid slot, so there is no causal structure to break, and no kv head is copied.
    qg = q.view(B, Hkv, H // Hkv, D)
    o = F.scaled_dot_product_attention(qg, k, v, attn_mask=valid)  # (B, Hkv, H // Hkv, D)
    return o.reshape(B, H, D)
