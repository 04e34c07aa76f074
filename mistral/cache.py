"""The rolling buffer KV cache: every sequence keeps the keys/values of its last N positions only.

Each row has N slots, and position p of sequence b lives in slot p % N of row b. With N equal to the model's
window W, the buffer never grows: after W positions each new one overwrites the oldest, which no query will
read again. Reading the slots back in position order is `unrotate`.

N is the cache's and W the model's. A run that never reaches W positions needs fewer slots (N < W), and may
grow them as it goes; a model without a window needs one slot per position it will ever see. More slots
than W would keep keys that the decode step, which reads every valid slot, must not see: refused.

A model whose layers have windows of their own (args.windows) keeps, in each layer, a rolling buffer of that layer's
window: min(N, w) slots for a layer of window w, N for the widest (or one without a window). Layers of one slot count
share a buffer and the metadata of a step; each such group is a rolling cache as above, with its own window.

    windows [4, 8] over 4 layers, N=8: layers 0 and 2 keep 4 slots (window 4), layers 1 and 3 keep 8 (window 8)
    after 10 positions: layers 0, 2 hold positions 6..9 in slots [2, 3, 0, 1]; layers 1, 3 hold 2..9

Spare slots, for speculative decoding (mistral/speculate.py). A verified draft is a chunk of k + 1 positions on a row,
of which only some are kept: the row is then rewound past the others. With N = W slots, each of those k + 1 writes
overwrote a position that fell out of the window of *that* chunk's last query, but not out of the window of the
queries still to come from the rewound row. With S spare slots, N = W + S and the mask still applying W, a rewind of
up to S positions loses nothing any later query sees:

    W=4, S=2, N=6: a row at 10 positions verifies 3 tokens (positions 10, 11, 12; slots 4, 5, 0) and keeps 1
    slot 0 held position 6, overwritten by the rejected 12: the rewound row's next query, at 11, sees 8..11
    with S=0 (N=4), position 12 would have gone to slot 0, which held 8: still in that query's window, lost

A row may go back to any position it has seen while no slot of it was overwritten, and by up to S positions (from
the furthest it reached) after. Decode then reads the slots of the last W positions only (BlockMask.newest).

Letters: B batch rows, N slots per row, W the model's window, Hkv kv heads, D head_dim, S packed new tokens.
"""
from dataclasses import dataclass, field
from functools import cached_property

import torch

from mistral.attention import BlockMask
from mistral.errors import MistralError


def unrotate(n_seen: int, slots: int) -> list[int]:
    """Slots of one row in position order, oldest first, after `n_seen` positions were written.

    n_seen=6, slots=4: positions 2,3,4,5 are cached, in slots 2,3,0,1  ->  [2, 3, 0, 1]
    n_seen=3, slots=4: positions 0,1,2 in slots 0,1,2                  ->  [0, 1, 2]
    """
    return [p % slots for p in range(max(0, n_seen - slots), n_seen)]


