"""Logits on every path (packed, cached, chunked, decode) against the naive oracle in tests/oracle.py."""
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, engine_first, random_model, tiny_params
from oracle import oracle_logits

from mistral.cache import RotatingBufferCache
from mistral.errors import MistralError
from mistral.moe import MoeLayer
from mistral.model import FeedForward

W = 5
PROMPTS = [[3, 9, 27, 17, 51, 25, 11, 33, 3, 9, 60, 1, 2], [5, 6, 7], list(range(40, 57)),
           [8, 1, 4, 2, 63, 0, 12, 7, 7, 30, 31]]


def expected(model, seqs):
    """Oracle logits of each sequence, concatenated in packed order, on the model's device (computed on the CPU)."""
    p = {k: v for k, v in vars(model.args).items()}
    p["moe"] = vars(model.args.moe) if model.args.moe else None
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    return torch.cat([oracle_logits(state, p, s) for s in seqs]).float().to(model.device)


def run_schedule(model, seqs, schedule, window=W, forward=None):
    """Feed seqs through a cache, step k giving row b the next schedule(b, k) tokens, each step through forward (the
    model, unless said). Returns each sequence's logits, concatenated in packed order."""
    forward = forward or model
    cache = RotatingBufferCache(model.n_local_layers, len(seqs), window, model.args.n_kv_heads, model.args.head_dim,
                                device=model.device, windows=model.layer_windows)
    fed, outs = [0] * len(seqs), [[] for _ in seqs]
    for step in range(10_000):
        lens = [min(schedule(b, step), len(s) - fed[b]) for b, s in enumerate(seqs)]
        if not any(lens):
            break
        ids = torch.tensor([t for b, s in enumerate(seqs) for t in s[fed[b] : fed[b] + lens[b]]], device=model.device)
        logits = forward(ids, lens, cache)
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
    # Per-layer windows: the cache holds the widest (W), each layer's mask its own; and a window beside full attention.
    "layer windows": tiny_params(sliding_window=[3, W]),
    "window and full": tiny_params(sliding_window=[3, None]),
}


@pytest.fixture(params=["engine", "torch only"])
def cpu_ops(request):
    """cpu_ops(model): what runs each step. "engine": decode steps on mistral.cpu's engine, every other step on the
    model, as generate dispatches them; "torch only": the model, as on a machine without a C compiler (and, for
    attention, CUDA without xformers): SDPA, F.rms_norm, F.linear."""
    return (lambda model: model) if request.param == "torch only" else engine_first


@pytest.mark.parametrize("name", CONFIGS)
def test_packed_prompts_match_oracle(name, device):
    model = random_model(CONFIGS[name]).to(device)
    ids = torch.tensor(sum(PROMPTS, []), device=device)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, [len(p) for p in PROMPTS]), expected(model, PROMPTS))


@pytest.mark.parametrize("name", CONFIGS)
def test_one_prefill_into_cache_matches_oracle(name, device):
    model = random_model(CONFIGS[name]).to(device)
    window = W if model.args.window else 64
    with torch.no_grad():
        got = run_schedule(model, PROMPTS, lambda b, k: 10_000, window)
    torch.testing.assert_close(got, expected(model, PROMPTS))


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, W - 1, W, W + 1, 3 * W])
@pytest.mark.parametrize("name", ["gqa", "moe", "layer windows", "window and full"])
def test_chunked_prefill_matches_one_pass(name, chunk, device):
    model = random_model(CONFIGS[name]).to(device)
    seqs = [PROMPTS[0], PROMPTS[2], PROMPTS[3]]  # all longer than 2W
    with torch.no_grad():
        full = model(torch.tensor(sum(seqs, []), device=device), [len(s) for s in seqs])
        got = run_schedule(model, seqs, lambda b, k: chunk, W if model.args.window else 64)
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
        got = run_schedule(model, seqs, schedule, forward=cpu_ops(model))
    torch.testing.assert_close(got, expected(model, seqs))


@pytest.mark.parametrize("name", ["gqa", "moe", "layer windows", "window and full"])
def test_decode_far_past_window_matches_oracle_every_step(name, cpu_ops, device):
    """Two rows decode one token per step for 4W steps after different prompt lengths; every step's
    logits are compared with a full recompute. Row 0 stops early, so later steps use a subset of rows. With
    per-layer windows, the narrower layer's keys at decode are a stretch of the ring that wraps around its end."""
    model = random_model(CONFIGS[name]).to(device)
    seqs = [[(7 * i + 3) % 64 for i in range(2 + 3 * W)], [(5 * i + 1) % 64 for i in range(3 + 4 * W)]]
    prompt = [2, 3]
    slots = W if model.args.window else 32
    cache = RotatingBufferCache(model.n_local_layers, 3, slots, model.args.n_kv_heads, model.args.head_dim,
                                device=device, windows=model.layer_windows)
    forward = cpu_ops(model)
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model(torch.tensor(seqs[0][:2] + seqs[1][:3], device=device), [2, 3], cache)
        fed = list(prompt)
        while fed[1] < len(seqs[1]):
            rows = [b for b in range(2) if fed[b] < len(seqs[b])]
            lens = [1 if b in rows else 0 for b in range(2)]
            logits = forward(torch.tensor([seqs[b][fed[b]] for b in rows], device=device), lens, cache).cpu()
            for i, b in enumerate(rows):
                fed[b] += 1
                want = oracle_logits(state, _params(model), seqs[b][: fed[b]])[-1].float()
                torch.testing.assert_close(logits[i], want, msg=lambda m: f"row {b} at position {fed[b] - 1}: {m}")


