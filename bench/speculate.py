"""Speculative decoding from the prompt (mistral/speculate.py): what a verified draft costs, and what it gains.

    python -m bench.speculate          # the 100M model's verify cost, the shipped model's tasks (a few minutes)
    python -m bench.speculate --7b     # and the verify cost of the random 7B folders (int4, and int8 made from bf16)

Verify cost: one row on the CPU engine, a step of 1 + K tokens (the last token and a draft of K, one query per token
in one C call) against a decode step of 1, after a 300-token prompt, K = 1..15; the best of interleaved repetitions,
the cache taken back after each. What the weights cost is paid once for the 1 + K rows; what each row costs on its own
(its attention, its activations) is paid 1 + K times.

Tasks: the shipped model, greedy, 64 tokens (its window) after each of four prompts built from the first four
speeches of bench/data/heldout_shakespeare.txt (which it never trained on) that fit its 64-token window with room to
spare (36 to 56 tokens), as a 7B's prompts fit its 4096: *continue* (the speech, then its speaker and first line
again); *repeat with a change* (the speech, then its speaker and its first line again up to a word, changed to
Horatio); *quote* (the speech, then its speaker and the first three words of its second line); and *never repeats*,
the worst case: 64 tokens sampled at temperature 1 after prompts of 300 tokens drawn at random, where a draft is
rarely found and more rarely right. For each, decode tokens/s over the four prompts without and with --speculate K
(K = 2, 4, 8), the median of --reps repetitions that each run every K back to back (the speedup: the median of their
ratios), the acceptance (draft tokens kept / drafted) and the tokens per step. The 7B's gain on the same tasks
follows from its verify cost and the acceptance: a step of 1 + K costing c(K) decode steps yields (tokens per step)
/ c(K) times the tokens (a random 7B has no text to repeat); with --7b, that projection is printed for each task and
K.

*Drafts always right*, the ceiling: the "continue" prompts, with each draft taken from the answer plain decoding
gave. What the engine makes of K + 1 tokens a step is then all that limits the speedup.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.common import ROOT, PARAMS, interleaved_best, random_model, report, setup, timed
from mistral.cache import RotatingBufferCache
from mistral.checkpoint import load_model
from mistral.generate import Batch, Row, speculating_slots
from mistral.runners import Runner
from mistral.sampling import SamplingParams
from mistral.tokenizer import Tokenizer

TEXT = ROOT / "bench" / "data" / "heldout_shakespeare.txt"
SHIPPED = ROOT / "mistral" / "assets"
BIG = Path.home() / ".cache" / "mistral-bench"
KS = (2, 4, 8)  # the draft lengths the tasks run with
NEW_TOKENS = 64  # a window of the shipped model: what its prompt's speech can ground
PASSAGES = 4  # prompts per task
PROMPT = 300


@torch.no_grad()
def verify_cost(model, ks=range(1, 16), reps: int = 5) -> dict[int, float]:
    """{K: seconds of a 1 + K step / seconds of a 1-token decode step}, one row on the CPU engine."""
    args, most = model.args, max(ks) + 1  # each step is taken back whole, its last token too: one more spare slot
    slots = (args.window or PROMPT + most) + most
    cache = RotatingBufferCache(model.n_local_layers, 1, slots, args.n_kv_heads, args.head_dim,
                                windows=model.layer_windows, spare=most)
    runner = Runner(model)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, args.vocab_size, (PROMPT,), generator=g)
    for i in range(0, PROMPT, 64):
        runner.step(prompt[i : i + 64], [len(prompt[i : i + 64])], cache, [])
    at = cache.seq_pos[0]

    def step(n: int):
        def run():
            ids = torch.randint(0, args.vocab_size, (n,), generator=g)
            with runner.threads([1]):
                runner.step(ids, [n], cache, None)
            cache.rewind(0, at)
        return timed(run)

    best = interleaved_best({k: step(1 + k) for k in [0, *ks]}, reps)
    return {k: best[k] / best[0] for k in ks}


def passages(tokenizer: Tokenizer, n: int) -> list[list[str]]:
    """The first n speeches of the held-out text that fit the shipped model's window with room to spare (36 to 56
    tokens), as lines: a speaker's name, then at least three lines of theirs."""
    found = []
    for speech in TEXT.read_text().split("\n\n"):
        lines = speech.splitlines()
        if len(lines) >= 4 and lines[0].endswith(".") and 36 <= len(tokenizer.encode(speech)) <= 56:
            found.append(lines)
    return found[:n]


