"""Mistral 7B on this machine: memory, load time, pre-fill and decode for each way of loading it.

    python -m bench.mistral7b            # builds the random 7B folder first if it is not there (~2 min, 14.5 GB)
    python -m bench.mistral7b int4-folder --quantize-int4   # only these paths (written to mistral7b-partial.json)

The checkpoint is random but Mistral-7B-shaped: Mistral-7B-v0.1's params.json, 14.5 GB of bf16 in four
consolidated-0000i-of-00004.safetensors shards, and the real v1 tokenizer (from mistral_common's wheel). It is
written, seeded, to $MISTRAL_BENCH_DIR (default ~/.cache/mistral-bench), outside the repository, with int8 and int4
copies made by `python -m main quantize` beside it.

Each path runs in a fresh process, so its peak RSS is its own: `defaults` (the bf16 weights mapped from the file,
fp32 arithmetic), `--quantize int8` and `--quantize int4` (quantized from the file as it loads) and the int8 and
int4 folders. For each: load time
from a cold page cache (the files' pages dropped with posix_fadvise) and a warm one, pre-fill of a 63- and a
512-token prompt (time to the first token), decode at batch 1, and the peak RSS of `python -m main demo` with those
flags. The memory bandwidth (a sum over 4 GB) is measured in the same run: decode can be no faster than it allows over
the bytes of weights a token reads. Pre-fill is compute-bound, so each pre-fill is set against fp32 MKL products of
the model's shapes at as many rows (one layer's seven products times 32, and the head's row), timed in the same process
just before and just after it, the faster of the two: what fp32 products alone allow in that minute.
"""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import ROOT, interleaved_best, read_time, report, setup, timed

PARAMS = {"dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32, "n_kv_heads": 8,
          "norm_eps": 1e-05, "vocab_size": 32000, "sliding_window": 4096, "rope_theta": 10000.0}
HOME = Path(os.environ.get("MISTRAL_BENCH_DIR", Path.home() / ".cache" / "mistral-bench"))
FOLDER = HOME / "mistral-7b-random"
COPIES = {to: HOME / f"mistral-7b-random-{to}" for to in ("int8", "int4")}
PATHS = {"defaults": (FOLDER, []), "--quantize int8": (FOLDER, ["--quantize", "int8"]),
         "int8 folder": (COPIES["int8"], []), "--quantize int4": (FOLDER, ["--quantize", "int4"]),
         "int4 folder": (COPIES["int4"], [])}
PROMPTS = (63, 512)
DECODE_STEPS = 16  # as llama-bench -n 16


