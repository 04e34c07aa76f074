"""Speculative decoding from the prompt (mistral/speculate.py): greedy ids exactly those of plain decoding on every
path, over runs that wrap the rolling cache many times; drafts all rejected, all accepted, and ended by EOS or
max_tokens; chat turns after speculative ones; and sampling's distribution against plain sampling's (chi-square)."""
import math
import re
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, cli, one_error, random_model, tiny_params

from mistral import speculate
from mistral.cache import RotatingBufferCache
from mistral.chat import Chat
from mistral.errors import MistralError
from mistral.generate import Batch, Row, generate_ids
from mistral.quantize import bf16_weight_only, quantize_int4, quantize_int8
from mistral.runners import Runner

W = 5
# Prompts that repeat themselves, so that drafts are found, some right and some wrong.
PROMPTS = [[1, 9, 27, 17, 51, 25, 11, 33, 3, 9, 27, 17, 51, 25, 11], [5, 6, 7, 5, 6, 7, 5, 6],
           [40, 41, 42, 43, 44, 45, 46, 40, 41, 42]]


def test_a_draft_is_what_followed_the_latest_match_of_the_longest_suffix():
    d = speculate.Drafter([1, 2, 3, 4, 9, 2, 3, 5, 7, 2, 3], most=3)
    assert d.draft(10) == [5, 7, 2]  # "2 3" last seen before 5; "3 2 3" never; the latest wins over the first
    d.extend([5])
    assert d.draft(10) == [7, 2, 3]  # "2 3 5" seen once, followed by 7
    assert d.draft(1) == [7]  # no more than the room
    assert speculate.Drafter([1, 2, 3], most=4).draft(10) == []  # nothing repeats
    d = speculate.Drafter([1, 2, 3, 4, 5, 6, 3], most=4)
    assert d.draft(10) == []  # one token matched, and no draft kept yet
    d.verified(2, 1)
    assert d.draft(10) == [4]  # one token matched: one drafted


def test_a_row_whose_drafts_fail_drafts_less_and_waits_longer():
    d = speculate.Drafter([1, 2, 1, 2, 1, 2], most=4)
    waits = []
    for _ in range(7):
        d.verified(len(d.draft(10)) or 1, 0)
        waits.append(d.wait)
        while d.wait:
            assert d.draft(10) == []
    assert waits == [1, 2, 4, 8, 16, 32, 32] and d.length == 1
    d.verified(1, 1)
    assert d.length == 2 and d.backoff == 1


def oracle(answer_of, right: bool = True):
    """A stand-in for mistral.generate's Drafter (its three methods) that knows the answer, answer_of(the row's
    prompt): it drafts up to 4 of the answer's next tokens, or (not right) as many that are each the right one + 1."""
    class Oracle:
        def __init__(self, tokens, most):
            self.answer, self.at = answer_of(tokens), 0

        def extend(self, tokens):
            self.at += len(tokens)

        def draft(self, room):
            k = min(4, room)
            return self.answer[self.at : self.at + k] if right else [(self.answer[self.at] + 1) % 64] * k

        def verified(self, drafted, accepted):
            pass

    return Oracle


def plain_and_speculative(model, k, prompts=PROMPTS, **options):
    plain = generate_ids(prompts, model, max_tokens=60, **options)
    counts = __import__("collections").Counter()
    spec = generate_ids(prompts, model, max_tokens=60, speculate=k, counts=counts, **options)
    assert counts["accepted"] > 0 and counts["drafted"] > counts["accepted"]  # drafts kept, and taken back
    return plain, spec


def quantized(kind):
    model = random_model(tiny_params(), max_batch_size=4)
    return {"fp32": lambda m: m, "bf16": bf16_weight_only, "int8": quantize_int8, "int4": quantize_int4}[kind](model)


@pytest.mark.parametrize("k, rows", [(1, 1), (3, 1), (8, 3), (12, 3)])
@pytest.mark.parametrize("engine", [True, False], ids=["engine", "torch"])
@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8", "int4"])
def test_greedy_ids_are_those_of_plain_decoding(kind, engine, k, rows):
    """60 tokens past prompts longer than W=5: each row wraps its cache a dozen times, with drafts found, kept and
    taken back, one row alone or three sharing 1 + K tokens a step. Greedy, the ids are the same as without
    speculation; the logprobs are the model's own for each."""
    (ids, lps), (spec, spec_lps) = plain_and_speculative(quantized(kind), k, PROMPTS[:rows], engine=engine)
    assert spec == ids
    for a, b in zip(lps, spec_lps):
        torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=0, atol=1e-5)


