"""generate(): what it returns must be what the model says when the whole text is scored in one pass."""
import pytest
import torch
from helpers import PROMPTS, random_model, tiny_params

from mistral.errors import MistralError
from mistral.generate import generate, generate_ids
from mistral.tokenizer import Tokenizer

W = 5


def rescore(model, prompts, generated):
    """Log-probabilities of every token after the first, from one cache-free pass over each full text."""
    out = []
    for p, g in zip(prompts, generated):
        seq = p + g
        with torch.no_grad():
            logits = model(torch.tensor(seq), [len(seq)])
        out.append(torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(seq[1:])[:, None]).squeeze(1))
    return out


@pytest.mark.parametrize("kind", ["dense", "moe", "layer windows", "window and full"])
@pytest.mark.parametrize("chunk_size", [None, 1, W - 1, W, W + 1, 3 * W])
def test_greedy_output_rescored_in_one_pass(chunk_size, kind):
    model = random_model(tiny_params(**{"dense": {}, "moe": {"moe": {"num_experts": 4, "num_experts_per_tok": 2}},
                                        "layer windows": {"sliding_window": [3, W]},
                                        "window and full": {"sliding_window": [3, None]}}[kind]))
    generated, logprobs = generate_ids(PROMPTS, model, max_tokens=3 * W, chunk_size=chunk_size, prompt_logprobs=True)
    for p, g, lp, want in zip(PROMPTS, generated, logprobs, rescore(model, PROMPTS, generated)):
        assert len(g) == 3 * W and len(lp) == len(p) - 1 + len(g)
        torch.testing.assert_close(torch.tensor(lp), want, rtol=0, atol=1e-5)
    # Without prompt logprobs the head runs only where a token is sampled: the same tokens, the same scores of them.
    again, sampled_only = generate_ids(PROMPTS, model, max_tokens=3 * W, chunk_size=chunk_size)
    assert again == generated
    for p, lp, full in zip(PROMPTS, sampled_only, logprobs):
        torch.testing.assert_close(torch.tensor(lp), torch.tensor(full[len(p) - 1 :]), rtol=0, atol=1e-5)
    # Greedy: each generated token is the argmax of what the one-pass model predicts there.
    for p, g in zip(PROMPTS, generated):
        with torch.no_grad():
            logits = model(torch.tensor(p + g), [len(p) + len(g)])
        assert logits[len(p) - 1 : -1].argmax(-1).tolist() == g


def test_chunking_does_not_change_the_output():
    model = random_model(tiny_params())
    outs = [generate_ids(PROMPTS, model, max_tokens=12, chunk_size=c)[0] for c in (None, 1, 2, 7)]
    assert all(o == outs[0] for o in outs)


class CountingModel:
    """Wraps a model and records the seqlens of every forward."""

    def __init__(self, model):
        self.model, self.calls, self.rows = model, [], []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, ids, seqlens, cache, rows=None):
        self.calls.append(list(seqlens))
        self.rows.append(rows)
        return self.model(ids, seqlens, cache, rows=rows)


def test_eos_stops_its_row_and_leaves_the_others_running():
    model = random_model(tiny_params())
    free, _ = generate_ids(PROMPTS, model, max_tokens=10)
    # The EOS: a token that row 0 emits (not first, for the first time) and the other rows never do.
    k = next(k for k in range(1, 9) if free[0][k] not in free[0][:k] + free[1] + free[2])
    counting = CountingModel(model)
    generated, logprobs = generate_ids(PROMPTS, counting, max_tokens=10, eos_id=free[0][k], engine=False)
    assert generated[0] == free[0][: k + 1]  # up to and including the EOS
    assert generated[1:] == free[1:]
    assert len(logprobs[0]) == k + 1
    # The pre-fill computes the head for each prompt's last position only.
    assert counting.rows[0] == [len(PROMPTS[0]) - 1, len(PROMPTS[0]) + len(PROMPTS[1]) - 1, sum(map(len, PROMPTS)) - 1]
    # Once row 0 has emitted EOS, it brings nothing to any later forward.
    assert [c[0] for c in counting.calls] == [len(PROMPTS[0])] + [1] * k + [0] * (9 - k)


def test_max_tokens_zero_scores_the_prompt_only():
    model = random_model(tiny_params())
    generated, logprobs = generate_ids(PROMPTS, model, max_tokens=0, chunk_size=4, prompt_logprobs=True)
    assert generated == [[], [], []]
    for lp, want in zip(logprobs, rescore(model, PROMPTS, generated)):
        torch.testing.assert_close(torch.tensor(lp), want, rtol=0, atol=1e-5)


