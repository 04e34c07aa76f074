"""What int8 and int4 weights cost in quality: cross-entropy on held-out text, and logits against the bf16 7B's.

    python -m bench.quality          # the shipped model on bench/data/heldout_shakespeare.txt (a minute)
    python -m bench.quality --7b     # and the random 7B folder of bench.mistral7b, with its int8 and int4 copies

bench/data/heldout_shakespeare.txt is the validation part of Hamlet and The Tempest that scripts/train_tiny.py holds
out (the last 5% of each work, cut at a blank line): 14 KB, 5,487 tokens that the shipped model never trained on.

Each format's cross-entropy (nats per token, every position predicting the next) is measured three ways, because
they run different code, each as a generation would run it (mistral/cpu/decoder.py): *pre-fill 512*, the text 512
tokens at a time on the rolling cache (int4 products in C with the activations rounded to int8 per group of 32; fp32
and int8 on MKL, the activations exact); *pre-fill 64*, 64 at a time (int8 products in C too, rounded as int4's); and
*decode*, the CPU engine one token per step (int4 rounded; fp32 and int8 exact).

With --7b: the logits of a 63-token prompt (pre-fill, every position) and of 8 decode steps after it, for the
int8 and int4 folders against the bf16 folder they were made from: max and mean absolute difference, and how often
the argmax differs. A random model's logits say how far the numbers move, not what that does to text.
"""
import copy
import sys
from pathlib import Path

import torch

from bench.common import ROOT, report, setup
from mistral import quantize
from mistral.cache import RotatingBufferCache
from mistral.checkpoint import load_model
from mistral.cpu import CpuDecoder
from mistral.tokenizer import Tokenizer

TEXT = ROOT / "bench" / "data" / "heldout_shakespeare.txt"
SHIPPED = ROOT / "mistral" / "assets"
CHUNKS = (512, 64)
FORMATS = {"fp32": lambda m: m, "int8": quantize.quantize_int8, "int4": quantize.quantize_int4}


def cache_for(model, slots: int) -> RotatingBufferCache:
    args = model.args
    return RotatingBufferCache(model.n_local_layers, 1, slots, args.n_kv_heads, args.head_dim,
                               windows=model.layer_windows)


@torch.no_grad()
def prefill_logits(model, ids: list[int], chunk: int, cache: RotatingBufferCache | None = None) -> torch.Tensor:
    """(len(ids), V) logits of pre-fill steps of `chunk` tokens on one row of the rolling cache (a new one unless
    given), each taken by the CPU engine where it takes it (int4 and int8 products in C), else by the model."""
    decoder = CpuDecoder.of(model)
    cache = cache or cache_for(model, model.args.window or len(ids))
    out = []
    for i in range(0, len(ids), chunk):
        step = torch.tensor(ids[i:i + chunk])
        logits = decoder.step(step, [len(step)], cache) if decoder is not None else None
        out.append(model(step, [len(step)], cache) if logits is None else logits)
    return torch.cat(out)


@torch.no_grad()
def decode_logits(model, ids: list[int], prefix: int = 0) -> torch.Tensor:
    """Logits of ids[prefix:] one decode step each, on the CPU engine, after pre-filling ids[:prefix]."""
    decoder = CpuDecoder.of(model)
    assert decoder is not None, "the CPU engine does not take this model (no C compiler?)"
    cache = cache_for(model, model.args.window or len(ids))
    out = [prefill_logits(model, ids[:prefix], prefix, cache)] if prefix else []
    for token in ids[prefix:]:
        out.append(decoder.step(torch.tensor([token]), [1], cache))
    return torch.cat(out)


def cross_entropy(logits: torch.Tensor, ids: list[int]) -> float:
    """Mean nats per token of predicting ids[1:] from the logits of ids[:-1]."""
    return torch.nn.functional.cross_entropy(logits[:-1].double(), torch.tensor(ids[1:])).item()


def shipped() -> tuple[list[dict], dict]:
    tokenizer = Tokenizer.from_folder(SHIPPED)
    ids = [tokenizer.bos_id] + tokenizer.encode(TEXT.read_text())
    base = load_model(SHIPPED, device="cpu")
    rows, ratios = [], {}
    for name, make in FORMATS.items():
        model = make(copy.deepcopy(base))
        row = {"model": "shipped", "weights": name, "tokens": len(ids)}
        for chunk in CHUNKS:
            row[f"prefill {chunk} nats/token"] = cross_entropy(prefill_logits(model, ids, chunk), ids)
        row["decode nats/token"] = cross_entropy(decode_logits(model, ids), ids)
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
    for row in rows[1:]:
        for how in [f"prefill {chunk}" for chunk in CHUNKS] + ["decode"]:
            ratios[f"shipped {row['weights']} - fp32, {how} nats/token"] = (row[f"{how} nats/token"]
                                                                            - rows[0][f"{how} nats/token"])
    return rows, ratios


def seven_b() -> tuple[list[dict], dict]:
    from bench.mistral7b import COPIES, FOLDER

    missing = [str(f) for f in (FOLDER, *COPIES.values()) if not f.exists()]
    if missing:
        sys.exit(f"{missing[0]} is not there: run python -m bench.mistral7b first, which writes it")
    tokenizer = Tokenizer.from_folder(FOLDER)
    ids = [tokenizer.bos_id] + [(7 * i + 11) % 30000 + 100 for i in range(62 + 8)]

    def logits_of(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
        model = load_model(folder, device="cpu", cache_slots=len(ids))
        return prefill_logits(model, ids[:63], 63), decode_logits(model, ids, prefix=63)[63:]

    want = logits_of(FOLDER)
    rows, ratios = [], {}
    for to, folder in COPIES.items():
        got = logits_of(folder)
        row = {"model": "random 7B", "weights": to}
        for how, g, w in zip(("prefill", "decode"), got, want):
            diff = (g - w).abs()
            row[f"{how} max |diff|"], row[f"{how} mean |diff|"] = diff.max().item(), diff.mean().item()
            row[f"{how} argmax differs"] = (g.argmax(-1) != w.argmax(-1)).double().mean().item()
            ratios[f"7B {to} {how} mean |diff| / mean |logit|"] = diff.mean().item() / w.abs().mean().item()
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
    return rows, ratios


def main() -> None:
    setup()
    rows, ratios = shipped()
    if "--7b" in sys.argv[1:]:
        more, more_ratios = seven_b()
        rows, ratios = rows + more, {**ratios, **more_ratios}
    report("quality", rows, ratios)


if __name__ == "__main__":
    main()
