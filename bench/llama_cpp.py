"""llama.cpp beside us on the random Mistral 7B, in one run: Q8_0 against our int8 folder, Q4_0 against our int4.

    python -m bench.llama_cpp        # after python -m bench.mistral7b, which writes the folders

llama.cpp is built, and the GGUF copies made, by the anchor script ($LLAMA_CPP_SH, default ../shared/anchors/
llama_cpp.sh beside this repository: about 15 minutes to build once, from the llama-cpp-python sdist). The GGUF
files are converted from an HF copy of the same bf16 folder (`python -m main convert --to hf`), all under
$MISTRAL_BENCH_DIR (default ~/.cache/mistral-bench), never in git: 14.5 + 7.7 + 4.1 GB.

Rounds alternate llama-bench and our bench.mistral7b child on each format, twice, with the memory bandwidth measured
before each round, so every pair of figures comes from the same minutes. llama-bench: 2 threads, pre-fill 63 and
512 tokens (pp), 16 generated (tg), 2 repetitions each. Ours: pre-fill of 63 and 512 tokens to the first token,
decode of 8 tokens at batch 1, after one forward has touched the mapped weights.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

from bench.common import ROOT, read_time, report, setup
from bench.mistral7b import COPIES, FOLDER, HOME, run_child

SCRIPT = Path(os.environ.get("LLAMA_CPP_SH", ROOT.parent / "shared" / "anchors" / "llama_cpp.sh"))
HF = HOME / "mistral-7b-random-hf"
GGUF = {"int8": (HOME / "mistral-7b-random-q8_0.gguf", "q8_0"), "int4": (HOME / "mistral-7b-random-q4_0.gguf", "q4_0")}
ROUNDS = 2


def anchor(*args: str) -> str:
    done = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{SCRIPT} {' '.join(args)} failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    return done.stdout


def llama_bench(gguf: Path) -> dict:
    """llama-bench's pre-fill and decode rates on one file. LLAMA_BENCH=<binary> runs that build instead of the anchor
    script's (where its -march=native build cannot run: see docs/performance-diary.md on AMX)."""
    flags = ["-t", "2", "-p", "63,512", "-n", "16", "-r", "2", "-o", "json"]
    if os.environ.get("LLAMA_BENCH"):
        done = subprocess.run([os.environ["LLAMA_BENCH"], "-m", str(gguf), *flags], capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{os.environ['LLAMA_BENCH']} failed on {gguf.name}: {done.stderr.strip().splitlines()[-1:]}")
        records = json.loads(done.stdout)
    else:
        records = json.loads(anchor("bench", str(gguf), *flags))
    out = {}
    for r in records:
        key = f"prefill {r['n_prompt']} tokens/s" if r["n_prompt"] else "decode tokens/s"
        out[key] = r["avg_ts"]
    return out


def main() -> None:
    setup()
    if not SCRIPT.exists():
        sys.exit(f"no llama.cpp anchor script at {SCRIPT}: set LLAMA_CPP_SH")
    missing = [str(f) for f in (FOLDER, *COPIES.values()) if not f.exists()]
    if missing:
        sys.exit(f"{missing[0]} is not there: run python -m bench.mistral7b first, which writes it")
    anchor("build")
    if not HF.exists():
        from mistral.checkpoint import convert
        convert(FOLDER, HF, to="hf")
    for gguf, kind in GGUF.values():
        if not gguf.exists():
            anchor("gguf", str(HF), str(gguf), kind)
    rows = []
    for round_ in range(1, ROUNDS + 1):
        for to, folder in COPIES.items():
            gguf, kind = GGUF[to]
            bandwidth = 4e9 / read_time(int(4e9), repeat=2) / 1e9
            theirs = {"round": round_, "engine": "llama.cpp", "format": kind.upper(),
                      "size GB": gguf.stat().st_size / 1e9,
                      "bandwidth GB/s": bandwidth, **llama_bench(gguf)}
            ours = run_child(folder, [])
            size = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e9
            ours = {"round": round_, "engine": "ours", "format": to, "size GB": size, "bandwidth GB/s": bandwidth,
                    **{k: ours.get(k, float("nan")) for k in ("prefill 63 tokens/s", "prefill 512 tokens/s",
                                                              "decode tokens/s")}}
            rows += [theirs, ours]
            print(theirs, ours, sep="\n", file=sys.stderr, flush=True)
    ratios = {}
    for to in COPIES:
        pairs = [(t, o) for t, o in zip(rows[::2], rows[1::2]) if o["format"] == to]
        for key in ("prefill 63 tokens/s", "prefill 512 tokens/s", "decode tokens/s"):
            values = [o[key] / t[key] for t, o in pairs]
            name = f"ours {to} / llama.cpp {GGUF[to][1].upper()} {key.removesuffix(' tokens/s')}"
            ratios[name] = sum(values) / len(values)
    report("llama_cpp", rows, ratios)


if __name__ == "__main__":
    main()