def test_model_without_sliding_window():
    model = random_model(tiny_params(sliding_window=None, rope_theta=None))
    generated, logprobs = generate_ids(PROMPTS, model, max_tokens=8, chunk_size=3, prompt_logprobs=True)
    for lp, want in zip(logprobs, rescore(model, PROMPTS, generated)):
        torch.testing.assert_close(torch.tensor(lp), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_tokens=-1), "max_tokens"),
    (dict(max_tokens=3, temperature=-0.5), "temperature"),
    (dict(max_tokens=3, top_p=0.0), "top_p"),
    (dict(max_tokens=3, top_p=1.5), "top_p"),
    (dict(max_tokens=3, top_k=-2), "top_k"),
    (dict(max_tokens=3, chunk_size=0), "chunk_size"),
])
def test_bad_sampling_arguments(kwargs, match):
    with pytest.raises(MistralError, match=match):
        generate_ids(PROMPTS, random_model(tiny_params()), **kwargs)


def test_bad_batches():
    model = random_model(tiny_params(), max_batch_size=2)
    with pytest.raises(MistralError, match="max_batch_size=2"):
        generate_ids(PROMPTS, model, max_tokens=2)
    with pytest.raises(MistralError, match="empty prompt"):
        generate_ids([[1, 2], []], model, max_tokens=2)


def test_generate_text(tokenizer_file):
    tok = Tokenizer(tokenizer_file)
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    model = random_model(tiny_params(vocab_size=tok.n_words))
    prompts = ["To be, or not to be", "The slings and arrows"]
    texts, logprobs = generate(prompts, model, tok, max_tokens=6, chunk_size=2)
    ids, lps = generate_ids([tok.encode(p) for p in prompts], model, max_tokens=6)
    assert texts == [tok.decode(tok.encode(p) + g) for p, g in zip(prompts, ids)]
    assert all(t.startswith(p) for t, p in zip(texts, prompts))
    torch.testing.assert_close(torch.tensor(sum(logprobs, [])), torch.tensor(sum(lps, [])), rtol=0, atol=1e-5)
    with pytest.raises(MistralError, match="empty prompt"):
        generate(["ok", ""], model, tok, max_tokens=2)


@pytest.mark.parametrize("where", ["head", "engine", "nan"])
def test_a_step_that_raises_is_not_counted_in_the_callers_cache(where, monkeypatch):
    """generate_ids on a caller's cache, two rows: a step that raises (a MemoryError in the output head, after the
    layers wrote the step's keys and the model counted them; on the CPU engine's decode step, after its kernels did;
    non-finite logits in pre-fill) propagates, and leaves each row at the positions of the steps that completed. The
    cache then goes on exactly: a decode step on it gives the logits of a fresh forward over what each row holds, even
    for the shorter row, whose keys past its end the failed step wrote (NaN, in the last case) and attention masks."""
    from mistral.cache import RotatingBufferCache
    from mistral.cpu import CpuDecoder, kernels

    model = random_model(tiny_params(sliding_window=None, rope_theta=1e4))
    if where == "engine" and CpuDecoder.of(model) is None:
        pytest.skip("the CPU engine does not apply here")
    args = model.args
    cache = RotatingBufferCache(args.n_layers, 2, 40, args.n_kv_heads, args.head_dim)
    first, _ = generate_ids([PROMPTS[1], PROMPTS[2]], model, max_tokens=3, cache=cache)
    held = [PROMPTS[1] + first[0][:-1], PROMPTS[2] + first[1][:-1]]  # (3 + 2, 13 + 2): row 0 is the shorter
    assert cache.seq_pos[:2] == [len(h) for h in held]
    bad = next(t for t in range(args.vocab_size) if t not in held[0] + held[1])
    new = [[first[0][-1], bad, 8], [first[1][-1], 9]]
    sampled = [[], []]
    if where == "nan":  # row 0's second new token has a NaN embedding: its pre-fill gives NaN logits
        with torch.no_grad():
            model.tok_embeddings.weight[bad] = float("nan")
    elif where == "head":  # the third step: pre-fill, one decode step, then this one
        calls = []

        def head(module, inputs):
            calls.append(None)
            if len(calls) == 3:
                raise MemoryError("injected")

        model.output.register_forward_pre_hook(head)
    else:  # the engine's second decode step (each row has sampled 2 tokens), once its kernels ran, in its head
        real = kernels.stacked

        def stacked(*a, **k):
            if sum(map(len, sampled)) == 4:
                raise MemoryError("injected")
            return real(*a, **k)

        monkeypatch.setattr(kernels, "stacked", stacked)
    with pytest.raises(MistralError if where == "nan" else MemoryError, match="non-finite|injected"):
        generate_ids(new, model, max_tokens=5, cache=cache, engine=where != "head",
                     on_token=lambda row, token: sampled[row].append(token))
    monkeypatch.undo()
    if where == "nan":  # nothing completed
        assert sampled == [[], []]
        now = held
    else:  # the pre-fill and one decode step completed: each row holds its new ids and its first sampled token
        assert [len(s) for s in sampled] == [2, 2]
        now = [held[b] + new[b] + sampled[b][:1] for b in range(2)]
    assert cache.seq_pos[:2] == [len(n) for n in now]
    with torch.no_grad():
        got = model(torch.tensor([11, 12]), [1, 1], cache)  # (2, V): one decode step of both rows on the cache
        want = torch.stack([model(torch.tensor(n + [t]), [len(n) + 1])[-1] for n, t in zip(now, [11, 12])])
    assert torch.isfinite(want).all()
    torch.testing.assert_close(got, want)


