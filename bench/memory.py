"""The rolling cache keeps memory flat: `python -m bench.memory`.

Generates W and then 8W tokens, each in a fresh process, and compares peak resident memory. With the
rolling buffer the KV cache is W slots whatever the length, so the two peaks should match (goal: at
most 2% apart). For contrast, the same model without a sliding window needs a cache as long as the
sequence, and its peak grows with it.
"""
import json
import subprocess
import sys

import torch

from bench.common import report, setup

# A small model, so that the KV cache is a visible fraction of memory: (L, B, Hkv, W, D) = 8 x 1 x 8 x 256 x 64,
# 8 MB for keys and values at W=256, against 26 MB of weights.
PARAMS = dict(dim=512, n_layers=8, head_dim=64, hidden_dim=512, n_heads=8, n_kv_heads=8, norm_eps=1e-5,
              vocab_size=2048, sliding_window=256, rope_theta=1e4)
W = PARAMS["sliding_window"]


def _child(window: str, n_tokens: int) -> None:
    from bench.common import random_model
    from mistral.generate import generate_ids

    setup()
    params = dict(PARAMS, sliding_window=W if window == "rolling" else None)
    model = random_model(params, max_batch_size=1)
    generate_ids([[1, 2, 3, 4]], model, max_tokens=8)  # warm up allocator and kernels
    generate_ids([[1, 2, 3, 4]], model, max_tokens=n_tokens)
    peak_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"peak_mb": peak_kib * 1024 / 1e6}))


def _run(window: str, n: int) -> float:
    out = subprocess.run([sys.executable, "-m", "bench.memory", "--child", window, str(n)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def main() -> None:
    setup()
    rows, ratios = [], {}
    for window in ("rolling", "no window"):
        peaks = {n: _run(window, n) for n in (W, 8 * W)}
        for n, mb in peaks.items():
            rows.append({"cache": f"{window} (W={W})" if window == "rolling" else window, "tokens generated": n,
                         "peak RSS MB": mb})
        ratios[f"{window}: peak 8W / peak W"] = peaks[8 * W] / peaks[W]
    report("memory", rows, ratios, {"params": PARAMS})


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], int(sys.argv[3]))
    else:
        torch.set_num_threads(1)
        main()
