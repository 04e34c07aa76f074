"""Pictures of the attention masks and the rolling buffer cache, drawn from the library's own metadata.

`explain` walks one generation of a packed batch through a real RotatingBufferCache, step by step, the
way generate_ids and the model drive it, and shows for every step the mask (BlockMask.materialize()),
the slots of each sequence, and the unrotated view the next step reads. Nothing here re-derives a mask
or a slot, so the pictures change whenever the cache does.

The trick: the cache has head_dim 1 and every token's key is its own position. The keys a step gets
back from CacheView.update then name exactly the positions it attends to, and the buffer holds
positions instead of numbers.
"""
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mistral.cache import CacheMetadata, RotatingBufferCache, unrotate
from mistral.errors import MistralError
from mistral.generate import Row, plan_step

EMPTY = -1  # what a slot that was never written holds


@dataclass
class Step:
    """One forward pass: what each sequence fed, which keys it saw, and the cache afterwards."""

    seqlens: list[int]  # (B,) new tokens per sequence; 0 sits the step out
    seen: list[int]  # (B,) positions each sequence had seen before the step (cache.seq_pos)
    meta: CacheMetadata
    mask: torch.Tensor  # (S, Skv) bool, meta.mask.materialize()
    query_seq: list[int]  # (S,) sequence of each query
    query_pos: list[int]  # (S,) position of each query
    key_seq: list[int]  # (Skv,) sequence each key belongs to
    key_pos: list[int]  # (Skv,) position each key holds; EMPTY for a padding slot
    slots: list[list[int]]  # (B, W) position each slot holds after the step
    written: list[set[int]]  # (B,) slots written this step

    def unrotated(self, b: int) -> list[int]:
        """Slots of sequence b in position order: what its next chunk attends to before its own keys."""
        return unrotate(self.seen[b] + self.seqlens[b], len(self.slots[b]))


def schedule(prompt_lens: list[int], chunk_size: int | None, decode_steps: int) -> list[list[int]]:
    """New tokens per sequence for every step, as generate_ids feeds them with max_tokens=decode_steps + 1: the same
    Row objects, each sampling token 0.

    Each sequence feeds its next chunk of at most chunk_size prompt tokens (None: the whole prompt), then
    one generated token per step; a short prompt starts decoding while the others still pre-fill.
    prompt_lens [5, 7, 2], chunk_size 4, decode_steps 1  ->  [[4, 4, 2], [1, 3, 1], [1, 1, 0]]
    """
    rows = [Row([0] * n, decode_steps + 1) for n in prompt_lens]
    steps = []
    while (plan := plan_step(rows, chunk_size)).inputs:
        steps.append(plan.seqlens)
        for b in plan.owners:
            rows[b].take(0, 0.0, new=True)
    return steps


def walk(prompt_lens: list[int], window: int, chunk_size: int | None = None, decode_steps: int = 0) -> list[Step]:
    """Run the schedule through a real RotatingBufferCache and record every step."""
    B, W = len(prompt_lens), window
    cache = RotatingBufferCache(n_layers=1, max_batch_size=B, slots=W, n_kv_heads=1, head_dim=1)
    cache.cache_k.fill_(EMPTY)
    steps = []
    for seqlens in schedule(prompt_lens, chunk_size, decode_steps):
        seen = list(cache.seq_pos)
        meta = cache.get_input_metadata(seqlens, W)
        new = meta.positions.float().view(-1, 1, 1)  # (S, Hkv, D): each new key is its own position
        keys, _ = cache.layer(0, meta).update(new, new)  # (Skv, Hkv, D), laid out as meta.mask says
        cache.advance(seqlens)

        active = [b for b, n in enumerate(seqlens) if n]
        key_seq = []
        for b, (_, _, _, kv) in zip(active, meta.mask.blocks):
            key_seq += [b] * (meta.mask.kv_padding or kv)  # decode: each sequence owns W raw slots
        written = [set() for _ in range(B)]
        for row, slot in zip(*(t.tolist() for t in meta.write_at)):
            written[row].add(slot)
        steps.append(Step(
            seqlens=seqlens, seen=seen, meta=meta, mask=meta.mask.materialize(),
            query_seq=[b for b in active for _ in range(seqlens[b])], query_pos=meta.positions.tolist(),
            key_seq=key_seq, key_pos=keys.view(-1).long().tolist(),
            slots=cache.cache_k[0, :, 0, :, 0].long().tolist(), written=written))
    return steps


