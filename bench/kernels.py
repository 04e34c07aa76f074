"""The linear kernels of decoding, one weight matrix at a time, and a whole decode step, vs fp32.

    python -m bench.kernels

For each weight shape of the benchmark model (dim 768, hidden 2048, 12 heads x 64, 4 kv heads, vocab
32000), at M = 1 and M = 3 rows: ms per call and GB/s of weight bytes for mistral.cpu.kernels's kernel on fp32,
bf16 (Bf16Linear) and int8 (Int8Linear) weights, and for contrast torch's own: fp32 F.linear (MKL), eager
bf16 F.linear, and torch._weight_int8pack_mm (what Int8Linear falls back to without the kernel). Every call reads
a different copy of its weights, 128 MB of copies per kernel, so the weights come from memory as they do in a real
decode and not from the 32 MB L3 cache.
The kernels take turns within each repetition and the best of REPS passes counts, because the machine
is shared and noisy. The memory bandwidth (a sum over 400 MB of fp32, best of 5) is measured in the same
run, and the load average is printed, since a busy neighbour changes every number here.

Then the whole model: ms per decode step with 1 and 3 rows, and a 512-token pre-fill (the three models
taking turns, best of REPS), for the fp32 model,
quantize_int8 and bf16_weight_only (weights rounded to bf16, then run in fp32 activations), and how far the
latter two's logits are from fp32's. The weights are random (nn.Linear's initialization), not trained ones.

Writes bench/results/kernels.json.
"""
import copy
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import interleaved_best
from mistral.cpu import CpuDecoder, kernels
from mistral.cache import RotatingBufferCache
from mistral.model import ModelArgs, Transformer
from mistral.quantize import Int8Linear, bf16_weight_only, quantize_int8

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "kernels.json"
PARAMS = dict(dim=768, n_layers=8, head_dim=64, hidden_dim=2048, n_heads=12, n_kv_heads=4, norm_eps=1e-5,
              vocab_size=32000, sliding_window=256, rope_theta=1e4)
# (N, K) of each weight and how many of it one decode step reads: wq, wk and wv, wo, w1 and w3, w2, output.
SHAPES = {"wq": (768, 768), "wk/wv": (256, 768), "w1/w3": (2048, 768), "w2": (768, 2048), "output": (32000, 768)}
PER_TOKEN = {"wq": 8 * 2, "wk/wv": 8 * 2, "w1/w3": 8 * 2, "w2": 8, "output": 1}  # wq counts wo too
COPY_BYTES = 128e6
REPS = 5
KERNELS = ["fp32 kernel", "fp32 MKL", "bf16 kernel", "bf16 eager", "int8 kernel", "int8 eager"]
BYTES_PER_WEIGHT = {"fp32 kernel": 4, "fp32 MKL": 4, "bf16 kernel": 2, "bf16 eager": 2, "int8 kernel": 1,
                    "int8 eager": 1}


def bandwidth_gbs() -> float:
    """GB/s of one sum() over 400 MB of fp32, best of 5."""
    big = torch.ones(100_000_000)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        big.sum()
        best = min(best, time.perf_counter() - t)
    return big.numel() * 4 / best / 1e9