@pytest.mark.parametrize("params", [tiny_params(sliding_window=None), tiny_params(sliding_window=[3, W]),
                                    tiny_params(sliding_window=[3, None]), tiny_params(sliding_window=[None, 3]),
                                    tiny_params(moe={"num_experts": 4, "num_experts_per_tok": 2})],
                         ids=["no window", "layer windows", "window then full", "full then window", "moe"])
def test_greedy_ids_on_other_models(params):
    model = random_model(params, max_batch_size=4)
    (ids, _), (spec, _) = plain_and_speculative(model, 4)
    assert spec == ids


def test_generate_takes_speculate_too():
    """The text-level generate: the shipped model's completions, greedy, with drafts as without."""
    from mistral.checkpoint import load_model
    from mistral.generate import generate
    from mistral.tokenizer import Tokenizer

    shipped = ROOT / "mistral" / "assets"
    model, tok = load_model(shipped, max_batch_size=2, device="cpu"), Tokenizer.from_folder(shipped)
    prompts = ["To be, or not to be, that is the question:", "ROMEO:\nBut soft, what light"]
    plain, plain_lps = generate(prompts, model, tok, max_tokens=40)
    texts, lps = generate(prompts, model, tok, max_tokens=40, speculate=4)
    assert texts == plain
    torch.testing.assert_close(torch.tensor(lps), torch.tensor(plain_lps), rtol=0, atol=1e-5)


@pytest.mark.parametrize("window", [None, [3, None]], ids=["no window", "window then full"])
def test_verify_steps_run_on_the_engine_where_rows_have_room(window, monkeypatch):
    """Where no layer's buffer wraps without spare slots (no window; full-attention layers beside a windowed one with
    its spare), a verified draft runs on the CPU engine as a decode step does, one query per token, not in torch:
    the same kernels, so the same numbers. Prompts of one token, so that every step of more is a verify."""
    from mistral.cpu.decoder import CpuDecoder

    model = quantize_int4(random_model(tiny_params(sliding_window=window), max_batch_size=4))
    declined, real = [], CpuDecoder.step
    monkeypatch.setattr(CpuDecoder, "step", lambda self, ids, seqlens, cache, rows=None: (
        out := real(self, ids, seqlens, cache, rows), out is None and declined.append(list(seqlens)))[0])
    counts = __import__("collections").Counter()
    generate_ids([[5], [9]], model, max_tokens=60, speculate=4, counts=counts)
    assert counts["drafted"] > 0 and declined == []


def steps_and_rows(model, prompts, k, max_tokens, eos_id=None, drafts=None):
    """Run a speculative generation step by step; drafts(row index, row): a hand-made draft instead of the row's."""
    cache = RotatingBufferCache(model.n_local_layers, len(prompts), W + k, model.args.n_kv_heads,
                                model.args.head_dim, spare=k)
    batch = Batch(model, cache, Runner(model), None)
    batch.rows = [Row(p, max_tokens, eos_id, speculate=k) for p in prompts]
    if drafts is not None:
        for b, row in enumerate(batch.rows):
            row.drafter.draft = lambda room, b=b, row=row: drafts(b, row)[: min(room, k)]
    steps = 0
    while batch.step():
        steps += 1
    return steps, batch.rows


@pytest.mark.parametrize("b", range(len(PROMPTS)))
def test_drafts_all_rejected_change_nothing(b):
    """Every draft wrong (a token the model never picks next): every step keeps one token, the model's, and takes the
    draft back; the ids are those of plain decoding."""
    model = random_model(tiny_params(), max_batch_size=4)
    want = generate_ids(PROMPTS, model, max_tokens=30)[0][b]
    wrong = lambda _, row: [(want[len(row.generated)] + 1) % 64] * 4  # noqa: E731
    steps, (row,) = steps_and_rows(model, [PROMPTS[b]], 4, 30, drafts=wrong)
    assert row.generated == want and row.accepted == 0 and row.drafted > 0
    assert steps == 1 + 29  # pre-fill, then one token per step


@pytest.mark.parametrize("b", range(len(PROMPTS)))
def test_drafts_all_accepted_take_k_plus_one_tokens_a_step(b):
    model = random_model(tiny_params(), max_batch_size=4)
    want = generate_ids(PROMPTS, model, max_tokens=31)[0][b]
    steps, (row,) = steps_and_rows(model, [PROMPTS[b]], 4, 31, drafts=lambda _, row: want[len(row.generated):])
    assert row.generated == want
    assert row.accepted == row.drafted == 24  # 4 drafted in each of the 6 steps after pre-fill
    assert steps == 1 + 30 // 5  # pre-fill, then 5 tokens a step