def build() -> None:
    """The random folder, one shard at a time (a few GB of memory), a layer's tensors drawn in order from one seed."""
    from safetensors.torch import save_file

    import mistral_common
    from mistral.model import ModelArgs, Transformer

    tmp = FOLDER.with_name(FOLDER.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    args = ModelArgs.from_dict(dict(PARAMS))
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Transformer(args).state_dict().items()}
    names = list(shapes)
    shards = [names[i * len(names) // 4 : (i + 1) * len(names) // 4] for i in range(4)]
    gen = torch.Generator().manual_seed(0)
    for i, shard in enumerate(shards, 1):
        state = {}
        for name in shard:
            shape = shapes[name]
            if name.endswith("norm.weight"):
                state[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:  # std 1/sqrt(fan-in): activations keep their scale through the layers, as trained weights do
                state[name] = (torch.randn(shape, generator=gen) * shape[-1] ** -0.5).to(torch.bfloat16)
        save_file(state, str(tmp / f"consolidated-{i:05d}-of-00004.safetensors"))
        print(f"  shard {i} of 4 written", file=sys.stderr, flush=True)
    (tmp / "params.json").write_text(json.dumps(PARAMS, indent=2))
    (tmp / "tokenizer.model").write_bytes((Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1")
                                          .read_bytes())
    tmp.rename(FOLDER)


def drop_page_cache(folder: Path) -> None:
    """Evict a folder's files from the page cache, so the next read of them comes from the disk."""
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def child(folder: str, flags: list[str]) -> None:
    """One path in a process of its own: load, pre-fill each prompt, decode; prints a JSON line."""
    from mistral import cli
    from mistral import terminal
    from mistral.generate import generate_ids

    setup()
    quantize = flags[flags.index("--quantize") + 1] if "--quantize" in flags else None
    t0 = time.perf_counter()
    model, tokenizer = cli.load(folder, max_batch_size=1, num_pipeline_ranks=1, device="cpu", dtype="auto",
                                 quantize=quantize, needs=lambda args, _: (max(PROMPTS) + DECODE_STEPS, max(PROMPTS)))
    out = {"load s": time.perf_counter() - t0, "weights": terminal.describe(model)}
    # What a decode step reads: every weight but the embedding table, of which it reads a row.
    out["bytes per token"] = sum(t.numel() * t.element_size() for name, t in model.state_dict().items()
                                 if not name.startswith("tok_embeddings"))
    prompt = [tokenizer.bos_id] + [(7 * i + 11) % 30000 + 100 for i in range(max(PROMPTS))]
    # Mapped weights are read from the disk (or mapped from the page cache) by the first forward that touches
    # them, not by the load: that is part of the time to the first token, and kept out of the pre-fill rates.
    times = []
    generate_ids([prompt[:PROMPTS[0]]], model, max_tokens=1,
                 on_token=lambda row, tok: times.append(time.perf_counter()))
    out["first token s"] = times[0] - t0
    layer = fp32_layer()
    for n in PROMPTS:
        times, before = [], fp32_products(layer, n)
        t1 = time.perf_counter()
        generate_ids([prompt[:n]], model, max_tokens=1, on_token=lambda row, tok: times.append(time.perf_counter()))
        out[f"prefill {n} tokens/s"] = n / (times[0] - t1)
        out[f"fp32 products {n} tokens/s"] = max(before, fp32_products(layer, n))
    times = []
    generate_ids([prompt[:8]], model, max_tokens=DECODE_STEPS + 1,
                 on_token=lambda row, tok: times.append(time.perf_counter()))
    out["decode tokens/s"] = DECODE_STEPS / (times[-1] - times[0])
    print(json.dumps(out), flush=True)


def run_child(folder: Path, flags: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-m", "bench.mistral7b", "--child", str(folder), *flags], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def demo_peak_rss(folder: Path, flags: list[str]) -> tuple[float, str]:
    """Peak RSS (GB) of `python -m main demo FOLDER FLAGS`, as a new user runs it (from the demo's own summary
    line), and how it ended."""
    done = subprocess.run([sys.executable, "-m", "main", "demo", str(folder), *flags], cwd=ROOT, capture_output=True,
                          text=True)
    last = (done.stderr.strip().splitlines() or [""])[-1]
    found = re.search(r"peak memory ([\d,]+) MB", last)
    return (float(found[1].replace(",", "")) / 1e3 if found else float("nan")), ("ok" if done.returncode == 0 else last)


def fp32_layer() -> list[torch.Tensor]:
    """Random fp32 weights of one layer's seven matrices and of the head (1.4 GB)."""
    D, F, KV = PARAMS["dim"], PARAMS["hidden_dim"], PARAMS["n_kv_heads"] * PARAMS["head_dim"]
    shapes = ((D, D), (KV, D), (KV, D), (D, D), (F, D), (F, D), (D, F), (PARAMS["vocab_size"], D))
    return [torch.randn(n, k) * 0.01 for n, k in shapes]


def fp32_products(layer: list[torch.Tensor], rows: int) -> float:
    """Tokens/s that fp32 MKL products alone allow at `rows` rows: one layer's seven products, times 32, and the
    head's product for one row; the best of three."""
    D = PARAMS["dim"]
    x, h = torch.randn(rows, D), torch.randn(rows, PARAMS["hidden_dim"])

    def step():
        for w in layer[:7]:
            torch.nn.functional.linear(h if w.shape[1] != D else x, w)

    best = interleaved_best({"layer": timed(step), "head": timed(lambda: torch.nn.functional.linear(x[-1:], layer[7]))},
                            reps=3)
    return rows / (best["layer"] * PARAMS["n_layers"] + best["head"])


def main_bench(only: list[str]) -> None:
    """only: path names with dashes for spaces (int4-folder, --quantize-int4); empty for all of them."""
    names = {name.replace(" ", "-"): name for name in PATHS}
    unknown = [n for n in only if n not in names]
    if unknown:
        sys.exit(f"unknown path {unknown[0]!r}; the paths are {', '.join(names)}")
    paths = {names[n]: PATHS[names[n]] for n in only} or PATHS
    setup()
    if not FOLDER.exists():
        print(f"writing the random 7B folder to {FOLDER} (about 2 minutes, 14.5 GB)", file=sys.stderr)
        build()
    for to, copy in COPIES.items():
        if not copy.exists() and any(folder == copy for folder, _ in paths.values()):
            subprocess.run([sys.executable, "-m", "main", "quantize", str(FOLDER), str(copy), "--to", to], cwd=ROOT,
                           check=True)
    bandwidth = 4e9 / read_time(int(4e9), repeat=3)
    rows, bytes_per_token, notes = [], [], {"bandwidth GB/s": bandwidth / 1e9}
    for name, (folder, flags) in paths.items():
        drop_page_cache(folder)
        cold = run_child(folder, flags)
        warm = run_child(folder, flags)
        rss, ended = demo_peak_rss(folder, flags)
        row = {"path": name, "weights": warm.get("weights", ""), "load cold s": cold.get("load s", float("nan")),
               "to 1st token cold s": cold.get("first token s", float("nan")),
               "load warm s": warm.get("load s", float("nan")),
               "to 1st token warm s": warm.get("first token s", float("nan"))}
        for key in ("prefill 63 tokens/s", "prefill 512 tokens/s", "fp32 products 63 tokens/s",
                    "fp32 products 512 tokens/s", "decode tokens/s"):
            row[key] = warm.get(key, float("nan"))
        row["demo peak RSS GB"], row["demo"] = rss, ended
        rows.append(row)
        bytes_per_token.append(warm.get("bytes per token", float("nan")))
        print(row, file=sys.stderr, flush=True)
    if paths is PATHS:
        rss, ended = demo_peak_rss(FOLDER, ["--dtype", "fp32"])
        notes["demo --dtype fp32"] = ended
    ratios = {}
    for row in rows:
        for n in PROMPTS:
            ratios[f"{row['path']} prefill {n} / fp32 products"] = (row[f"prefill {n} tokens/s"]
                                                                    / row[f"fp32 products {n} tokens/s"])
    for row, per_token in zip(rows, bytes_per_token):
        ratios[f"{row['path']} decode / bandwidth limit"] = row["decode tokens/s"] * per_token / bandwidth
    report("mistral7b" if paths is PATHS else "mistral7b-partial", rows, ratios, notes)
    print(f"bandwidth {bandwidth / 1e9:.1f} GB/s")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], sys.argv[3:])
    else:
        main_bench(sys.argv[1:])