KINDS = {  # the three paths a step can take through the cache, and what each means
    "first pre-fill": "the keys are the new tokens themselves",
    "chunk": "each sequence attends to its unrotated cache, then its new tokens",
    "decode": "the new key is written first, then each query reads its W slots in place (rotated order)",
}


def kind(step: Step) -> str:
    """Which of KINDS the step is."""
    if step.meta.decode:
        return "decode"
    if not any(step.seen[b] for b, n in enumerate(step.seqlens) if n):
        return "first pre-fill"
    return "chunk"


def describe(step: Step, prompt_lens: list[int]) -> str:
    """What each sequence feeds this step, e.g. 'seq 0 prompt pos 4..7 | seq 1 generated pos 2 | seq 2 idle'."""
    parts = []
    for b, (p, n) in enumerate(zip(step.seen, step.seqlens)):
        if n == 0:
            parts.append(f"seq {b} idle")
        elif p < prompt_lens[b]:
            parts.append(f"seq {b} prompt pos {p}..{p + n - 1}" if n > 1 else f"seq {b} prompt pos {p}")
        else:
            parts.append(f"seq {b} generated pos {p}")
    return " | ".join(parts)


def _pos(p: int) -> str:
    return "-" if p == EMPTY else str(p)


def render_mask(step: Step) -> str:
    """The mask as a character grid: the query's sequence digit where it sees a key, '.' where not."""
    w = max(len(_pos(p)) for p in step.key_pos + step.query_pos)
    def label(b, p):
        return f"  query seq {b} pos {p:>{w}} |"

    def head(name, xs):
        return f"{name} |".rjust(len(label(0, 0))) + " " + " ".join(str(x).rjust(w) for x in xs)

    lines = [head("key seq", step.key_seq), head("pos", map(_pos, step.key_pos))]
    if step.meta.decode:  # the keys are the raw slots, so say which
        lines.append(head("slot", [k % step.meta.mask.kv_padding for k in range(len(step.key_pos))]))
    for row, b, p in zip(step.mask.tolist(), step.query_seq, step.query_pos):
        lines.append(label(b, p) + " " + " ".join((str(b) if seen else ".").rjust(w) for seen in row))
    return "\n".join(lines)


def render_cache(step: Step) -> str:
    """Each sequence's slots after the step ('*' = written this step), and its unrotated view."""
    W = len(step.slots[0])
    w = max(len(_pos(p)) for row in step.slots for p in row)
    slots = " ".join(f"{s:>{w}} " for s in range(W))
    lines = ["cache slot |".rjust(21) + " " + slots + "  unrotated: the next step reads"]
    for b, row in enumerate(step.slots):
        cells = " ".join(f"{_pos(p):>{w}}" + ("*" if s in step.written[b] else " ") for s, p in enumerate(row))
        order = step.unrotated(b)
        lines.append(f"seq {b} pos |".rjust(21) + f" {cells}  slots {order} = positions {[row[s] for s in order]}")
    return "\n".join(lines)


# explain prints every step of a walk meant to be read: lengths beyond this are for the model, not for the eye.
MOST = 256