def test_rows_share_one_plus_k_tokens_a_step():
    """A step feeds at most 1 + K tokens, or one per decoding row where there are more: with K = 4, two rows share 3
    draft tokens (the first row first) and a row alone drafts 4; with K = 2, three rows draft nothing. Every draft
    right (an oracle's), the ids are plain decoding's."""
    model = random_model(tiny_params(), max_batch_size=4)
    want, _ = generate_ids(PROMPTS, model, max_tokens=31)
    right = lambda b, row: want[b][len(row.generated):]  # noqa: E731
    steps, rows = steps_and_rows(model, PROMPTS[:2], 4, 31, drafts=right)
    assert [row.generated for row in rows] == want[:2]
    # Row 0: 3 drafted a step, 4 tokens, from 1 to 29 tokens in 7 steps, then 1 (room for 1 more) in the 8th; row 1
    # meanwhile 1 token a step, to 8, then in the 8th the 2 draft tokens row 0 left, to 11; alone, 4 drafted a step,
    # to 31 in 4 steps.
    assert (rows[0].drafted, rows[1].drafted, steps) == (7 * 3 + 1, 2 + 4 * 4, 1 + 8 + 4)
    steps, rows = steps_and_rows(model, PROMPTS, 2, 31, drafts=right)
    assert [row.generated for row in rows] == want and all(row.drafted == 0 for row in rows) and steps == 1 + 30


def test_eos_inside_an_accepted_run_and_rows_that_end_mid_draft():
    """The oracle drafts the right tokens: a row whose EOS comes inside the kept run ends there, another ends at
    max_tokens mid-draft, and the third goes on; each as plain decoding."""
    model = random_model(tiny_params(), max_batch_size=4)
    free, _ = generate_ids(PROMPTS, model, max_tokens=23)
    eos = free[0][9]  # row 0 says it at its 10th token
    want, _ = generate_ids(PROMPTS, model, max_tokens=23, eos_id=eos)
    steps, rows = steps_and_rows(model, PROMPTS, 6, 23, eos_id=eos,
                                 drafts=lambda b, row: free[b][len(row.generated):])
    assert [row.generated for row in rows] == want and rows[0].generated[-1] == eos
    assert all(row.finished for row in rows)


@pytest.mark.parametrize("right", [True, False], ids=["right", "wrong"])
def test_the_drafts_counted_are_those_fed_and_kept(right, monkeypatch):
    """generate_ids(counts=) gains the draft tokens fed and kept: an oracle's drafts of 4, all right (5 tokens a step,
    6 steps after pre-fill) or all wrong (1 a step, each draft as long as the room left allows)."""
    model = random_model(tiny_params(), max_batch_size=4)
    want, _ = generate_ids(PROMPTS, model, max_tokens=31)

    monkeypatch.setattr("mistral.generate.Drafter", oracle(lambda tokens: want[PROMPTS.index(tokens)], right))
    counts = __import__("collections").Counter()
    for b, prompt in enumerate(PROMPTS):  # one at a time: a row alone drafts K a step
        ids, _ = generate_ids([prompt], model, max_tokens=31, speculate=4, counts=counts)
        assert ids == [want[b]]
    per_row = 6 * 4 if right else sum(min(4, 31 - g - 1) for g in range(1, 31))  # g: tokens before the step
    assert counts == {"drafted": 3 * per_row, "accepted": 3 * per_row if right else 0}


def test_a_cache_without_spare_slots_is_refused_where_rows_wrap():
    model = random_model(tiny_params(), max_batch_size=4)
    cache = RotatingBufferCache(2, 3, W, model.args.n_kv_heads, model.args.head_dim)
    with pytest.raises(MistralError, match=r"speculate=4 needs that many spare slots.*spare=4\)"):
        generate_ids(PROMPTS, model, max_tokens=8, speculate=4, cache=cache)
    with pytest.raises(MistralError, match="speculate must be a whole number of draft tokens from 0"):
        generate_ids(PROMPTS, model, max_tokens=8, speculate=16)


