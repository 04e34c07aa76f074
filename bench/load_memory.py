"""Peak memory while loading a model folder, as a ratio to the size of the loaded weights.

    python -m bench.load_memory

Builds a random ~400 MB fp32 model (dim 768, 8 layers, vocab 32000) in a temporary folder, in the native
layout (safetensors and .pth) and, through checkpoint.convert, the HF layout. Each load runs in a fresh
process, so the number is not flattered or spoiled by what this one allocated: the child records its
resident memory, resets the kernel's high-water mark, loads, and reports (peak - before) / weight bytes.
1.0 is the floor (the model itself); the goal is <= 1.2.

Two rows are for contrast: a cold process, which also pays torch's one-time meta-kernel imports (about
75 MB, whatever the model's size), and a plain loader that copies each tensor out of safetensors' mmap,
whose file pages then count as resident too (about 2x).

Writes bench/results/load_memory.json.
"""
import dataclasses
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "load_memory.json"
PARAMS = dict(dim=768, n_layers=8, head_dim=64, hidden_dim=2048, n_heads=12, n_kv_heads=4, norm_eps=1e-5,
              vocab_size=32000, sliding_window=256, rope_theta=1e4)
GOAL = 1.2


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _child(folder: str, dtype_name: str, how: str, warm: str) -> None:
    """Runs in the fresh process: load once and print one JSON line."""
    import torch
    from safetensors import safe_open

    from mistral.checkpoint import load_model, read_args
    from mistral.device import DTYPES
    from mistral.model import Transformer

    dtype, args = DTYPES[dtype_name], read_args(Path(folder))
    if warm == "warm":
        # The first model a process builds on the meta device imports torch's meta kernels: about 75 MB,
        # once per process whatever the model's size. Pay it with a 1-layer model so that the ratio
        # measures what loading costs in proportion to the weights.
        with torch.device("meta"):
            Transformer(dataclasses.replace(args, n_layers=1))
    before_kib = _status_kib("VmRSS")
    try:
        # Writing 5 resets VmHWM to the current RSS, so the peak below is the peak of the load alone.
        Path("/proc/self/clear_refs").write_text("5")
        method = "VmHWM after clear_refs"
    except OSError:
        before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # peak so far: a lower bound on overhead
        method = "ru_maxrss delta"
    start = time.perf_counter()
    if how == "load_model":
        model = load_model(folder, device="cpu", dtype=dtype)
    else:
        # What a plain loader does: allocate the model, then copy each tensor from safetensors' mmap.
        with torch.device("meta"):
            model = Transformer(args)
        model = model.to_empty(device="cpu").to(dtype)
        with safe_open(Path(folder) / "consolidated.safetensors", framework="pt") as f, torch.no_grad():
            for name, t in model.state_dict().items():
                t.copy_(f.get_tensor(name))
    seconds = time.perf_counter() - start
    if method.startswith("VmHWM"):
        peak_kib = _status_kib("VmHWM")
    else:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    weights = sum(t.nbytes for t in model.state_dict().values())
    print(json.dumps({"weights_bytes": weights, "rss_before_bytes": before_kib * 1024,
                      "peak_rss_bytes": peak_kib * 1024, "ratio": (peak_kib - before_kib) * 1024 / weights,
                      "load_s": seconds, "method": method}))


def _build(folder: Path) -> dict[str, Path]:
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import random_model, save_folder

    from mistral import checkpoint

    model = random_model(PARAMS)
    native = save_folder(model, folder / "native")
    pth = save_folder(model, folder / "pth", fmt="pth")
    del model
    return {"native": native, "pth": pth, "hf": checkpoint.convert(native, folder / "hf", to="hf")}


def main() -> None:
    runs = [  # (layout, folder, dtype, loader, process)
        ("native (safetensors)", "native", "fp32", "load_model", "warm"),
        ("native (.pth)", "pth", "fp32", "load_model", "warm"),
        ("hf", "hf", "fp32", "load_model", "warm"),
        ("native (safetensors)", "native", "bf16", "load_model", "warm"),
        ("hf", "hf", "bf16", "load_model", "warm"),
        ("native (safetensors), cold process", "native", "fp32", "load_model", "cold"),
        ("reference: safe_open + get_tensor + copy", "native", "fp32", "safe_open", "warm"),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        print("building a random model ...", file=sys.stderr)
        folders = _build(Path(tmp))
        for label, kind, dtype, how, warm in runs:
            command = [sys.executable, "-m", "bench.load_memory", "--child", str(folders[kind]), dtype, how, warm]
            out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
            rows.append({"layout": label, "dtype": dtype, **json.loads(out.stdout.strip().splitlines()[-1])})

    print(f"{'layout':42} {'dtype':5} {'weights MB':>10} {'peak-before MB':>15} {'ratio':>6} {'load s':>7}")
    for r in rows:
        print(f"{r['layout']:42} {r['dtype']:5} {r['weights_bytes'] / 1e6:10.1f} "
              f"{(r['peak_rss_bytes'] - r['rss_before_bytes']) / 1e6:15.1f} {r['ratio']:6.3f} {r['load_s']:7.2f}")
    ours = [r for r in rows if not r["layout"].startswith("reference") and "cold" not in r["layout"]]
    print("ratios: " + ", ".join(f"{r['layout']} {r['dtype']} {r['ratio']:.2f}" for r in ours)
          + f" (goal <= {GOAL}; {'met' if all(r['ratio'] <= GOAL for r in ours) else 'NOT met'})")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"params": PARAMS, "goal": GOAL, "python": platform.python_version(),
                                   "torch": __import__("torch").__version__, "machine": platform.machine(),
                                   "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        _child(*sys.argv[2:])
    else:
        main()