def _out_folder(out) -> Path:
    """The folder --out names, made if need be and checked to take files, or a one-line error."""
    if not isinstance(out, str) or not out.strip():
        raise MistralError(f"--out must name a folder, got {out!r}")
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise MistralError(f"--out {out!r} is a file; name a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".explain-can-write"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise MistralError(f"cannot write the pictures in {out!r} ({e.strerror})") from None
    return folder


def parse_seqlens(seqlens: str | int | list[int] | tuple[int, ...]) -> list[int]:
    """'5,7,2', 5 or (5, 7, 2) -> [5, 7, 2]: the command line passes text, a library caller any of them."""
    if isinstance(seqlens, str):
        items = seqlens.split(",")
    else:
        items = seqlens if isinstance(seqlens, (list, tuple)) else [seqlens]
    # 0 stands for anything that is not a whole number, so one check below rejects it too
    lens = [int(x) if isinstance(x, int) or (isinstance(x, str) and x.strip().isdigit()) else 0 for x in items]
    if not 1 <= len(lens) <= 10 or min(lens) <= 0 or max(lens) > MOST:
        raise MistralError(f"seqlens must be 1 to 10 prompt lengths from 1 to {MOST}, like 5,7,2, got {seqlens!r}")
    return lens


def explain(seqlens: str | int | list[int] | tuple[int, ...] = "5,7,2", sliding_window: int = 3,
            chunk_size: int | None = 4, decode_steps: int = 3, out: str | None = None) -> None:
    """Print every step of generating prompts of these lengths, packed in one sequence: the mask each
    step uses and the rolling buffer after it. With out=DIR, also write step_N.png and overview.png."""
    prompt_lens = parse_seqlens(seqlens)
    checks = [("sliding_window", sliding_window, 1), ("decode_steps", decode_steps, 0)]
    for name, value, lo in checks + ([("chunk_size", chunk_size, 1)] if chunk_size is not None else []):
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= MOST:
            raise MistralError(f"{name} must be a whole number from {lo} to {MOST}, got {value!r}")
    if out is not None:
        folder = _out_folder(out)
        plt = pyplot()  # fail before printing pages of text
    steps = walk(prompt_lens, sliding_window, chunk_size, decode_steps)

    print(f"{len(prompt_lens)} prompts of {prompt_lens} tokens packed in one sequence, window W={sliding_window}, "
          f"chunk_size={chunk_size}, decode_steps={decode_steps} (generated tokens fed back per sequence).")
    print(f"A query at position p sees the keys at p-{sliding_window - 1}..p of its own sequence. "
          "Grid: row = query, column = key; its sequence digit where it sees the key, '.' where not.")
    for i, step in enumerate(steps, 1):
        print(f"\nstep {i}/{len(steps)}, {kind(step)}: {KINDS[kind(step)]}")
        print(f"  {describe(step, prompt_lens)}")
        print(render_mask(step))
        print(render_cache(step))

    if out is not None:
        try:
            for i, step in enumerate(steps, 1):
                fig = plot_steps(plt, [step], first=i)
                fig.savefig(folder / f"step_{i}.png", dpi=80)
                plt.close(fig)
            fig = plot_steps(plt, steps)
            fig.savefig(folder / "overview.png", dpi=80)
            plt.close(fig)
        except OSError as e:  # a full disk, say
            raise MistralError(f"writing the pictures in {folder} failed ({e.strerror})") from None
        print(f"\nwrote {len(steps)} step images and overview.png to {folder}")


# --- matplotlib drawing, shared with scripts/make_figures.py ---

def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise MistralError('pictures need matplotlib: pip install -e ".[viz]"') from None
    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt
    return plt


def color(b: int, light: bool = False) -> tuple[float, float, float]:
    """The colour of sequence b; light for the background of cells that are not the point."""
    from matplotlib import colormaps
    r, g, bl, _ = colormaps["tab10"](b % 10)
    return (0.75 + 0.25 * r, 0.75 + 0.25 * g, 0.75 + 0.25 * bl) if light else (r, g, bl)


def draw_mask(ax, mask: torch.Tensor, query_seq: list[int], key_seq: list[int], query_labels: list[str],
              key_labels: list[str], cached: list[bool] | None = None, title: str = "") -> None:
    """A (S, Skv) bool mask: visible cells in their query's sequence colour, masked ones white.
    Solid lines part the sequences' keys; a dashed one parts keys read from the cache (cached) from new ones."""
    S, Skv = mask.shape
    rgb = torch.ones(S, Skv, 3)
    for i, b in enumerate(query_seq):
        rgb[i, mask[i]] = torch.tensor(color(b), dtype=torch.float)
    ax.imshow(rgb.numpy(), interpolation="nearest")
    ax.set_xticks(range(Skv), key_labels, rotation=90, fontsize=7)
    ax.set_yticks(range(S), query_labels, fontsize=7)
    ax.set_xticks([x - 0.5 for x in range(Skv + 1)], minor=True)
    ax.set_yticks([y - 0.5 for y in range(S + 1)], minor=True)
    ax.grid(which="minor", color="0.85", linewidth=0.5)
    ax.tick_params(which="both", length=0)
    for k in range(1, Skv):
        if key_seq[k] != key_seq[k - 1]:
            ax.axvline(k - 0.5, color="0.2", linewidth=1.2)
        elif cached and cached[k - 1] and not cached[k]:
            ax.axvline(k - 0.5, color="0.2", linewidth=1, linestyle="--")
    ax.set_xlabel("keys (left of a dashed line: read from the cache)" if cached and any(cached) else "keys", fontsize=7)
    ax.set_title(title, fontsize=8, loc="left")


def draw_step_mask(ax, step: Step, label: Callable[[int], str] = _pos, title: str = "") -> None:
    """draw_mask for a step; label(position) names the ticks."""
    cached = [not step.meta.decode and 0 <= p < step.seen[b] for b, p in zip(step.key_seq, step.key_pos)]
    seq = (lambda b: f"seq {b}: ") if len(step.slots) > 1 else (lambda b: "")
    draw_mask(ax, step.mask, step.query_seq, step.key_seq, [seq(b) + label(p) for b, p in
              zip(step.query_seq, step.query_pos)], [label(p) for p in step.key_pos], cached, title)


def draw_slots(ax, rows: list[tuple[str, int, list[int], set[int], list[int]]],
               label: Callable[[int], str] = _pos, width: float = 1, title: str = "") -> None:
    """Rows of slots, each (name, colour index, position per slot, slots just written, unrotated order).
    Slots just written are in full colour; to their right the row's unrotated view, oldest first.
    label(position) is a cell's text; width is a cell's width in heights, for words."""
    from matplotlib.patches import Rectangle

    W = len(rows[0][2])

    def cell(x, y, text, face):
        ax.add_patch(Rectangle(((x - 0.5) * width, y - 0.5), width, 1, facecolor=face, edgecolor="0.3", linewidth=0.8))
        ax.text(x * width, y, text, ha="center", va="center", fontsize=7)

    for y, (name, c, slots, written, order) in enumerate(rows):
        for s, p in enumerate(slots):
            cell(s, y, label(p), color(c) if s in written else color(c, light=True))
        for x, s in enumerate(order):
            cell(W + 1 + x, y, label(slots[s]), "white")
        ax.text(-0.6 * width, y, name, ha="right", va="center", fontsize=7)
    for s in range(W):
        ax.text(s * width, -0.65, str(s), ha="center", fontsize=7)
    ax.text(-0.6 * width, -0.65, "slot", ha="right", fontsize=7)
    ax.text((W + 0.5 + W / 2) * width, -0.65, "unrotated, oldest first", ha="center", fontsize=7)
    ax.set_xlim(-0.5 * width - 1.7, (2 * W + 0.6) * width)
    ax.set_ylim(len(rows) - 0.4, -1.2)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(title, fontsize=8)


def draw_cache(ax, step: Step) -> None:
    """The slots of every sequence after a step."""
    rows = [(f"seq {b}", b, slots, step.written[b], step.unrotated(b)) for b, slots in enumerate(step.slots)]
    draw_slots(ax, rows, title="cache after the step\n(dark: just written)")


def plot_steps(plt, steps: list[Step], first: int = 1):
    """One row per step, numbered from `first`: its mask on the left, the cache after it on the right."""
    W, B = len(steps[0].slots[0]), len(steps[0].slots)
    widest = max(len(s.key_pos) for s in steps)
    heights = [max(len(s.query_pos), B) + 2.5 for s in steps]  # in mask cells: ticks and title take ~2.5
    cell = 0.22  # inches per mask cell
    fig, axes = plt.subplots(len(steps), 2, squeeze=False, width_ratios=[widest + 4, 2 * W + 3],
                             height_ratios=heights, figsize=(cell * (widest + 2 * W + 9), cell * sum(heights)))
    for i, (step, (left, right)) in enumerate(zip(steps, axes), first):
        draw_step_mask(left, step, title=f"step {i}: {kind(step)}")
        draw_cache(right, step)
        left.set_anchor("W")  # masks of different widths line up on the left
    fig.tight_layout()
    return fig