def changed(line: str) -> str:
    """The line up to its first capitalised word of 4 letters or more (its last word if none), that word Horatio."""
    words = line.split()
    at = next((i for i, w in enumerate(words) if w[0].isupper() and len(w.strip(",.;:!?'-")) >= 4 and i > 0),
              len(words) - 1)
    return " ".join(words[:at] + ["Horatio"])


def tasks(tokenizer: Tokenizer) -> dict[str, list[tuple[list[int], SamplingParams]]]:
    """Each task's prompts, PASSAGES of them: a speech of the held-out text, then the start of its answer."""
    greedy = SamplingParams(temperature=0.0)
    out = {"continue": [], "repeat with a change": [], "quote": []}
    for lines in passages(tokenizer, PASSAGES):
        speech = "\n".join(lines) + "\n\n"
        out["continue"].append(speech + "\n".join(lines[:2]))
        out["repeat with a change"].append(speech + lines[0] + "\n" + changed(lines[1]))
        out["quote"].append(speech + lines[0] + "\n" + " ".join(lines[2].split()[:3]))
    out = {name: [(tokenizer.encode(prompt), greedy) for prompt in prompts] for name, prompts in out.items()}
    g = torch.Generator().manual_seed(1)
    sampled = SamplingParams(temperature=1.0, top_p=1.0)
    out["never repeats"] = [([tokenizer.bos_id, *torch.randint(100, tokenizer.n_words, (PROMPT,), generator=g).tolist()
                              ], sampled) for _ in range(PASSAGES)]
    return out


class Foreseen:
    """A drafter (mistral/speculate.Drafter's three methods) that knows the answer: its drafts are the next tokens of
    `answer`, all of them right while the row generates exactly that answer."""

    def __init__(self, answer: list[int], most: int):
        self.answer, self.most, self.at = answer, most, 0

    def extend(self, tokens: list[int]) -> None:
        self.at += len(tokens)

    def draft(self, room: int) -> list[int]:
        return self.answer[self.at : self.at + min(self.most, room)]

    def verified(self, drafted: int, accepted: int) -> None:
        pass


@torch.no_grad()
def decode(model, prompt: list[int], sampling: SamplingParams, speculate: int, seed: int = 0,
           answer: list[int] | None = None) -> dict:
    """One generation of NEW_TOKENS: decode tokens/s (after the first token), steps, and the drafts' fate. answer:
    draft from it (Foreseen) instead of the row's own text."""
    args = model.args
    slots, spare = speculating_slots(len(prompt) + NEW_TOKENS, args, speculate)
    cache = RotatingBufferCache(model.n_local_layers, 1, slots, args.n_kv_heads, args.head_dim,
                                windows=model.layer_windows, spare=spare)
    batch = Batch(model, cache, Runner(model), 512)
    row = Row(prompt, NEW_TOKENS, None, sampling, torch.Generator().manual_seed(seed), speculate=speculate)
    if answer is not None and speculate:
        row.drafter = Foreseen(answer, speculate)
    batch.rows = [row]
    batch.step()  # pre-fill, and the first token
    start, drafts = time.perf_counter(), []
    while batch.step():
        drafts.append(row.drafted - sum(drafts))  # the draft length of each step (0: a plain decode step)
    seconds = time.perf_counter() - start
    return {"tokens/s": (len(row.generated) - 1) / seconds, "seconds": seconds, "steps": len(drafts),
            "drafts": drafts, "drafted": row.drafted, "accepted": row.accepted, "generated": row.generated}


def decode_all(model, prompts: list[tuple[list[int], SamplingParams]], speculate: int,
               answers: list[list[int]] | None = None) -> dict:
    """decode() of each prompt, one after another: tokens/s over them all, their steps and drafts together."""
    runs = [decode(model, prompt, sampling, speculate, answer=answer)
            for (prompt, sampling), answer in zip(prompts, answers or [None] * len(prompts), strict=True)]
    tokens = sum(len(r["generated"]) - 1 for r in runs)
    return {"tokens/s": tokens / sum(r["seconds"] for r in runs), "tokens": tokens,
            "steps": sum(r["steps"] for r in runs), "drafts": [d for r in runs for d in r["drafts"]],
            "drafted": sum(r["drafted"] for r in runs), "accepted": sum(r["accepted"] for r in runs),
            "generated": [r["generated"] for r in runs]}


