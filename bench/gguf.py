"""GGUF files as users download them, each run by us and by llama.cpp, in the same minutes.

    python -m bench.gguf                      # the random 7B as Q4_K_M, Q6_K, Q8_0 and Q4_0, and the shipped model
    python -m bench.gguf --only q4_k_m,q4_0   # some of the 7B files; --rounds 2 alternates twice
    python -m bench.gguf --quality-only       # the shipped model's files alone (bench/results/gguf-quality.json)

The files are what llama.cpp's own tools make of an HF folder (the anchor script, $LLAMA_CPP_SH: convert_hf_to_gguf.py,
then llama-quantize), from the HF copy of bench.mistral7b's random bf16 folder, under $MISTRAL_BENCH_DIR (default
~/.cache/mistral-bench), never in git. For each file, alternating: llama-bench on it (2 threads, pre-fill 63 and 512
tokens, 16 generated, 2 repetitions) and ours on it (bench.mistral7b's child: load, then pre-fill 63 and 512 tokens to
the first token, and decode at batch 1); then `python -m main demo FILE`'s peak RSS, against the file's size + 1.5 GB.

Quality: the shipped model (convert --to hf, then the anchor script to each type) run from each file with its window
of 64, and its cross-entropy on bench/data/heldout_shakespeare.txt against its fp32 folder's, pre-fill 512 at a time
and decode (bench.quality's measures). Its files are kept under a name from a hash of its weights, so a retrained model
is converted afresh.
"""
import argparse
import hashlib
import sys
from pathlib import Path

from bench.common import read_time, report, setup
from bench.llama_cpp import SCRIPT, anchor, llama_bench
from bench.mistral7b import FOLDER, HOME, demo_peak_rss, run_child

HF = HOME / "mistral-7b-random-hf"
TYPES = ("q4_k_m", "q6_k", "q8_0", "q4_0")
RSS_MARGIN_GB = 1.5  # the bound: peak RSS under the file's size plus this


def gguf_of(hf: Path, kind: str, home: Path = HOME) -> Path:
    """hf's GGUF copy of type `kind`, made by the anchor script if it is not there yet."""
    path = home / f"{hf.name.removesuffix('-hf')}-{kind}.gguf"
    if not path.exists():
        print(f"making {path.name} with llama.cpp's tools", file=sys.stderr, flush=True)
        anchor("gguf", str(hf), str(path), kind)
    return path


def speed(kinds: list[str], rounds: int) -> tuple[list[dict], dict]:
    if not FOLDER.exists():
        sys.exit(f"{FOLDER} is not there: run python -m bench.mistral7b first, which writes it")
    if not HF.exists():
        from mistral.checkpoint import convert
        convert(FOLDER, HF, to="hf")
    files = {kind: gguf_of(HF, kind) for kind in kinds}
    rows = []
    for round_ in range(1, rounds + 1):
        for kind, path in files.items():
            bandwidth = 4e9 / read_time(int(4e9), repeat=2) / 1e9
            common = {"round": round_, "file": kind.upper(), "size GB": path.stat().st_size / 1e9,
                      "bandwidth GB/s": bandwidth}
            theirs = {**common, "engine": "llama.cpp", **llama_bench(path)}
            ours = run_child(path, [])
            if "error" in ours:
                sys.exit(f"ours on {path.name}: {ours['error']}")
            ours = {**common, "engine": "ours", "weights": ours["weights"], "load s": ours["load s"],
                    **{k: ours[k] for k in ("prefill 63 tokens/s", "prefill 512 tokens/s", "decode tokens/s")}}
            rows += [theirs, ours]
            print(theirs, ours, sep="\n", file=sys.stderr, flush=True)
    ratios = {}
    for kind in kinds:
        pairs = [(t, o) for t, o in zip(rows[::2], rows[1::2]) if t["file"] == kind.upper()]
        for key in ("prefill 63 tokens/s", "prefill 512 tokens/s", "decode tokens/s"):
            ratios[f"{kind.upper()} ours / llama.cpp {key.removesuffix(' tokens/s')}"] = (
                sum(o[key] / t[key] for t, o in pairs) / len(pairs))
    for kind, path in files.items():  # one demo each, as a new user runs it: peak RSS against the bound
        rss, how = demo_peak_rss(path, [])
        size = path.stat().st_size / 1e9
        rows.append({"file": kind.upper(), "engine": "ours", "size GB": size, "demo peak RSS GB": rss,
                     "bound GB": size + RSS_MARGIN_GB, "demo": how})
        ratios[f"{kind.upper()} demo peak RSS / (file + {RSS_MARGIN_GB} GB)"] = rss / (size + RSS_MARGIN_GB)
    return rows, ratios


def quality(kinds: list[str]) -> tuple[list[dict], dict]:
    """The shipped model's cross-entropy from each GGUF file, against its fp32 folder."""
    from bench.quality import SHIPPED, TEXT, cross_entropy, decode_logits, prefill_logits
    from mistral.checkpoint import convert, load_model, read_args
    from mistral.tokenizer import Tokenizer

    digest = hashlib.sha256((SHIPPED / "consolidated.safetensors").read_bytes()).hexdigest()[:12]
    home = HOME / f"shipped-gguf-{digest}"
    home.mkdir(parents=True, exist_ok=True)
    hf = home / "shipped-hf"
    if not hf.exists():
        convert(SHIPPED, hf, to="hf")
    tokenizer = Tokenizer.from_folder(SHIPPED)
    ids = [tokenizer.bos_id] + tokenizer.encode(TEXT.read_text())
    window = read_args(SHIPPED).sliding_window
    rows = []
    for name, path in [("fp32 folder", SHIPPED)] + [(k.upper(), gguf_of(hf, k, home)) for k in kinds]:
        model = load_model(path, device="cpu", **({} if path == SHIPPED else {"sliding_window": window}))
        row = {"model": "shipped", "weights": name, "tokens": len(ids),
               "prefill 512 nats/token": cross_entropy(prefill_logits(model, ids, 512), ids),
               "decode nats/token": cross_entropy(decode_logits(model, ids), ids)}
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
    ratios = {f"shipped {r['weights']} - fp32, {how} nats/token": r[f"{how} nats/token"] - rows[0][f"{how} nats/token"]
              for r in rows[1:] for how in ("prefill 512", "decode")}
    return rows, ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(TYPES), help="which 7B files, comma-separated")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--no-quality", action="store_true")
    parser.add_argument("--quality-only", action="store_true")
    opts = parser.parse_args()
    setup()
    if not SCRIPT.exists():
        sys.exit(f"no llama.cpp anchor script at {SCRIPT}: set LLAMA_CPP_SH")
    anchor("build")
    kinds = [k for k in opts.only.split(",") if k]
    unknown = [k for k in kinds if k not in TYPES]
    if unknown:
        sys.exit(f"--only: {unknown[0]!r} is not one of {', '.join(TYPES)}")
    if opts.quality_only:
        report("gguf-quality", *quality(list(TYPES)))
        return
    rows, ratios = speed(kinds, opts.rounds)
    if not opts.no_quality:
        more_rows, more = quality(list(TYPES))
        rows, ratios = rows + more_rows, ratios | more
    report("gguf", rows, ratios)


if __name__ == "__main__":
    main()
