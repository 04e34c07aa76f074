"""Logits on every path (packed, cached, chunked, decode) against the naive oracle in tests/oracle.py."""
import pytest
import torch
from helpers import random_model, tiny_params
from oracle import oracle_logits

import mistral.model
from mistral import kernels
from mistral.cache import RotatingBufferCache
from mistral.moe import MoeLayer
from mistral.model import FeedForward

W = 5
PROMPTS = [[3, 9, 27, 17, 51, 25, 11, 33, 3, 9, 60, 1, 2], [5, 6, 7], list(range(40, 57)), [8, 1, 4, 2, 63, 0, 12, 7, 7, 30, 31]]


def expected(model, seqs):
    """Oracle logits of each sequence, concatenated in packed order."""
    p = {k: v for k, v in vars(model.args).items()}
    p["moe"] = vars(model.args.moe) if model.args.moe else None
    return torch.cat([oracle_logits(model.state_dict(), p, s) for s in seqs]).float()


def run_schedule(model, seqs, schedule, window=W):
    """Feed seqs through a cache, step k giving row b the next schedule(b, k) tokens.
    Returns each sequence's logits, concatenated in packed order."""
    cache = RotatingBufferCache(model.n_local_layers, len(seqs), window, model.args.n_kv_heads, model.args.head_dim)
    fed, outs = [0] * len(seqs), [[] for _ in seqs]
    for step in range(10_000):
        lens = [min(schedule(b, step), len(s) - fed[b]) for b, s in enumerate(seqs)]
        if not any(lens):
            break
        ids = torch.tensor([t for b, s in enumerate(seqs) for t in s[fed[b] : fed[b] + lens[b]]])
        logits = model(ids, lens, cache)
        for b, part in enumerate(logits.split(lens)):
            outs[b].append(part)
        fed = [f + n for f, n in zip(fed, lens)]
    return torch.cat([torch.cat(o) for o in outs])


CONFIGS = {
    "gqa": tiny_params(),
    "mqa": tiny_params(n_kv_heads=1),
    "mha": tiny_params(n_kv_heads=4),
    "no_window": tiny_params(sliding_window=None, rope_theta=None),
    "moe": tiny_params(moe={"num_experts": 4, "num_experts_per_tok": 2}),
}


@pytest.fixture(params=["C kernels", "torch only"])
def cpu_ops(request, monkeypatch):
    """Decode on a CPU runs mistral.kernels where they are built; "torch only" is the path of a machine
    without a C compiler (and, for attention, of CUDA without xformers): SDPA, F.rms_norm, F.linear."""
    if request.param == "torch only":
        monkeypatch.setattr(kernels, "_lib", None)
        monkeypatch.setattr(kernels, "_tried", True)
    return request.param


@pytest.mark.parametrize("name", CONFIGS)
def test_packed_prompts_match_oracle(name):
    model = random_model(CONFIGS[name])
    ids = torch.tensor(sum(PROMPTS, []))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, [len(p) for p in PROMPTS]), expected(model, PROMPTS))


@pytest.mark.parametrize("name", CONFIGS)
def test_one_prefill_into_cache_matches_oracle(name):
    model = random_model(CONFIGS[name])
    window = W if model.args.sliding_window else 64
    with torch.no_grad():
        got = run_schedule(model, PROMPTS, lambda b, k: 10_000, window)
    torch.testing.assert_close(got, expected(model, PROMPTS))


@pytest.mark.parametrize("chunk", [1, W - 1, W, W + 1, 3 * W])
@pytest.mark.parametrize("name", ["gqa", "moe"])
def test_chunked_prefill_matches_one_pass(name, chunk):
    model = random_model(CONFIGS[name])
    seqs = [PROMPTS[0], PROMPTS[2], PROMPTS[3]]  # all longer than 2W
    with torch.no_grad():
        full = model(torch.tensor(sum(seqs, [])), [len(s) for s in seqs])
        got = run_schedule(model, seqs, lambda b, k: chunk)
    torch.testing.assert_close(got, full)
    torch.testing.assert_close(got, expected(model, seqs))