def make_calls(name: str, N: int, K: int, M: int) -> list:
    """Zero-argument calls of kernel `name`, each on its own copy of an (N, K) weight."""
    # Eager bf16 can take milliseconds per call: half the copies, still twice the L3 cache.
    total = COPY_BYTES / 2 if name == "bf16 eager" else COPY_BYTES
    copies = max(2, int(total // (N * K * BYTES_PER_WEIGHT[name])))
    x = torch.randn(M, K)
    calls = []
    for _ in range(copies):
        w = torch.randn(N, K) * K ** -0.5
        if name == "fp32 kernel":
            calls.append(lambda w=w: kernels.matvec(x, w))
        elif name == "fp32 MKL":
            calls.append(lambda w=w: F.linear(x, w))
        elif name == "bf16 eager":
            w, xb = w.bfloat16(), x.bfloat16()
            calls.append(lambda w=w: F.linear(xb, w))
        elif name == "bf16 kernel":
            calls.append(lambda w=w.bfloat16(): kernels.matvec(x, w))
        elif name == "int8 kernel":
            q = Int8Linear.from_linear(torch.nn.Linear(K, N, bias=False))
            calls.append(lambda q=q: kernels.matvec(x, q.weight, q.scales))
        else:
            q = Int8Linear.from_linear(torch.nn.Linear(K, N, bias=False))
            xb, scales = x.bfloat16(), q.scales.bfloat16()
            calls.append(lambda w=q.weight: torch._weight_int8pack_mm(xb, w, scales))
    return calls


def time_kernels(M: int) -> dict:
    """{shape: {kernel: best ms per call}}, the kernels interleaved within each repetition."""
    out = {}
    for shape, (N, K) in SHAPES.items():
        calls = {name: make_calls(name, N, K, M) for name in KERNELS}
        for fs in calls.values():  # warm-up
            fs[0]()
        best = {name: float("inf") for name in KERNELS}
        for _ in range(REPS):
            for name, fs in calls.items():
                t = time.perf_counter()
                for f in fs:
                    f()
                best[name] = min(best[name], (time.perf_counter() - t) / len(fs) * 1e3)
        out[shape] = best
        del calls
    return out


def decode_time(model: Transformer, rows: int, steps: int = 16, prompt: int = 64) -> float:
    """ms per decode step of `rows` sequences after a `prompt`-token pre-fill each, one run, each step on the CPU
    engine as generate runs it (a forward per step, without generate's sampling)."""
    cache = RotatingBufferCache(model.n_local_layers, rows, PARAMS["sliding_window"], PARAMS["n_kv_heads"],
                                PARAMS["head_dim"], dtype=model.dtype)
    model(torch.randint(0, PARAMS["vocab_size"], (rows * prompt,)), [prompt] * rows, cache)
    decoder = CpuDecoder.of(model)
    assert decoder is not None, "the CPU engine does not take this model"
    t = time.perf_counter()
    for _ in range(steps):
        decoder.step(torch.randint(0, PARAMS["vocab_size"], (rows,)), [1] * rows, cache)
    return (time.perf_counter() - t) / steps * 1e3


def prefill_time(model: Transformer, tokens: int = 512) -> float:
    """ms for one `tokens`-token pre-fill without a cache, one run."""
    ids = torch.randint(0, PARAMS["vocab_size"], (tokens,))
    t = time.perf_counter()
    model(ids, [tokens])
    return (time.perf_counter() - t) * 1e3


def models() -> dict[str, Transformer]:
    """The same random model three ways."""
    torch.manual_seed(0)
    fp32 = Transformer(ModelArgs.from_dict(dict(PARAMS)), max_batch_size=3).eval()
    return {"fp32": fp32, "int8": quantize_int8(copy.deepcopy(fp32)),
            "bf16 weights": bf16_weight_only(copy.deepcopy(fp32).bfloat16())}


def logit_error(model: Transformer, fp32: Transformer, tokens: int = 256) -> dict:
    """max |logits - fp32 logits| / std(fp32 logits) over one random `tokens`-token sequence, and how often the
    argmax agrees."""
    ids = torch.randint(0, PARAMS["vocab_size"], (tokens,), generator=torch.Generator().manual_seed(1))
    want, got = fp32(ids, [tokens]), model(ids, [tokens])
    return {"max_abs_over_std": ((got - want).abs().max() / want.std()).item(),
            "argmax_agreement": (got.argmax(-1) == want.argmax(-1)).float().mean().item()}


def main() -> None:
    load_before = os.getloadavg()
    bw = bandwidth_gbs()
    print(f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads, load average {load_before[0]:.2f}")
    print(f"memory bandwidth (sum over 400 MB fp32, best of 5): {bw:.1f} GB/s")
    results = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
               "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
               "bandwidth_gbs": bw, "kernels": {}, "per_token_ratio_vs_fp32": {}, "model": {}}
    with torch.inference_mode():
        for M in (1, 3):
            times = time_kernels(M)
            print(f"\nM = {M}: ms per call (GB/s of weight bytes)")
            print(f"{'shape':8} {'N x K':>11} " + " ".join(f"{k:>19}" for k in KERNELS))
            for shape, best in times.items():
                N, K = SHAPES[shape]
                cells = [f"{best[k]:8.3f} ({N * K * BYTES_PER_WEIGHT[k] / best[k] / 1e6:5.1f})" for k in KERNELS]
                print(f"{shape:8} {f'{N}x{K}':>11} " + " ".join(f"{c:>19}" for c in cells))
            per_token = {k: sum(PER_TOKEN[s] * times[s][k] for s in SHAPES) for k in KERNELS}
            ratios = {k: per_token["fp32 kernel"] / per_token[k] for k in KERNELS}
            results["kernels"][f"M={M}"] = {s: {k: {"ms": t[k], "weight_gbs": SHAPES[s][0] * SHAPES[s][1] *
                                                     BYTES_PER_WEIGHT[k] / t[k] / 1e6} for k in KERNELS}
                                            for s, t in times.items()}
            results["per_token_ratio_vs_fp32"][f"M={M}"] = ratios
            print(f"M = {M}, speed-up vs the fp32 kernel over one token's linears (8 layers + head): "
                  + ", ".join(f"{k} {r:.2f}x" for k, r in ratios.items() if k != "fp32 kernel"))

        print("\nwhole model (dim 768, 8 layers, vocab 32000): ms per decode step, ms per 512-token pre-fill")
        ms = models()
        runs = {(name, what): fn for name, model in ms.items() for what, fn in (
            ("decode_1_row_ms", lambda m=model: decode_time(m, 1)),
            ("decode_3_rows_ms", lambda m=model: decode_time(m, 3)),
            ("prefill_512_ms", lambda m=model: prefill_time(m)))}
        best = interleaved_best(runs, REPS)  # the three models take turns: their ratios compare runs seconds apart
        for name in ms:
            row = {what: t for (n, what), t in best.items() if n == name}
            results["model"][name] = row
            print(f"{name:13} decode 1 row {row['decode_1_row_ms']:7.2f}  3 rows {row['decode_3_rows_ms']:7.2f}  "
                  f"pre-fill {row['prefill_512_ms']:8.1f}")
        fp = results["model"]["fp32"]
        for name in ("int8", "bf16 weights"):
            r = results["model"][name]
            r["speedup_vs_fp32"] = {k: fp[k] / r[k] for k in fp if k.endswith("_ms")}
            r["logit_error_vs_fp32"] = err = logit_error(ms[name], ms["fp32"])
            print(f"{name} vs fp32: " + ", ".join(f"{k[:-3]} {v:.2f}x" for k, v in r["speedup_vs_fp32"].items())
                  + f"; logits max |diff| {err['max_abs_over_std']:.3f} std, argmax agrees "
                  f"{100 * err['argmax_agreement']:.1f}% of 256 positions")
    load_after = os.getloadavg()
    results["load_average_before_after"] = [load_before[0], load_after[0]]
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    kr, mr = results["per_token_ratio_vs_fp32"], results["model"]
    print("ratios vs the fp32 kernel: one token's linears at M=1 "
          + ", ".join(f"{k} {v:.2f}x" for k, v in kr["M=1"].items() if k != "fp32 kernel")
          + f"; whole decode step, 1 row: int8 {mr['int8']['speedup_vs_fp32']['decode_1_row_ms']:.2f}x, "
          f"bf16 weights {mr['bf16 weights']['speedup_vs_fp32']['decode_1_row_ms']:.2f}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
