"""Draw the README's pictures into docs/images/ from the library's own masks and cache.

    pip install -e ".[viz]" && python scripts/make_figures.py
"""
from pathlib import Path

from mistral.attention import BlockMask
from mistral.explain import EMPTY, pyplot, draw_mask, draw_slots, draw_step_mask, walk

OUT = Path(__file__).resolve().parent.parent / "docs" / "images"
WORDS = "This is an example of how the rolling buffer cache works".split()
W = 4


def word(p: int) -> str:
    return "" if p == EMPTY else WORDS[p]


def sliding_window(plt):
    """The same sequence under a causal mask and under a sliding window of W."""
    n = len(WORDS)
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.6))
    for ax, window, title in [(axes[0], None, "causal: every earlier token"),
                              (axes[1], W, f"sliding window, W={W}: the last {W} tokens")]:
        draw_mask(ax, BlockMask((n,), (n,), window).materialize(), [0] * n, [0] * n, WORDS, WORDS, title=title)
    fig.tight_layout()
    return fig


def rolling_cache(plt):
    """One sequence fed a token per step: position p goes to slot p % W and overwrites position p - W."""
    steps = walk([1], W, decode_steps=len(WORDS) - 1)
    rows = [(f"after {word(s.query_pos[0])!r}", 0, s.slots[0], s.written[0], s.unrotated(0)) for s in steps]
    fig, ax = plt.subplots(figsize=(6.6, 3.4))
    draw_slots(ax, rows, word, width=2.5, title=f"rolling buffer cache, W={W} (dark: the slot just written)")
    fig.tight_layout()
    return fig


def chunked_prefill(plt):
    """A prompt longer than W read in chunks of W: each chunk sees its unrotated cache, then itself."""
    steps = walk([len(WORDS)], W, chunk_size=W)
    fig, axes = plt.subplots(1, len(steps), figsize=(8, 2.7), width_ratios=[len(s.key_pos) for s in steps])
    for i, (ax, step) in enumerate(zip(axes, steps), 1):
        draw_step_mask(ax, step, word, title=f"chunk {i}")
        ax.set_xlabel("cache slots after: " + " | ".join(map(word, step.slots[0])), fontsize=7)
        ax.set_anchor("N")  # the shorter last chunk lines up at the top
    fig.suptitle(f"chunked pre-fill, W={W}: each chunk attends to the unrotated cache (left of the dashed line), "
                 "then to itself", fontsize=8)
    fig.tight_layout()
    return fig


def main():
    plt = pyplot()
    OUT.mkdir(parents=True, exist_ok=True)
    for make in [sliding_window, rolling_cache, chunked_prefill]:
        fig = make(plt)
        path = OUT / f"{make.__name__}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        print(f"{path} ({path.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
