"""Shared by the benchmarks: the benchmark model, rooflines measured in the same run, HF loading, reports."""
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from mistral.model import ModelArgs, Transformer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# The model of issue 6: ~100M parameters, 398 MB in fp32.
PARAMS = dict(dim=768, n_layers=8, head_dim=64, hidden_dim=2048, n_heads=12, n_kv_heads=4, norm_eps=1e-5,
              vocab_size=32000, sliding_window=256, rope_theta=1e4)


def setup() -> None:
    """One thread per physical core: more threads do not help a bandwidth-bound decode."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    torch.manual_seed(0)


def random_model(params: dict = PARAMS, seed: int = 0, max_batch_size: int = 3) -> Transformer:
    """Random weights at a realistic scale (std 0.02, norms at 1), fp32."""
    torch.manual_seed(seed)
    model = Transformer(ModelArgs.from_dict(dict(params)), max_batch_size=max_batch_size)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(std=0.02)
    return model.eval()


def save_native(model: Transformer, folder: Path) -> Path:
    import dataclasses
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    params = {k: v for k, v in dataclasses.asdict(model.args).items() if v is not None}
    (folder / "params.json").write_text(json.dumps(params))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "consolidated.safetensors"))
    return folder


def hf_model(model: Transformer):
    """The same weights in HF transformers' MistralForCausalLM (sdpa), or None without transformers."""
    try:
        import transformers
    except ImportError:
        return None
    from mistral.checkpoint import convert

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        native = save_native(model, Path(tmp) / "native")
        hf = convert(native, Path(tmp) / "hf", to="hf")
        cls = transformers.MixtralForCausalLM if model.args.moe else transformers.MistralForCausalLM
        out = cls.from_pretrained(hf, dtype=torch.float32, attn_implementation="sdpa").eval()
    out.generation_config.eos_token_id = None
    out.generation_config.pad_token_id = 0
    return out


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def read_time(n_bytes: int, repeat: int = 7, reads: int = 1) -> float:
    """Seconds to read n_bytes once from memory (sums over as many bytes): the decode roofline. The best of `repeat`
    tries, each the mean of `reads` reads in a row: a figure compared with the mean step of a decode run should
    average as long a stretch, since the best single read catches the machine's quietest instant and a run of
    steps never does."""
    x = torch.ones(n_bytes // 4)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(reads):
            x.sum()
        best = min(best, (time.perf_counter() - t0) / reads)
    return best


def interleaved_best(runs: dict, reps: int) -> dict:
    """{name: the smallest value runs[name]() returned}, the runs taking turns in each of `reps` repetitions
    after one warm-up each. The machine is shared and its speed drifts over minutes, so runs that are
    compared must be made seconds apart, not one after the other's whole series."""
    for run in runs.values():
        run()
    best = {name: float("inf") for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            best[name] = min(best[name], run())
    return best


def timed(fn):
    """A run for interleaved_best that returns fn's duration in seconds."""
    def run():
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return run


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    out = {"cpu": cpu, "isa": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
        out["cuda"] = torch.version.cuda
    return out


def report(name: str, rows: list[dict], ratios: dict[str, float], notes: dict | None = None,
           path: Path | None = None) -> None:
    """Print rows as a table and a final line of ratios; write everything to bench/results/NAME.json (or path)."""
    cols = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[_fmt(row.get(c, "")) for c in cols] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    m = machine()
    where = f"{m['gpu']}, CUDA {m['cuda']}" if "gpu" in m else f"{m['cpu']} ({m['isa']}), {m['threads']} threads"
    print(f"# {name} on {where}, torch {m['torch']}")
    print(" | ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("-|-".join("-" * w for w in widths))
    for r in cells:
        print(" | ".join(v.ljust(w) for v, w in zip(r, widths)))
    print("ratios: " + ", ".join(f"{k} = {v:.2f}" if abs(v) >= 0.1 else f"{k} = {v:+.4f}" for k, v in ratios.items()))
    path = path or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": m, "rows": rows, "ratios": ratios, "notes": notes or {}}, indent=2) + "\n")


def _fmt(v) -> str:
    return f"{v:,.3g}" if isinstance(v, float) and abs(v) < 100 else f"{v:,.0f}" if isinstance(v, float) else str(v)