def test_weights_replaced_between_generations_are_used():
    """generate's engine gathers the weights for its own steps only: a weight replaced afterwards (a new tensor, not
    changed in place) is what the next generation reads, as torch's own layers read it."""
    from mistral.generate import generate_ids

    model = random_model(CONFIGS["gqa"])
    prompts = [[1, 2, 3], [4, 5]]
    generate_ids(prompts, model, max_tokens=6)
    for block in model.layers.values():
        w2 = block.feed_forward.w2
        w2.weight = torch.nn.Parameter(torch.randn_like(w2.weight) * 0.3, requires_grad=False)
    got = generate_ids(prompts, model, max_tokens=6)
    want = generate_ids(prompts, model, max_tokens=6, engine=False)  # torch's layers only
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


def test_a_cache_with_more_slots_than_the_window_is_refused():
    """The mask takes W from the model, the slot arithmetic N from the cache. With N > W a decode step would read
    keys older than the window (every valid slot is attended), so such a cache is refused, not run."""
    model = random_model(CONFIGS["gqa"])
    cache = RotatingBufferCache(model.n_local_layers, 1, W + 3, model.args.n_kv_heads, model.args.head_dim)
    with torch.no_grad(), pytest.raises(MistralError, match=f"8 slots per row but the model's window is {W}"):
        model(torch.tensor(PROMPTS[0][:3]), [3], cache)


@pytest.mark.parametrize("name", ["gqa", "no_window"])
def test_fewer_slots_than_the_window_until_full_then_a_clear_error(name, cpu_ops):
    """A cache of N < W slots (or of N positions for a model without a window) serves a sequence of up to N
    positions exactly, in chunks and at decode, and refuses the position that would overwrite a key still needed."""
    model = random_model(tiny_params(sliding_window=40) if name == "gqa" else CONFIGS[name])
    forward = cpu_ops(model)
    seq, n = PROMPTS[2][:12], 12
    cache = RotatingBufferCache(model.n_local_layers, 1, n, model.args.n_kv_heads, model.args.head_dim)
    outs = []
    with torch.no_grad():
        for a, b in [(0, 4), (4, 9), (9, 10), (10, 11), (11, 12)]:  # chunks, then decode steps
            outs.append(forward(torch.tensor(seq[a:b]), [b - a], cache))
        torch.testing.assert_close(torch.cat(outs), expected(model, [seq]))
        with pytest.raises(MistralError, match="would reach 13 positions but the cache holds 12"):
            forward(torch.tensor([1]), [1], cache)


@pytest.mark.parametrize("name", ["gqa", "no_window"])
def test_a_grown_cache_goes_on_exactly(name, cpu_ops):
    """Grown from 6 slots to W (or to 40 without a window) after 6 positions, a row decodes on past W: every logit as
    the oracle's."""
    model = random_model(CONFIGS[name] if name == "no_window" else tiny_params(sliding_window=9))
    forward = cpu_ops(model)
    seq = PROMPTS[2]
    cache = RotatingBufferCache(model.n_local_layers, 2, 6, model.args.n_kv_heads, model.args.head_dim)
    with torch.no_grad():
        outs = [model(torch.tensor(seq[:6]), [6, 0], cache)]
        cache.grow(model.args.sliding_window or 40)
        outs.append(model(torch.tensor(seq[6:8]), [2, 0], cache))
        outs += [forward(torch.tensor([t]), [1, 0], cache) for t in seq[8:]]
    torch.testing.assert_close(torch.cat(outs), expected(model, [seq]))


def test_growing_a_wrapped_cache_is_refused():
    cache = RotatingBufferCache(1, 2, 4, 1, 2)
    cache.seq_pos = [3, 5]
    with pytest.raises(MistralError, match="once a row has wrapped"):
        cache.grow(8)


@pytest.mark.parametrize("name", ["gqa", "no_window"])
def test_a_rewound_row_continues_as_a_fresh_forward(name, cpu_ops):
    """Row 0 is cut back from W positions to 2 and fed other tokens, while row 1 decodes on: their logits are those of
    the sequences as they now stand. Once row 0 has wrapped, it cannot go back."""
    model = random_model(CONFIGS[name])
    a, b, other = PROMPTS[3][:W], PROMPTS[0][:4], [20, 21, 22]
    cache = RotatingBufferCache(model.n_local_layers, 2, W, model.args.n_kv_heads, model.args.head_dim)
    with torch.no_grad():
        model(torch.tensor(a + b), [W, 4], cache)  # row 0 fills its W slots, without wrapping
        cache.rewind(0, 2)
        got = cpu_ops(model)(torch.tensor(other + b[:1]), [3, 1], cache)
        torch.testing.assert_close(got, torch.cat([expected(model, [a[:2] + other])[2:],
                                                   expected(model, [b + b[:1]])[4:]]))
        if name == "gqa":
            model(torch.tensor([9, 9]), [2, 0], cache)  # 7 positions in 5 slots
            with pytest.raises(MistralError, match="has wrapped around its 5 slots"):
                cache.rewind(0, 5)