@pytest.mark.parametrize("window", [None, 7, [7, None]])
def test_chat_turns_after_speculative_turns_are_those_of_plain_turns(window):
    """A conversation whose turns are decoded speculatively holds, turn after turn, the cache a plain one holds: the
    same answers, the same ids fed, and (with a window) rows wrapped and taken back by drafts along the way."""
    from mistral.tokenizer import Tokenizer
    import mistral_common
    from pathlib import Path

    tok = Tokenizer(Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3")
    model = random_model(tiny_params(vocab_size=32768, sliding_window=window), seed=2)
    plain, fast = (Chat(model, tok, max_tokens=24, speculate=k) for k in (0, 4))
    for user in ["Say it again, say it again", "And again, and again, and again", "Once more"]:
        a, b = plain.say(user), fast.say(user)
        assert b.answer == a.answer and fast.fed == plain.fed
    assert fast.cache.spare == (4 if window else 0)


def test_sampling_keeps_the_models_distribution():
    """Chi-square, two samples: the tokens at generated positions 1..3 (where drafts are verified) over 3072 seeds of
    speculative sampling against as many of plain sampling, on a vocabulary of 8. The test can tell: keeping every
    draft token that way instead fails it."""
    model = random_model(tiny_params(vocab_size=8), max_batch_size=64)
    prompt = [1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2]

    def counts(k: int, seed0: int) -> torch.Tensor:
        out = torch.zeros(3, 8)
        for s in range(48):
            g = torch.Generator().manual_seed(seed0 + s)
            ids, _ = generate_ids([prompt] * 64, model, max_tokens=4, temperature=1.0, top_p=1.0, generator=g,
                                  speculate=k)
            for row in ids:
                for i in range(3):
                    out[i, row[i + 1]] += 1
        return out

    plain, spec = counts(0, 0), counts(3, 10_000)
    for i in range(3):
        assert chi_square_p(plain[i], spec[i]) > 1e-3, (i, plain[i], spec[i])


def chi_square_p(a: torch.Tensor, b: torch.Tensor) -> float:
    """The p-value of the chi-square test that two samples of counts come from one distribution."""
    keep = (a + b) > 0
    a, b = a[keep].double(), b[keep].double()
    na, nb = a.sum(), b.sum()
    stat = (((a * math.sqrt(nb / na) - b * math.sqrt(na / nb)) ** 2) / (a + b)).sum().item()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2)))


def test_the_shipped_demo_prints_the_same_with_speculation():
    out = subprocess.run([sys.executable, "-m", "main", "demo", "--speculate", "8", "--max_tokens", "35"], cwd=ROOT,
                         capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout == (ROOT / "tests" / "data" / "shipped_demo.txt").read_bytes()
    found = re.search(r"; drafts kept (\d+) of (\d+) tokens \((\d+)%\); ", out.stderr.decode())
    kept, drafted, share = map(int, found.groups())
    assert 0 < kept <= drafted and share == round(100 * kept / drafted)


@pytest.mark.parametrize("window", [W, [3, None]], ids=["window", "window then full"])
def test_the_server_answers_as_plain_decoding_with_drafts(window, monkeypatch):
    """Concurrent requests on an engine whose rows draft (its cache with the window and 4 spare slots; or, beside
    full-attention layers, the narrow layers' window and 4): each answer, long enough to wrap its row many times, is
    the cache-free greedy one. The rows draft from one-token matches from the start, as if a draft had been kept:
    this random model rarely repeats two tokens in a row, so it would hardly draft otherwise."""
    from test_server import V3, Running, _greedy, at_once

    real = speculate.Drafter.__init__
    monkeypatch.setattr(speculate.Drafter, "__init__", lambda self, tokens, most: (
        real(self, tokens, most), setattr(self, "kept", True))[0])

    from mistral.engine import Engine
    from mistral.tokenizer import Tokenizer

    tok = Tokenizer(V3)
    model = random_model(tiny_params(vocab_size=32768, sliding_window=window), seed=4)
    engine = Engine(model, tok.eos_id, rows=2, slots=W + 4 if window == W else 80, speculate=4)
    assert engine.cache.spare == 4 and engine.speculate == 4
    running = Running(model, tok, engine=engine)  # (which starts it)
    try:
        asks = ["Now is the winter, the winter, the winter of our discontent", "To be, or not to be, or not to be"]
        results = at_once(*(lambda a=a: running.client.completions.create(model="tiny", prompt=a, max_tokens=40,
                                                                           temperature=0) for a in asks))
        for prompt, r in zip(asks, results):
            want = _greedy(model, tok.encode(prompt, bos=True), 40, tok.eos_id)
            assert r.choices[0].text == tok.decode(tok.encode(prompt, bos=True) + want)[len(prompt):]
        drafted, kept = running.metric("draft_tokens_total"), running.metric("draft_tokens_accepted_total")
        assert 0 <= kept <= drafted and drafted > 0  # (this random model rarely repeats itself: few are kept)
    finally:
        running.close()


def test_the_server_gives_each_kept_token_its_own_logprobs(monkeypatch):
    """A step that keeps several tokens (an oracle drafts the greedy answer, so each keeps 5) streams each with its own
    logprob and top_logprobs: the model's, from one forward without cache."""
    from test_server import V3, Running, _greedy, reference

    from mistral.engine import Engine
    from mistral.tokenizer import Tokenizer

    tok = Tokenizer(V3)
    model = random_model(tiny_params(vocab_size=32768, sliding_window=W), seed=4)
    prompt = "To be, or not to be, that is the question"
    ids = tok.encode(prompt, bos=True)
    want = _greedy(model, ids, 20, tok.eos_id)

    monkeypatch.setattr("mistral.generate.Drafter", oracle(lambda tokens: want))
    engine = Engine(model, tok.eos_id, rows=1, slots=W + 4, speculate=4)
    running = Running(model, tok, engine=engine)
    try:
        for stream in (False, True):
            got = running.client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0,
                                                    logprobs=2, stream=stream)
            told = [part.choices[0].logprobs for part in (list(got) if stream else [got])]
            lps = [lp for t in told if t is not None for lp in t.token_logprobs]
            tops = [top for t in told if t is not None for top in t.top_logprobs]
            answer = [t for t in want if t != tok.eos_id]
            torch.testing.assert_close(torch.tensor(lps[: len(answer)]), torch.tensor(reference(model, ids, answer)[1]),
                                       rtol=0, atol=1e-4)
            assert all(lp == pytest.approx(max(top.values()), abs=1e-6) for lp, top in zip(lps, tops))
        assert engine.counts["accepted"] == engine.counts["drafted"] > 0
    finally:
        running.close()