def test_a_budget_lets_decoding_rows_go_on_while_a_prompt_comes_in_whole_chunks():
    from mistral.generate import NEW, Row, plan_step

    rows = [Row([1, 2, 3], 5), Row(list(range(10, 40)), 5), Row(list(range(50, 70)), 5), None]
    plan = plan_step(rows, chunk_size=8, budget=12)  # row 0 (3 tokens) and row 1's first chunk: 11; row 2 waits
    assert plan.seqlens == [3, 8, 0, 0] and plan.targets == [NEW]
    rows[0].take(99, 0.0, new=True)
    plan = plan_step(rows, chunk_size=8, budget=12)  # row 0 decodes; 11 left: row 1's next 8; row 2's 8 do not fit
    assert plan.seqlens == [1, 8, 0, 0] and plan.inputs[0] == 99
    plan = plan_step(rows, chunk_size=8, budget=4)  # a chunk over the budget still goes when it is the only one
    assert plan.seqlens == [1, 8, 0, 0]


def test_rows_with_their_own_sampling_and_generators_pick_as_they_would_alone():
    from mistral.cache import RotatingBufferCache
    from mistral.generate import Batch, Row
    from mistral.runners import Runner
    from mistral.sampling import SamplingParams

    model = random_model(tiny_params())
    args = model.args

    def run(prompts_and_seeds, split):
        cache = RotatingBufferCache(args.n_layers, len(prompts_and_seeds), W, args.n_kv_heads, args.head_dim)
        batch = Batch(model, cache, Runner(model), chunk_size=4, budget=6, strict=False, split=split)
        batch.rows = [Row(p, 8, None, SamplingParams(t, 0.9, 0), torch.Generator().manual_seed(s), top_logprobs=2)
                      for p, s, t in prompts_and_seeds]
        while batch.step():
            pass
        return [(r.generated, r.logprobs, r.top) for r in batch.rows]

    asks = [(PROMPTS[0], 1, 0.8), (PROMPTS[1], 2, 0.0), (PROMPTS[2], 3, 1.5)]
    together = run(asks, split=True)
    for ask, got in zip(asks, together):
        alone = run([ask], split=True)[0]
        # The same draws; the numbers to rounding (the fp32 kernel sums one row in another order beside others).
        assert got[0] == alone[0]
        assert [[t for t, _ in top] for top in got[2]] == [[t for t, _ in top] for top in alone[2]]
        torch.testing.assert_close(torch.tensor(got[1]), torch.tensor(alone[1]), rtol=0, atol=1e-5)
    packed = run(asks, split=False)
    for got, want in zip(packed, together):
        assert got[0] == want[0]
        torch.testing.assert_close(torch.tensor(got[1]), torch.tensor(want[1]), rtol=0, atol=1e-5)
    for generated, logprobs, top in together:  # the top pairs hold the sampled token's logprob where it is the top
        assert all(len(pairs) == 2 and pairs[0][1] >= pairs[1][1] for pairs in top)
