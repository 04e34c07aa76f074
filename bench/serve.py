"""Serving beside llama-server, on the random Mistral 7B: C concurrent streamed requests (C = 1, 4, 8), greedy, a
fixed number of tokens each; our int4 folder against llama.cpp's Q4_0 copy of the same bf16 weights.

    python -m bench.serve [--tokens N] [--only ours]     # after python -m bench.mistral7b, which writes the folders

For each server and each C, C clients start together, each with its own prompt (so no prompt cache helps), and
stream N tokens. Figures: aggregate generated tokens/s (all tokens over the wall time of the round), the mean time to
the first token, and the mean time between tokens after it. llama-server runs with -np C (C slots, 2 threads), started
afresh for each C; ours runs `python -m main serve --max_batch_size 8` once. The servers take turns within one run.

Batching pays when a step reads every weight once for all its rows: ours at C = 8 against ours at C = 1 says how much.
The ceiling is the int4 kernel's rate with many rows, which a pre-fill shows: a 63-token prompt's tokens/s (to its
first token, alone on the server), measured in the same run.
"""
import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time

from bench.common import ROOT, report
from bench.llama_cpp import GGUF, HF, SCRIPT, anchor
from bench.mistral7b import COPIES, FOLDER

CONCURRENCY = (1, 4, 8)
# The anchor script's llama-server, unless this names another binary: on a CPU that says it has AMX but whose VM
# does not let a process use it, the script's -march=native build crashes in ggml's AMX product, and one built with
# -mno-amx-tile -mno-amx-int8 -mno-amx-bf16 (its AVX-512 VNNI path) is the one that runs.
LLAMA_SERVER = os.environ.get("LLAMA_SERVER")
OURS_PORT, LLAMA_PORT = 8931, 8932


def prompt(i: int) -> str:
    """A prompt of about 20 tokens, different for each client: the figures are about decoding."""
    return f"Client {i} asks: " + " ".join(f"word{(i * 7 + k) % 97}" for k in range(4))


def stream(port: int, text: str, tokens: int, extra: dict) -> dict:
    """One streamed completion: its start, the arrival of each chunk of text, and the tokens it counted."""
    body = {"prompt": text, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **extra}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"port {port}: {response.status} {response.read()[:300]!r}")
    arrivals, usage = [], None
    for line in response:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            usage = chunk["usage"]["completion_tokens"]
        if chunk.get("choices") and chunk["choices"][0].get("text"):
            arrivals.append(time.perf_counter())
    return {"start": start, "arrivals": arrivals, "tokens": usage or len(arrivals)}


def round_of(port: int, clients: int, tokens: int, extra: dict) -> dict:
    results = [None] * clients

    def client(i):
        results[i] = stream(port, prompt(i), tokens, extra)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    start = min(r["start"] for r in results)
    end = max(r["arrivals"][-1] for r in results)
    gaps = [b - a for r in results for a, b in zip(r["arrivals"], r["arrivals"][1:])]
    return {"aggregate tokens/s": sum(r["tokens"] for r in results) / (end - start),
            "time to first token s": statistics.mean(r["arrivals"][0] - r["start"] for r in results),
            "time between tokens ms": 1e3 * statistics.mean(gaps) if gaps else float("nan")}


def wait_ready(port: int, proc: subprocess.Popen, what: str) -> None:
    deadline = time.time() + 900
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} ended with status {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{what} was not ready in 15 minutes")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--only", choices=("ours", "llama"), default=None)
    opts = parser.parse_args()
    folder = COPIES["int4"]
    if not folder.exists():
        sys.exit(f"{folder} is not there: run python -m bench.mistral7b first, which writes it")
    gguf = GGUF["int4"][0]
    if opts.only != "ours":
        anchor("server")
        if not gguf.exists():
            if not HF.exists():
                from mistral.checkpoint import convert
                convert(FOLDER, HF, to="hf")
            anchor("gguf", str(HF), str(gguf), "q4_0")
    got: dict[tuple[str, int], dict] = {}
    failures: list[str] = []
    if opts.only != "llama":
        ours = subprocess.Popen([sys.executable, "-m", "main", "serve", str(folder), "--port", str(OURS_PORT),
                                 "--max_batch_size", "8"], cwd=ROOT, stderr=subprocess.DEVNULL)
        try:
            wait_ready(OURS_PORT, ours, "python -m main serve")
            round_of(OURS_PORT, 1, 4, {})  # the first steps touch the mapped weights
            for clients in CONCURRENCY:
                got["ours", clients] = round_of(OURS_PORT, clients, opts.tokens, {})
                print(f"ours, C={clients}: {got['ours', clients]}", file=sys.stderr)
            first = stream(OURS_PORT, " ".join(["word"] * 62), 1, {})  # 63 tokens with BOS
            prefill = 63 / (first["arrivals"][0] - first["start"])
        finally:
            stop(ours)
    if opts.only != "ours":
        for clients in CONCURRENCY:
            args = [str(gguf), str(LLAMA_PORT), "-np", str(clients), "-c", str(4096 * clients)]
            if LLAMA_SERVER:  # a llama-server built otherwise: run as the anchor script runs its own
                command = [LLAMA_SERVER, "-m", args[0], "--host", "127.0.0.1", "--port", args[1], "-t", "2", *args[2:]]
            else:
                command = ["bash", str(SCRIPT), "serve", *args]
            llama = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_ready(LLAMA_PORT, llama, "llama-server")
                round_of(LLAMA_PORT, 1, 4, {"ignore_eos": True})
                got["llama-server", clients] = round_of(LLAMA_PORT, clients, opts.tokens, {"ignore_eos": True})
                print(f"llama-server, C={clients}: {got['llama-server', clients]}", file=sys.stderr)
            except RuntimeError as e:  # what ran is still reported, with why the rest did not
                failures.append(f"C={clients}: {e}")
                print(f"llama-server, C={clients}: {e}", file=sys.stderr)
            finally:
                stop(llama)
    rows = [{"server": server, "clients": clients, **figures} for (server, clients), figures in got.items()]
    ratios = {}
    for clients in CONCURRENCY:
        if ("ours", clients) in got and ("llama-server", clients) in got:
            ratios[f"ours / llama-server, C={clients}"] = (got["ours", clients]["aggregate tokens/s"]
                                                           / got["llama-server", clients]["aggregate tokens/s"])
    if ("ours", 8) in got:
        ratios["ours C=8 / ours C=1"] = got["ours", 8]["aggregate tokens/s"] / got["ours", 1]["aggregate tokens/s"]
        ratios["ours C=8 / 63-token pre-fill (the ceiling)"] = got["ours", 8]["aggregate tokens/s"] / prefill
    report("serve", rows, ratios, {"tokens": opts.tokens, "folder": str(folder), "gguf": str(gguf),
                                   "llama-server": LLAMA_SERVER or "the anchor script's", "failures": failures,
                                   "63-token pre-fill tokens/s": prefill if opts.only != "llama" else None})


if __name__ == "__main__":
    main()