def test_ragged_batch_mixes_prefill_chunks_and_decode(cpu_ops):
    """Rows with their own chunk sizes finish pre-fill in different steps; the finished ones then go on
    one token per step (decode) in the same batches as chunks of the others, and one row idles a while."""
    model = random_model(CONFIGS["gqa"])
    sizes = [4, 2, 7, 3]

    def schedule(b, k):
        if b == 3 and 2 <= k < 5:
            return 0  # nothing this step for row 3
        prompt_steps = -(-len(PROMPTS[b][:8]) // sizes[b])
        return sizes[b] if k < prompt_steps else 1

    seqs = [p + p[:6] for p in PROMPTS]  # long enough to decode past W after the first 8 tokens
    with torch.no_grad():
        got = run_schedule(model, seqs, schedule)
    torch.testing.assert_close(got, expected(model, seqs))


@pytest.mark.parametrize("name", ["gqa", "moe"])
def test_decode_far_past_window_matches_oracle_every_step(name, cpu_ops):
    """Two rows decode one token per step for 4W steps after different prompt lengths; every step's
    logits are compared with a full recompute. Row 0 stops early, so later steps use a subset of rows."""
    model = random_model(CONFIGS[name])
    seqs = [[(7 * i + 3) % 64 for i in range(2 + 3 * W)], [(5 * i + 1) % 64 for i in range(3 + 4 * W)]]
    prompt = [2, 3]
    cache = RotatingBufferCache(model.n_local_layers, 3, W, model.args.n_kv_heads, model.args.head_dim)
    with torch.no_grad():
        model(torch.tensor(seqs[0][:2] + seqs[1][:3]), [2, 3], cache)
        fed = list(prompt)
        while fed[1] < len(seqs[1]):
            rows = [b for b in range(2) if fed[b] < len(seqs[b])]
            lens = [1 if b in rows else 0 for b in range(2)]
            logits = model(torch.tensor([seqs[b][fed[b]] for b in rows]), lens, cache)
            for i, b in enumerate(rows):
                fed[b] += 1
                want = oracle_logits(model.state_dict(), _params(model), seqs[b][: fed[b]])[-1].float()
                torch.testing.assert_close(logits[i], want, msg=lambda m: f"row {b} at position {fed[b] - 1}: {m}")


@pytest.mark.parametrize("name", ["gqa", "moe"])
def test_decode_runs_the_blocks_in_one_kernel_call(monkeypatch, name):
    """On a CPU with the kernels built, each decode step of a dense or MoE model (fp32, int8 and bf16 weights) runs all
    its blocks in one C call. A decline would still give the right logits, only slower, so this is checked here."""
    from mistral import quantize
    from mistral.generate import generate_ids

    if not kernels.available():
        pytest.skip("no C compiler: the kernels cannot be built here")
    real, answers = kernels.blocks, []

    def counted(*args):
        answers.append(real(*args))
        return answers[-1]

    monkeypatch.setattr(kernels, "blocks", counted)
    for convert in (lambda m: m, quantize.quantize_int8, lambda m: quantize.bf16_weight_only(m.bfloat16())):
        model = convert(random_model(CONFIGS[name]))
        answers.clear()
        generate_ids([[1, 2, 3], [4, 5]], model, max_tokens=5)  # one pre-fill step, then 4 decode steps
        assert len(answers) == 4 and all(a is not None for a in answers)
        assert mistral.model._kept is None  # generate's steady() kept the plan for its own steps only


def test_weights_replaced_between_generations_are_used(monkeypatch):
    """generate keeps the gathered weights for its own steps only: a weight replaced afterwards (a new tensor, not
    changed in place) is what the next generation reads, as torch's own layers read it."""
    from mistral.generate import generate_ids

    model = random_model(CONFIGS["gqa"])
    prompts = [[1, 2, 3], [4, 5]]
    generate_ids(prompts, model, max_tokens=6)
    for block in model.layers.values():
        w2 = block.feed_forward.w2
        w2.weight = torch.nn.Parameter(torch.randn_like(w2.weight) * 0.3, requires_grad=False)
    got = generate_ids(prompts, model, max_tokens=6)
    monkeypatch.setattr(kernels, "_lib", None)  # torch's layers only
    monkeypatch.setattr(kernels, "_tried", True)
    want = generate_ids(prompts, model, max_tokens=6)
    assert got[0] == want[0]
    for lps, want_lps in zip(got[1], want[1]):
        torch.testing.assert_close(torch.tensor(lps), torch.tensor(want_lps), rtol=0, atol=1e-5)


def _params(model):
    p = dict(vars(model.args))
    p["moe"] = vars(model.args.moe) if model.args.moe else None
    return p


@pytest.mark.parametrize("path", ["packed", "chunked", "decode"])
def test_window_boundary(path):
    """One layer, so a token influences position i only through attention. The token at distance W-1
    must change the logits at i and the one at distance W must not, on every path."""
    model = random_model(tiny_params(n_layers=1))
    i = 3 * W + 2
    base = [(3 * t + 1) % 64 for t in range(i + 1)]

    def logits_at_i(seq):
        with torch.no_grad():
            if path == "packed":
                return model(torch.tensor(seq), [len(seq)])[i]
            if path == "chunked":  # the query at i arrives in a chunk; the far key comes from the cache
                return run_schedule(model, [seq], lambda b, k: 4)[i]
            return run_schedule(model, [seq], lambda b, k: i if k == 0 else 1)[i]

    ref = logits_at_i(base)
    at_w = list(base)
    at_w[i - W] = (at_w[i - W] + 17) % 64
    torch.testing.assert_close(logits_at_i(at_w), ref, rtol=0, atol=1e-6)
    inside = list(base)
    inside[i - W + 1] = (inside[i - W + 1] + 17) % 64
    assert (logits_at_i(inside) - ref).abs().max() > 1e-3


def test_moe_layer_matches_per_token_loop():
    torch.manual_seed(0)
    dim, hidden, E, K = 16, 24, 6, 2
    experts = [FeedForward(dim, hidden) for _ in range(E)]
    layer = MoeLayer(experts, torch.nn.Linear(dim, E, bias=False), K)
    x = torch.randn(11, dim)
    want = torch.zeros_like(x)
    for t in range(x.shape[0]):
        scores = layer.gate.weight @ x[t]
        top = sorted(range(E), key=lambda e: -scores[e].item())[:K]
        weights = torch.softmax(scores[top], dim=0)
        for w, e in zip(weights, top):
            ff = experts[e]
            want[t] += w * (ff.w2.weight @ (torch.nn.functional.silu(ff.w1.weight @ x[t]) * (ff.w3.weight @ x[t])))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want)
        for t in range(x.shape[0]):  # one token alone: the decode path
            torch.testing.assert_close(layer(x[t : t + 1]), want[t : t + 1])