def task_rows(reps: int) -> tuple[list[dict], dict]:
    model = load_model(SHIPPED, max_batch_size=1, device="cpu", dtype=torch.float32)
    tokenizer = Tokenizer.from_folder(SHIPPED)
    rows, ratios = [], {}
    cases = {name: (prompts, None) for name, prompts in tasks(tokenizer).items()}
    prompts = cases["continue"][0]
    cases["drafts always right (ceiling)"] = (prompts, decode_all(model, prompts, 0)["generated"])
    for name, (prompts, answers) in cases.items():
        # Each repetition runs every K back to back, and a speedup is the median of its repetitions' ratios: this
        # VM's speed swings 2x from second to second, which a best-of-n of each K alone would take for a gain.
        speeds = {k: [] for k in (0, *KS)}
        for _ in range(reps + 1):  # the first, a warm-up, is dropped
            for k in speeds:
                speeds[k].append(decode_all(model, prompts, k, answers)["tokens/s"])
        speedup = {k: statistics.median(s / p for s, p in zip(speeds[k][1:], speeds[0][1:])) for k in KS}
        plain = decode_all(model, prompts, 0)
        for k in KS:
            spec = decode_all(model, prompts, k, answers)
            if prompts[0][1].temperature == 0:
                assert spec["generated"] == plain["generated"], name  # greedy: the same ids
            rows.append({"task": name, "K": k, "prompts": len(prompts),
                         "prompt tokens": sum(len(prompt) for prompt, _ in prompts),
                         "plain tokens/s": statistics.median(speeds[0][1:]),
                         "speculating tokens/s": statistics.median(speeds[k][1:]), "speedup": speedup[k],
                         "acceptance": spec["accepted"] / max(spec["drafted"], 1),
                         "tokens per step": spec["tokens"] / max(spec["steps"], 1), "drafts": spec["drafts"],
                         "tokens": spec["tokens"]})
            ratios[f"{name} K={k} speedup"] = speedup[k]
    return rows, ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--7b", dest="big", action="store_true", help="also the random 7B folders' verify cost")
    parser.add_argument("--reps", type=int, default=7)
    options = parser.parse_args()
    setup()
    rows, ratios = task_rows(options.reps)
    cost_rows = []
    models = {"100M fp32 (bench model)": lambda: random_model(PARAMS, max_batch_size=1)}
    if options.big:
        if not (BIG / "mistral-7b-random").is_dir():
            sys.exit(f"error: {BIG / 'mistral-7b-random'} is missing: python -m bench.mistral7b makes it")
        models["7B int4"] = lambda: load_model(BIG / "mistral-7b-random-int4", max_batch_size=1, device="cpu")
        models["7B int8"] = lambda: load_model(BIG / "mistral-7b-random", max_batch_size=1, device="cpu",
                                               quantize="int8")
    for name, make in models.items():
        model = make()
        cost = verify_cost(model, reps=options.reps)
        cost_rows.append({"model": name, **{f"K={k}": c for k, c in cost.items()}})
        ratios[f"{name} verify 8 / decode 1"] = cost[8]
        del model
        if name.startswith("7B"):  # what the tasks' drafts would give it: its steps' cost, each c(its draft)
            cost[0] = 1.0
            for row in rows:
                if "task" in row:
                    row[f"{name} projected"] = row["tokens"] / sum(cost[k] for k in row["drafts"])
    for row in rows:
        row.pop("drafts", None)
        row.pop("tokens", None)
    notes = {"verify cost": cost_rows, "K": list(KS), "new tokens": NEW_TOKENS,
             "what limits it": "the tasks: how much of the answer the prompt holds (acceptance) and the verify "
                               "cost; the worst case: the lookup's Python per step and the drafts it still tries"}
    report("speculate", rows + cost_rows, ratios, notes)


if __name__ == "__main__":
    main()
