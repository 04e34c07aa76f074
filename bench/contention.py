"""Decode speed when another process keeps a core busy: `python -m bench.contention [--reps N]`.

People run models on laptops where something else always runs. The engine's C kernels split each product between
the threads and meet at a barrier after it; a thread that shares its core with a busy process is descheduled for a
scheduler slice now and then, and every barrier waits for it. This bench decodes with the engine on one thread, on
all of them (2 here), and as it runs by default (whichever of the two has been faster lately,
mistral/cpu/threads.py, learnt afresh in each run, as in a new process: the cost of learning is in the figure), on
a quiet machine and with a busy loop (a plain `while True`
at normal priority, in a process of its own) on the side; the conditions and counts take turns, REPS times, and each
figure is the median of its runs.

Models: the shipped model (mistral/assets, 5.6M parameters, fp32) and the 100M bench model (fp32 and int8 weights);
with --7b also the random Mistral-7B-shaped int4 folder of bench.mistral7b (made first if it is not there: a few
minutes and 18 GB of disk under ~/.cache/mistral-bench).
"""
import argparse
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager

import torch

from bench.common import ROOT, random_model, report, setup
from mistral.checkpoint import load_model
from mistral.cpu import threads
from mistral.cpu.threads import ThreadChoice
from mistral.generate import generate_ids
from mistral.quantize import quantize_int8

PROMPT = 16


@contextmanager
def busy_core(on: bool):
    """A process spinning at normal priority for as long as the block runs (nothing where on is False)."""
    if not on:
        yield
        return
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.5)  # under way, and spread by the scheduler
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait()


def seven_b_int4():
    """bench.mistral7b's int4 folder, made (with the bf16 folder it comes from) if it is not there."""
    from bench import mistral7b

    if not mistral7b.COPIES["int4"].exists():
        if not mistral7b.FOLDER.exists():
            mistral7b.build()
        subprocess.run([sys.executable, "-m", "main", "quantize", str(mistral7b.FOLDER), str(mistral7b.COPIES["int4"]),
                        "--to", "int4"], cwd=ROOT, check=True)
    return mistral7b.COPIES["int4"]


def tokens_per_s(model, steps: int, how: str) -> float:
    """Steady-state decode tokens/s of one row: `how` is "1 thread", "2 threads" or "adaptive"."""
    most = torch.get_num_threads()
    fixed = {"1 thread": 1, "2 threads": most}.get(how)
    # A fixed count: a ThreadChoice with one count, which leaves torch's setting as it is. Adaptive: a new one.
    threads._choices[model] = ThreadChoice(1 if fixed else most)
    torch.set_num_threads(fixed or most)
    stamps = []
    prompt = [(7 * i) % model.args.vocab_size + 3 for i in range(PROMPT)]
    try:
        generate_ids([prompt], model, max_tokens=steps + 1, on_token=lambda row, t: stamps.append(time.perf_counter()))
    finally:
        torch.set_num_threads(most)
    return steps / (stamps[-1] - stamps[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--7b", dest="big", action="store_true", help="add the 7B int4 folder")
    opts = parser.parse_args()
    reps = opts.reps
    setup()
    if torch.get_num_threads() < 2:
        sys.exit("this bench compares one thread with several: run it where torch has 2 threads or more")
    bench_model = random_model()
    models = {"shipped fp32": (load_model(ROOT / "mistral" / "assets", device="cpu"), 1000),
              "100M fp32": (bench_model, 150),
              "100M int8": (quantize_int8(random_model()), 150)}
    if opts.big:
        models["7B int4 folder"] = (load_model(seven_b_int4(), device="cpu"), 48)
    hows = ("1 thread", "2 threads", "adaptive")
    got: dict[tuple[str, str, str], list[float]] = {}
    for rep in range(reps):
        for busy in (False, True):
            with busy_core(busy):
                for name, (model, steps) in models.items():
                    for how in hows:
                        key = (name, "busy" if busy else "quiet", how)
                        got.setdefault(key, []).append(tokens_per_s(model, steps, how))
        print(f"round {rep + 1} of {reps} done", file=sys.stderr)
    rows, ratios = [], {}
    for name in models:
        for load in ("quiet", "busy"):
            row = {"model": name, "machine": load}
            for how in hows:
                row[f"{how} tokens/s"] = statistics.median(got[name, load, how])
            rows.append(row)
            ratios[f"{name} {load}: adaptive / 1 thread"] = row["adaptive tokens/s"] / row["1 thread tokens/s"]
            ratios[f"{name} {load}: adaptive / 2 threads"] = row["adaptive tokens/s"] / row["2 threads tokens/s"]
    report("contention", rows, ratios, {"reps": reps, "prompt": PROMPT,
                                        "runs": {" / ".join(k): v for k, v in got.items()}})


if __name__ == "__main__":
    main()
