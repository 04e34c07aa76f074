"""Prefill speed and how it scales with prompt length: `python -m bench.prefill [--long]`.

1. A 1024-token prompt through one forward pass (logits for every token, as both sides compute them),
   ours against HF transformers on the same weights, in fp32 and with bf16 weights, taking turns, best of
   REPS each; and the same prompt to its first generated token (generate_ids against HF's generate), where
   each side computes the output head for the last position only.
2. With --long: 2k and 16k-token prompts, pre-filled in chunks of 2048 through the rolling cache, each
   in a fresh process that reports its time and peak memory. With a window of W=256 the work per
   token is constant, so 16k should cost 8x 2k. HF runs the same prompts for contrast.
"""
import json
import subprocess
import sys
import time

import torch

from bench.common import PARAMS, hf_model, interleaved_best, random_model, report, setup, timed
from mistral.cache import RotatingBufferCache
from mistral.generate import generate_ids

PROMPT = 1024
REPS = 5
CHUNK = 2048


def ours_prefill(model, ids: torch.Tensor, chunk: int | None = None) -> None:
    with torch.inference_mode():
        if chunk is None:
            model(ids, [len(ids)])
            return
        cache = RotatingBufferCache(model.n_local_layers, 1, model.args.window, model.args.n_kv_heads,
                                    model.args.head_dim, dtype=torch.float32, windows=model.layer_windows)
        for start in range(0, len(ids), chunk):
            piece = ids[start : start + chunk]
            model(piece, [len(piece)], cache)


def hf_prefill(hf, ids: torch.Tensor) -> None:
    with torch.inference_mode():
        hf(ids[None], use_cache=True)


def _child(impl: str, length: int) -> None:
    """In a fresh process: one prefill of `length` tokens; prints seconds and peak RSS growth."""
    setup()
    model = random_model()
    ids = torch.randint(3, PARAMS["vocab_size"], (length,))
    run = (lambda: ours_prefill(model, ids, CHUNK)) if impl == "ours" else None
    if impl == "hf":
        hf = hf_model(model)
        del model
        run = lambda: hf_prefill(hf, ids)  # noqa: E731
    base = _rss_peak_kib()
    _reset_peak()
    t0 = time.perf_counter()
    run()
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "peak_growth_mb": (_rss_peak_kib() - base) * 1024 / 1e6}))


def _rss_peak_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak RSS (VmHWM) to the current RSS
        f.write("5")


def _in_child(impl: str, length: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.prefill", "--child", impl, str(length)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(long: bool) -> None:
    setup()
    model = random_model()
    ids = torch.randint(3, PARAMS["vocab_size"], (PROMPT,))
    rows, ratios = [], {}
    runs = {"fp32": timed(lambda: ours_prefill(model, ids)),
            "first token": timed(lambda: generate_ids([ids.tolist()], model, max_tokens=1))}
    hf = hf_model(model)
    if hf is not None:
        runs["hf"] = timed(lambda: hf_prefill(hf, ids))
        runs["hf first token"] = timed(lambda: hf.generate(ids[None], max_new_tokens=1, do_sample=False))
    try:
        from mistral import quantize
    except ImportError:
        quantize = None
    if quantize is not None:
        fast = quantize.bf16_weight_only(random_model().to(torch.bfloat16))
        runs["bf16"] = timed(lambda: ours_prefill(fast, ids))
    best = interleaved_best(runs, REPS)
    fp32 = best["fp32"]
    rows.append({"run": f"ours fp32, {PROMPT} tokens", "seconds": fp32, "tokens/s": PROMPT / fp32})
    if hf is not None:
        hf_s = best["hf"]
        rows.append({"run": f"HF transformers fp32, {PROMPT} tokens", "seconds": hf_s, "tokens/s": PROMPT / hf_s})
        ratios["prefill ours / HF (fp32)"] = hf_s / fp32
        rows.append({"run": f"ours, {PROMPT} tokens to the first token", "seconds": best["first token"],
                     "tokens/s": PROMPT / best["first token"]})
        rows.append({"run": f"HF generate, {PROMPT} tokens to the first token", "seconds": best["hf first token"],
                     "tokens/s": PROMPT / best["hf first token"]})
        ratios["first token ours / HF"] = best["hf first token"] / best["first token"]
        del hf, runs["hf"], runs["hf first token"]
    if quantize is not None:
        with torch.inference_mode():
            err = (fast(ids, [PROMPT]) - model(ids, [PROMPT])).abs().max().item()
        bf16 = best["bf16"]
        rows.append({"run": f"ours bf16 weights, {PROMPT} tokens", "seconds": bf16, "tokens/s": PROMPT / bf16,
                     "max |logit - fp32|": err})
        if "prefill ours / HF (fp32)" in ratios:
            ratios["prefill ours bf16 / HF fp32"] = hf_s / bf16
    if long:
        for impl in ("ours",) + (("hf",) if "prefill ours / HF (fp32)" in ratios else ()):
            res = {n: _in_child(impl, n) for n in (2048, 16384)}
            for n, r in res.items():
                rows.append({"run": f"{impl} {n} tokens" + (f", chunks of {CHUNK}" if impl == "ours" else ""),
                             "seconds": r["seconds"], "tokens/s": n / r["seconds"], "peak MB": r["peak_growth_mb"]})
            ratios[f"{impl} time 16k / 2k"] = res[16384]["seconds"] / res[2048]["seconds"]
            ratios[f"{impl} peak memory 16k / 2k"] = res[16384]["peak_growth_mb"] / res[2048]["peak_growth_mb"]
    report("prefill", rows, ratios, {"prompt": PROMPT, "chunk": CHUNK, "window": PARAMS["sliding_window"]})


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], int(sys.argv[3]))
    else:
        main(long="--long" in sys.argv)
