"""Decode speed at the memory roofline: `python -m bench.decode`.

Batch-1 decode must read every weight once per token, so the time of one read of the weights (a sum
over as many bytes, measured in the same run, averaged over as many reads as a run has steps) bounds it.
Reports fp32 ms/token against that roofline and against HF transformers' generate on the same weights,
three packed sequences against one, the bf16-weight and int8 paths of mistral.quantize where present,
and how much of an fp32 and of an int8 step is spent outside the C kernels (the per-step overhead; the
rest gives the ratio int8 would reach with none). Every run and the roofline take turns, REPS times, and
the best of each counts (the machine is shared; see interleaved_best).
"""
import time

import torch

from bench.common import hf_model, interleaved_best, random_model, read_time, report, setup, weight_bytes
from mistral.cpu import kernels
from mistral.generate import generate_ids

PROMPT_LEN, STEPS, REPS = 16, 96, 5


def decode_stamps(model, batch: int = 1, steps: int = STEPS) -> list[float]:
    """perf_counter() at each of row 0's generated tokens: steps + 1 of them, after a PROMPT_LEN prompt."""
    prompts = [[(7 * i + 13 * b) % model.args.vocab_size + 3 for i in range(PROMPT_LEN)] for b in range(batch)]
    stamps = []

    def on_token(row, token):
        if row == 0:
            stamps.append(time.perf_counter())

    generate_ids(prompts, model, max_tokens=steps + 1, on_token=on_token)
    return stamps


def ours_ms_per_token(model, batch: int = 1, steps: int = STEPS) -> float:
    """Steady-state ms per decode step of one run: the time between a row's first and last generated token."""
    stamps = decode_stamps(model, batch, steps)
    return (stamps[-1] - stamps[0]) / steps * 1e3


def outside_kernels_ms_per_token(model) -> float:
    """What a step of ours_ms_per_token spends outside the engine's C calls (mistral/cpu/kernels.c: the blocks, the
    final norm, the head and the greedy pick): the embedding, the cache's bookkeeping, and the Python and torch
    dispatch around it all."""
    assert kernels.available(), "the C kernels are not built"
    real, calls = kernels.load(), []  # calls: (start, seconds) of every C call

    class Timed:
        def __getattr__(self, name):
            fn = getattr(real, name)

            def call(*args):
                t0 = time.perf_counter()
                fn(*args)
                calls.append((t0, time.perf_counter() - t0))
            return call

    load = kernels.load
    kernels.load = lambda: timed
    timed = Timed()
    try:
        stamps = decode_stamps(model)
    finally:
        kernels.load = load
    inside = sum(seconds for t0, seconds in calls if stamps[0] <= t0 < stamps[-1])
    return (stamps[-1] - stamps[0] - inside) / STEPS * 1e3


def hf_ms_per_token(hf, steps: int = STEPS) -> float:
    """ms per decode step of HF's generate in one run: the time of steps + 1 new tokens less that of 1."""
    ids = torch.arange(3, 3 + PROMPT_LEN)[None]

    def run(n):
        t0 = time.perf_counter()
        with torch.inference_mode():
            hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - t0

    return (run(steps + 1) - run(1)) / steps * 1e3


def main() -> None:
    setup()
    model = random_model()
    n_bytes = weight_bytes(model)
    runs = {"fp32": lambda: ours_ms_per_token(model), "fp32 x3": lambda: ours_ms_per_token(model, batch=3),
            "roofline": lambda: read_time(n_bytes, repeat=1, reads=STEPS) * 1e3}
    if kernels.available():
        runs["outside kernels"] = lambda: outside_kernels_ms_per_token(model)
    try:
        from mistral import quantize
    except ImportError:
        quantize = None
    labels = {"bf16": "bf16 weights", "int8": "int8 weights"}
    if quantize is not None:
        fast = {"bf16": _bf16(quantize, random_model()), "int8": _int8(quantize, random_model())}
        runs.update({name: (lambda m=m: ours_ms_per_token(m)) for name, m in fast.items()})
        if kernels.available():
            runs["int8 outside kernels"] = lambda: outside_kernels_ms_per_token(fast["int8"])
    hf = hf_model(model)
    if hf is not None:
        runs["hf"] = lambda: hf_ms_per_token(hf)
    best = interleaved_best(runs, REPS)
    roof, fp32, batched = best["roofline"], best["fp32"], best["fp32 x3"]
    rows, ratios = [], {}
    rows.append({"path": "ours fp32, batch 1", "ms/token": fp32, "tokens/s": 1e3 / fp32, "x roofline": fp32 / roof})
    ratios["fp32 decode / roofline"] = fp32 / roof
    if "hf" in best:
        hf_ms = best["hf"]
        rows.append({"path": "HF transformers fp32 (sdpa)", "ms/token": hf_ms, "tokens/s": 1e3 / hf_ms,
                     "x roofline": hf_ms / roof})
        ratios["HF / ours fp32"] = hf_ms / fp32
    rows.append({"path": "ours fp32, 3 packed rows", "ms/token": batched, "tokens/s": 3e3 / batched,
                 "x roofline": batched / roof})
    ratios["tokens/s 3 rows / 1 row"] = 3 * fp32 / batched
    if "outside kernels" in best:
        rows.append({"path": "ours fp32, time outside the C kernels", "ms/token": best["outside kernels"],
                     "x roofline": best["outside kernels"] / roof})
        ratios["(fp32 - outside kernels) / roofline"] = (fp32 - best["outside kernels"]) / roof
    for name, label in labels.items():
        if name in best:
            ms = best[name]
            rows.append({"path": f"ours {label}, batch 1", "ms/token": ms, "tokens/s": 1e3 / ms,
                         "x roofline": ms / roof})
            ratios[f"fp32 / {label} decode"] = fp32 / ms
    if "int8 outside kernels" in best:
        rows.append({"path": "ours int8 weights, time outside the C kernels", "ms/token": best["int8 outside kernels"],
                     "x roofline": best["int8 outside kernels"] / roof})
        # What int8 would gain with no overhead at all: the C kernels' time alone (best runs), fp32 against int8.
        ratios["fp32 / int8 weights, C kernels only"] = ((fp32 - best["outside kernels"])
                                                         / (best["int8"] - best["int8 outside kernels"]))
    print(f"weights {n_bytes / 1e6:.0f} MB fp32; one read of them takes {roof:.1f} ms "
          f"({n_bytes / roof / 1e6:.1f} GB/s): the batch-1 roofline")
    report("decode", rows, ratios, {"weights_bytes": n_bytes, "roofline_ms": roof, "prompt_len": PROMPT_LEN,
                                    "steps": STEPS, "reps": REPS})


def _bf16(quantize, model):
    return quantize.bf16_weight_only(model.to(torch.bfloat16))


def _int8(quantize, model):
    return quantize.quantize_int8(model)


if __name__ == "__main__":
    main()