@dataclass
class CacheMetadata:
    """Everything a forward pass needs to know about its step, computed once and shared by all layers."""

    slots: int  # N, slots per row
    positions: torch.Tensor  # (S,) absolute position of every new token, for RoPE
    mask: BlockMask  # what each new token attends to
    # True when every sequence in the step brings exactly one token: the new key is written first and
    # attention reads the slots in place, in rotated order (one query sees all of them anyway).
    decode: bool
    # chunks: which new tokens are written, the last min(q_len, N) of each sequence, and where: their flat slot
    # indices row * N + position % N. None at decode, where every new token is written and `step` says where.
    write_src: torch.Tensor | None = None
    write_dst: torch.Tensor | None = None
    # decode: cache rows of the active sequences, or None when they are rows 0..n-1 and a view suffices
    rows: torch.Tensor | None = None
    # decode: (4, n) int64, the new tokens' cache rows, slots, valid lengths (min(position + 1, N)) and positions;
    # what the CPU engine's kernels take (mistral/cpu), in one tensor
    step: torch.Tensor | None = None
    # chunks: the packed keys are, per sequence, its unrotated cache followed by its new keys
    kv_cached_src: torch.Tensor | None = None  # (C,) flat slots to read, in position order
    kv_cached_dst: torch.Tensor | None = None  # (C,) where each lands in the packed keys
    kv_new_dst: torch.Tensor | None = None  # (S,) where each new key lands; None if nothing was cached
    # The metadata of the step for the cache's narrower buffers (layers of a narrower window), by their slot count.
    narrower: dict[int, "CacheMetadata"] = field(default_factory=dict)

    def of(self, slots: int) -> "CacheMetadata":
        """The metadata for a layer whose buffer keeps `slots` per row: this, or a narrower buffer's."""
        return self if slots == self.slots else self.narrower[slots]

    # The buffers are (B, Hkv, N, D) per layer, so flat slot indices are used as (row, slot) pairs.
    @cached_property
    def write_at(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (row, slot) each written key goes to."""
        if self.decode:
            return self.step[0], self.step[1]
        return self.write_dst // self.slots, self.write_dst % self.slots

    @cached_property
    def read_at(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv_cached_src // self.slots, self.kv_cached_src % self.slots


def slots_for(reach: int, window: int | None) -> int:
    """Cache slots per row for sequences of up to `reach` positions: past the window W the buffer rolls, so a row
    needs min(reach, W) slots; without a window, reach."""
    return min(reach, window or reach)


class RotatingBufferCache:
    def __init__(self, n_layers: int, max_batch_size: int, slots: int, n_kv_heads: int, head_dim: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 windows: list[int | None] | None = None, spare: int = 0):
        """slots: N per row; the model's window W for a run that may go past it, fewer for one that never will (with
        spare slots, up to W + spare). windows: each layer's own window, for a model whose layers have their own
        (Transformer.layer_windows; None: one window for every layer, the one get_input_metadata is given): a layer of
        window w keeps min(N, w + spare). spare: slots beyond the window, so that a row can go back by that many
        positions after it wrapped (speculative decoding's rejected drafts)."""
        assert slots > 0 and max_batch_size > 0 and spare >= 0, (slots, max_batch_size, spare)
        assert windows is None or len(windows) == n_layers, (windows, n_layers)
        self.slots, self.windows = slots, None if windows is None or len(set(windows)) == 1 else list(windows)
        self.spare = spare
        self.reached = [0] * max_batch_size  # the most positions each row has written since it started
        self.max_batch_size, self.n_kv_heads, self.head_dim = max_batch_size, n_kv_heads, head_dim
        self.seq_pos = [0] * max_batch_size  # positions seen so far, per row
        self.n_layers = n_layers
        self._allocate(device, dtype)

    def layer_slots(self, slots: int) -> list[int]:
        """Each layer's slots in a cache of `slots` per row: its window's, where narrower."""
        if self.windows is None:
            return [slots] * self.n_layers
        return [slots if w is None else min(slots, w + self.spare) for w in self.windows]

    def _allocate(self, device, dtype, old: tuple[list, list] | None = None) -> None:
        """The buffers: one (L_g, B, Hkv, N_g, D) pair per slot count N_g, and each layer's views into its own. With
        `old` (each layer's keys and values), they are copied over into the first slots of the new buffers (grow)."""
        per_layer = self.layer_slots(self.slots)
        counts = sorted(set(per_layer), reverse=True)  # the widest first
        self.groups: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        try:
            for n in counts:
                shape = (per_layer.count(n), self.max_batch_size, self.n_kv_heads, n, self.head_dim)
                # (L_g, B, Hkv, N_g, D)
                self.groups[n] = (torch.zeros(shape, device=device, dtype=dtype),
                                  torch.zeros(shape, device=device, dtype=dtype))
        except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
            size = 2 * sum(per_layer) * self.max_batch_size * self.n_kv_heads * self.head_dim * (
                dtype or torch.get_default_dtype()).itemsize
            raise MistralError(f"a cache of {self.slots} slots for {self.max_batch_size} rows needs "
                               f"{size / 1e9:,.1f} GB, which cannot be allocated here "
                               f"({str(e).strip().splitlines()[0][:120]}); ask for fewer tokens or rows") from None
        taken = dict.fromkeys(counts, 0)
        self.k, self.v = [], []  # each layer's (B, Hkv, N_i, D), views into its group's buffers
        for i, n in enumerate(per_layer):
            k, v = self.groups[n]
            self.k.append(k[taken[n]])
            self.v.append(v[taken[n]])
            taken[n] += 1
            if old is not None:
                was = old[0][i].shape[2]
                self.k[i][:, :, :was] = old[0][i]
                self.v[i][:, :, :was] = old[1][i]

    @property
    def cache_k(self) -> torch.Tensor:
        """(L, B, Hkv, N, D): every layer's keys in one buffer, where the layers keep as many slots each."""
        assert len(self.groups) == 1, "the layers keep buffers of their own sizes: use .k[i]"
        return self.groups[self.slots][0]

    @property
    def cache_v(self) -> torch.Tensor:
        assert len(self.groups) == 1, "the layers keep buffers of their own sizes: use .v[i]"
        return self.groups[self.slots][1]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "RotatingBufferCache":
        old = (self.k, self.v)
        some = next(iter(self.groups.values()))[0]
        self._allocate(device or some.device, dtype or some.dtype, old=old)
        return self

    def clear(self, row: int, slots: list[int] | None = None) -> None:
        """Zero row `row`'s keys and values (only `slots`, in the widest buffer's numbering, position p % N: each
        layer zeroes p % N_i of the positions they stand for)."""
        for k, v in zip(self.k, self.v):
            n = k.shape[2]
            own = slice(None) if slots is None else sorted({s % n for s in slots})
            k[row, :, own] = 0  # (Hkv, n, D)
            v[row, :, own] = 0

    def reset(self) -> None:
        """Forget every sequence. The buffers are not cleared: no slot is read before it is written."""
        self.seq_pos = [0] * self.max_batch_size
        self.reached = [0] * self.max_batch_size

    def restart(self, row: int) -> None:
        """Row `row` starts a new sequence."""
        self.seq_pos[row] = self.reached[row] = 0

    def check_room(self, row: int, n_seen: int, window: int | None) -> None:
        """Refuse to let row `row` reach n_seen positions if that would overwrite a key still in the model's window (or
        one a rewind by the spare slots would need again)."""
        if n_seen > self.slots and (window is None or self.slots < window + self.spare):
            limit = "the model has no sliding window" if window is None else f"fewer than the window of {window}"
            raise MistralError(f"sequence {row} would reach {n_seen} positions but the cache holds {self.slots} "
                               f"({limit}): build or grow it to hold the longest sequence")

    def _furthest(self, row: int) -> int:
        """The most positions row `row` has written since it started (seq_pos, where it was set past that)."""
        return max(self.seq_pos[row], self.reached[row])

    def can_rewind(self, row: int) -> bool:
        """Whether row `row` still holds every position it has seen: it never wrapped, so no slot was overwritten (in
        any layer: a layer of a narrower window wraps first)."""
        return self._furthest(row) <= min(self.groups)

    def rewind(self, row: int, n_seen: int) -> None:
        """Forget positions n_seen.. of row `row`, to continue it from there (a conversation taking another turn, a
        rejected draft): to any position while it never wrapped, else by up to `spare` from the furthest it reached."""
        if not 0 <= n_seen <= self.seq_pos[row]:
            raise MistralError(f"cannot rewind row {row} to {n_seen} positions: it has seen {self.seq_pos[row]}")
        reached = self._furthest(row)
        if n_seen < self.seq_pos[row] and not self.can_rewind(row) and n_seen < reached - self.spare:
            raise MistralError(f"row {row} has wrapped around its {min(self.groups)} slots: positions before "
                               f"{reached - min(self.groups)} are gone, so it cannot go back to {n_seen}")
        self.reached[row] = reached
        self.seq_pos[row] = n_seen

    def grow(self, slots: int) -> None:
        """Give every row `slots` slots (each layer its window's, where narrower). Only while no row has wrapped in a
        layer that grows: each position p then sits in slot p, and stays there, since p < the old N <= the new N."""
        old_slots = self.layer_slots(self.slots)
        growing = min((n for n, m in zip(old_slots, self.layer_slots(slots)) if m != n), default=None)
        if slots < self.slots or growing is not None and any(self._furthest(b) > growing
                                                             for b in range(self.max_batch_size)):
            raise MistralError(f"cannot grow a cache of {self.slots} slots to {slots} once a row has wrapped")
        if slots == self.slots:
            return
        old, some = (self.k, self.v), next(iter(self.groups.values()))[0]
        self.slots = slots
        self._allocate(some.device, some.dtype, old=old)

    def get_input_metadata(self, seqlens: list[int], window: int | None, per_token: bool = False) -> CacheMetadata:
        """Metadata for a step in which row b brings seqlens[b] new tokens (0: nothing this step), for a model whose
        sliding window is `window` (None: it has none, and attends to every earlier position).

        per_token: the step as a decode step of one query per token, even where a row brings several (a verified
        draft, on the CPU engine): every token's key is written first, then each query reads its row's slots of its
        own last W positions. Exact where no token overwrites a slot an earlier one of its row still sees: the row
        never wraps, or brings at most spare + 1 tokens (takes_per_token).

        Worked example, a window of 4 and N=4 slots, three rows that have seen seq_pos=[0, 6, 3] positions,
        seqlens=[5, 1, 2]:
        row 0 starts its prompt with 5 tokens (more than W), row 1 decodes one token, row 2 adds a chunk of 2.

            positions      [0 1 2 3 4 | 6 | 3 4]            absolute position of each new token
            cached keys    row0: none; row1: positions 2..5 in slots [2, 3, 0, 1]; row2: 0..2 in [0, 1, 2]
            kv_cached_src  [6 7 4 5 | 8 9 10]                flat slots, row * N + slot
            packed keys    [n n n n n | c c c c n | c c c n n]   c cached, n new: kv_seqlens [5, 5, 5]
            kv_cached_dst  [5 6 7 8 | 10 11 12]
            kv_new_dst     [0 1 2 3 4 | 9 | 13 14]
            mask           BlockMask(q_seqlens=(5, 1, 2), kv_seqlens=(5, 5, 5), window=4)
            write_src      [1 2 3 4 | 5 | 6 7]               row 0 writes only its last N=4 tokens
            write_dst      [1 2 3 0 | 6 | 11 8]              position 4 of row 0 overwrites position 0

        The query at position 6 of row 1 sees positions 3..6: the cached key at position 2 is in its
        packed keys but masked, at distance exactly W. Had every row brought one token, `decode` would be
        set: the new keys are written first, to the rows and slots held in `step`, and the mask is
        BlockMask(kv_padding=N) over the raw slots.
        """
        meta = self._metadata(seqlens, window, self.slots, per_token)
        for n in self.groups:
            if n < self.slots:  # a narrower layer's buffer: a rolling cache of its own window, n - spare
                meta.narrower[n] = self._metadata(seqlens, n - self.spare, n, per_token)
        return meta

    def wraps(self, narrowest: int | None) -> bool:
        """Whether rows of this cache wrap around a layer's buffer, for a model whose narrowest layer window is
        `narrowest` (ModelArgs.narrowest): then a chunk's writes overwrite positions still in view, and only spare
        slots let a step's positions be taken back or its keys be written before its queries."""
        return narrowest is not None and self.slots >= narrowest

    def takes_per_token(self, seqlens: list[int], narrowest: int | None) -> bool:
        """Whether a step of these seqlens can run per token (get_input_metadata's per_token): where no layer's buffer
        wraps, or each row brings at most spare + 1 tokens."""
        return not self.wraps(narrowest) or all(n - 1 <= self.spare for n in seqlens)

    def _metadata(self, seqlens: list[int], window: int | None, N: int, per_token: bool = False) -> CacheMetadata:
        B = len(seqlens)
        if B > self.max_batch_size:
            raise MistralError(f"a batch of {B} sequences does not fit a cache built for {self.max_batch_size}; "
                               "pass a larger max_batch_size")
        if any(n < 0 for n in seqlens):
            raise MistralError(f"seqlens must be >= 0, got {seqlens}")
        if window is not None and N > window + self.spare:
            raise MistralError(f"the cache has {N} slots per row but the model's window is {window}"
                               f"{f' (and {self.spare} spare)' if self.spare else ''}: build it with at most "
                               f"{window + self.spare}")
        for b, n in enumerate(seqlens):
            if N == self.slots:
                self.check_room(b, self.seq_pos[b] + n, window)
        device = self.k[0].device

        def tensor(xs):
            return torch.tensor(xs, dtype=torch.long, device=device)

        active = [b for b, n in enumerate(seqlens) if n > 0]
        if active and (per_token or all(seqlens[b] == 1 for b in active)):
            entries = [(b, self.seq_pos[b] + j) for b in active for j in range(seqlens[b])]  # one per token
            owners, positions = [b for b, _ in entries], [p for _, p in entries]
            kv_seqlens, newest = tuple(min(p + 1, N) for p in positions), tuple(p % N for p in positions)
            step = tensor([owners, newest, kv_seqlens, positions])
            rows = None if owners == list(range(len(owners))) else step[0]
            mask = BlockMask((1,) * len(entries), kv_seqlens, window, kv_padding=N, newest=newest)
            return CacheMetadata(N, step[3], mask, True, rows=rows, step=step)

        positions, write_src, write_dst = [], [], []
        s = 0
        for b, n in enumerate(seqlens):
            p = self.seq_pos[b]
            positions.extend(range(p, p + n))
            kept = min(n, N)
            write_src.extend(range(s + n - kept, s + n))
            write_dst.extend(b * N + q % N for q in range(p + n - kept, p + n))
            s += n
        cached_src, cached_dst, new_dst, kv_seqlens = [], [], [], []
        k = 0
        for b, n in enumerate(seqlens):
            slots = unrotate(self.seq_pos[b], N) if n else []
            cached_src.extend(b * N + slot for slot in slots)
            cached_dst.extend(range(k, k + len(slots)))
            new_dst.extend(range(k + len(slots), k + len(slots) + n))
            kv_seqlens.append(len(slots) + n)
            k += len(slots) + n
        mask = BlockMask(tuple(seqlens), tuple(kv_seqlens), window)
        meta = CacheMetadata(N, tensor(positions), mask, False, write_src=tensor(write_src),
                             write_dst=tensor(write_dst))
        if cached_src:
            meta.kv_cached_src, meta.kv_cached_dst = tensor(cached_src), tensor(cached_dst)
            meta.kv_new_dst = tensor(new_dst)
        return meta

    def advance(self, seqlens: list[int]) -> None:
        """Record that row b has now seen seqlens[b] more positions."""
        for b, n in enumerate(seqlens):
            self.seq_pos[b] += n
            self.reached[b] = max(self.reached[b], self.seq_pos[b])

    def layer(self, i: int, meta: CacheMetadata) -> "CacheView":
        return CacheView(self.k[i], self.v[i], meta.of(self.k[i].shape[2]))


class CacheView:
    """One layer's slice of the cache, for one step."""

    def __init__(self, cache_k: torch.Tensor, cache_v: torch.Tensor, meta: CacheMetadata):
        assert cache_k.ndim == 4 and cache_k.shape[2] == meta.slots, cache_k.shape  # (B, Hkv, N, D)
        self.cache_k, self.cache_v, self.meta = cache_k, cache_v, meta

    def update(self, xk: torch.Tensor, xv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's new keys/values xk, xv (S, Hkv, D) and return the keys/values the step
        attends to: packed (Skv, Hkv, D) for chunks, the cache rows (B, Hkv, N, D) for decode."""
        meta = self.meta
        rows, slots = meta.write_at
        if meta.decode:
            self.cache_k[rows, :, slots] = xk
            self.cache_v[rows, :, slots] = xv
            if meta.rows is None:
                n = len(meta.mask.q_seqlens)
                return self.cache_k[:n], self.cache_v[:n]  # views, no copy
            return self.cache_k[meta.rows], self.cache_v[meta.rows]

        if meta.kv_cached_src is None:  # nothing cached yet: the keys are exactly the new ones
            keys, values = xk, xv
        else:
            n_kv = meta.mask.shape[1]
            keys = xk.new_empty(n_kv, *xk.shape[1:])
            values = xv.new_empty(n_kv, *xv.shape[1:])
            read_rows, read_slots = meta.read_at
            keys[meta.kv_cached_dst] = self.cache_k[read_rows, :, read_slots]  # (C, Hkv, D)
            values[meta.kv_cached_dst] = self.cache_v[read_rows, :, read_slots]
            keys[meta.kv_new_dst] = xk
            values[meta.kv_new_dst] = xv
        # Written after reading: a chunk's early queries may still need the slots it overwrites.
        self.cache_k[rows, :, slots] = xk[meta.write_src]
        self.cache_v[rows, :, slots] = xv[meta.write_src]
        return keys, values