@pytest.mark.parametrize("command", ["demo", "interactive", "chat", "serve"])
def test_a_bad_speculate_is_one_line(command):
    code, out, err = cli(command, "--speculate", "99")
    one_error(code, err, r"speculate must be a whole number of draft tokens from 0 \(off\) to 15, got 99")


def test_drafts_are_found_in_the_history_too(monkeypatch):
    """A row drafts from the ids before its prompt as well: a chat's turn from the whole conversation."""
    assert Row([4, 5], 10, speculate=3, history=[1, 2, 4, 5, 6, 7, 8]).drafter.draft(10) == [6, 7, 8]
    assert Row([4, 5], 10, speculate=3).drafter.draft(10) == []
    from mistral.tokenizer import Tokenizer
    import mistral_common
    from pathlib import Path

    seen = []
    real = speculate.Drafter.__init__
    monkeypatch.setattr(speculate.Drafter, "__init__", lambda self, tokens, most: (seen.append(list(tokens)),
                                                                                   real(self, tokens, most))[1])
    tok = Tokenizer(Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3")
    talk = Chat(random_model(tiny_params(vocab_size=32768, sliding_window=None), seed=2), tok, max_tokens=6,
                speculate=2)
    talk.say("Hello there")
    turn = talk.say("Again")
    assert seen[-1] == talk.ids(talk.turns[:-1] + [[{"role": "user", "content": "Again"}]])
    assert turn.stats().endswith(f", drafts kept {turn.drafts['accepted']} of {turn.drafts['drafted']} tokens "
                                 f"({turn.drafts['accepted'] / max(turn.drafts['drafted'], 1):.0%})")


def test_ctrl_c_inside_a_verified_draft_leaves_the_chat_as_a_plain_one(monkeypatch):
    """Ctrl-C at the third token of a turn whose first draft (an oracle's: the plain chat's answer) brought five
    tokens in one step: the turn keeps the three shown, the cache is taken back to them, and the next turn is what a
    plain chat's is."""
    from mistral.tokenizer import Tokenizer
    import mistral_common
    from pathlib import Path

    tok = Tokenizer(Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3")
    model = random_model(tiny_params(vocab_size=32768, sliding_window=7), seed=2)
    first, second = "Say it again, say it again", "And again, and again"
    plain = Chat(model, tok, max_tokens=24)
    plain.say(first)
    full = plain.say(second).answer  # what the stopped turn would have said

    def stop_at_third(shown):
        def on_token(token):
            shown.append(token)
            if len(shown) == 3:
                raise KeyboardInterrupt
        return on_token

    turns = []
    for k in (0, 4):
        talk = Chat(model, tok, max_tokens=24, speculate=k)
        talk.say(first)
        start = len(talk.ids(talk.turns + [[{"role": "user", "content": second}]]))
        monkeypatch.setattr(speculate.Drafter, "draft", lambda self, room: full[len(self.tokens) - start:][
            : min(room, self.most)])
        stopped = talk.say(second, on_token=stop_at_third([]))
        monkeypatch.undo()
        assert stopped.stopped and stopped.answer == full[:3]
        turns.append((talk.say("Once more").answer, list(talk.fed)))
    assert turns[1] == turns[0]