def test_generate_sizes_the_cache_to_what_the_run_reaches(monkeypatch):
    """min(W, the longest prompt plus max_tokens - 1): a few slots for a short run, W for a long one."""
    from mistral import generate as gen

    sizes = []
    real = gen.RotatingBufferCache

    def spy(*args, **kwargs):
        sizes.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(gen, "RotatingBufferCache", spy)
    for params, max_tokens in [(CONFIGS["gqa"], 1), (CONFIGS["gqa"], 20), (CONFIGS["no_window"], 20)]:
        gen.generate_ids([[1, 2], [3]], random_model(params), max_tokens=max_tokens)
    assert sizes == [2, W, 21]


@pytest.mark.parametrize("name", ["gqa", "moe"])
def test_logits_of_chosen_rows_are_those_of_the_full_forward(name):
    """rows= computes the head for those packed positions only (the last token of each prompt, say): the same
    numbers as the full forward's rows, with and without a cache; a step in which no row brings anything returns
    no logits."""
    model = random_model(CONFIGS[name])
    ids, lens = torch.tensor(sum(PROMPTS, [])), [len(p) for p in PROMPTS]
    last = [sum(lens[: b + 1]) - 1 for b in range(len(lens))]
    with torch.no_grad():
        full = model(ids, lens)
        torch.testing.assert_close(model(ids, lens, rows=last), full[last], rtol=0, atol=1e-6)
        cache = RotatingBufferCache(model.n_local_layers, 4, W, model.args.n_kv_heads, model.args.head_dim)
        torch.testing.assert_close(model(ids, lens, cache, rows=[0, 5, 20]), full[[0, 5, 20]], rtol=0, atol=1e-6)
        nothing = model(torch.tensor([], dtype=torch.long), [0, 0, 0, 0], cache)
        assert nothing.shape == (0, model.args.vocab_size) and cache.seq_pos == lens
        with pytest.raises(MistralError, match="rows must be positions of the 4 packed tokens"):
            model(torch.tensor([1, 2, 3, 4]), [1, 1, 1, 1], cache, rows=[4])


def test_the_definition_imports_no_engine_and_no_weight_format():
    """mistral/model.py is the model's definition alone: importing it loads neither the CPU engine nor the formats."""
    code = "import sys, mistral.model; print(sorted(m for m in sys.modules if m.startswith('mistral.')))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    loaded = eval(done.stdout)
    assert not [m for m in loaded if m.startswith(("mistral.cpu", "mistral.quantize", "mistral.generate"))], loaded


def test_each_layer_keeps_a_cache_of_its_own_window():
    """windows [3, 5, 3, None]: layers of window 3 keep 3 slots, the others all N; a narrower layer wraps first, so a
    row can go back only while it has not; growing leaves the narrow layers as they are, wrapped or not."""
    args = tiny_params(n_layers=4, sliding_window=[3, 5, 3, None])
    model = random_model(args)
    cache = RotatingBufferCache(4, 2, 8, model.args.n_kv_heads, model.args.head_dim, windows=model.layer_windows)
    assert [k.shape[2] for k in cache.k] == [3, 5, 3, 8] and sorted(cache.groups) == [3, 5, 8]
    with torch.no_grad():
        model(torch.arange(3), [3, 0], cache)
        assert cache.can_rewind(0)
        model(torch.tensor([4]), [1, 0], cache)
    assert not cache.can_rewind(0) and cache.can_rewind(1)  # layers 0 and 2 wrapped at position 3
    cache.grow(12)
    assert [k.shape[2] for k in cache.k] == [3, 5, 3, 12]
    seq = [7, 1, 9, 4, 30, 2, 5, 11, 60, 3]
    with torch.no_grad():
        got = model(torch.tensor(seq[4:]), [len(seq) - 4, 0], cache)
    # The row went on from its 4 positions after the grow: the same logits as one pass over all of them.
    torch.testing.assert_close(got, expected(model, [[0, 1, 2, 4] + seq[4:]])[4:])


def test_a_cache_without_the_models_windows_is_refused():
    model = random_model(tiny_params(sliding_window=[3, None]))
    cache = RotatingBufferCache(2, 1, 16, model.args.n_kv_heads, model.args.head_dim)
    with pytest.raises(MistralError, match=r"windows of their own \(\[3, None\]\).*windows=model.layer_windows"):
        model(torch.tensor([1, 2]), [2], cache)
