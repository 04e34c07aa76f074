"""A decode step torch.compile captures whole (mistral/compiled.py; issue #20, item 11)."""
import copy

import torch
from helpers import SIX_EXPERTS as MOE, random_model, tiny_params

from mistral.cache import RotatingBufferCache
from mistral.compiled import CompiledDecoder
from mistral.generate import generate_ids
from mistral.grouped import group_experts


def test_the_decode_step_compiles_in_full_once_and_gives_the_eager_logits():
    """fullgraph=True: any graph break fails the compile. One graph serves every step, wrapping past the N slots
    and rows at different positions included; its logits are the eager model's. The backend runs the captured graph
    as it is (no code generation, which takes minutes on a small CPU; a GPU run compiles it with inductor)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model = random_model(tiny_params(n_layers=3))
    args, N = model.args, model.args.sliding_window
    prompts = [[1, 5, 9, 2, 7, 3], [4, 8]]
    eager = RotatingBufferCache(3, 2, N, args.n_kv_heads, args.head_dim)
    cache = RotatingBufferCache(3, 2, N, args.n_kv_heads, args.head_dim)
    decoder = CompiledDecoder(model, cache, backend=backend)
    with torch.no_grad():
        for c in (eager, cache):
            model(torch.tensor(sum(prompts, [])), [len(p) for p in prompts], c)
        torch.manual_seed(1)
        for step in range(2 * N):
            ids = torch.randint(0, args.vocab_size, (2,))
            want = model(ids, [1, 1], eager)
            got = decoder.step(ids, [1, 1], cache)
            torch.testing.assert_close(got, want)
            torch.testing.assert_close(cache.cache_k, eager.cache_k)  # the same keys in the same slots
    assert len(graphs) == 1 and cache.seq_pos == eager.seq_pos == [6 + 2 * N, 2 + 2 * N]


def test_a_grouped_mixtures_decode_step_compiles_in_full_and_gives_the_eager_logits():
    """With its experts grouped a mixture's step holds no host read, so it too is captured whole. bf16, because
    torch's grouped product is traced for bf16 only. Its logits are the eager grouped model's, and those the plain
    MoeLayer model's within bf16's rounding."""
    graphs = []
    torch._dynamo.reset()
    plain = random_model(tiny_params(**MOE)).to(torch.bfloat16)
    model = copy.deepcopy(plain)
    group_experts(model)
    assert CompiledDecoder.takes(model) and not CompiledDecoder.takes(plain)
    args, N = model.args, model.args.sliding_window
    prompts = [[1, 5, 9, 2, 7, 3], [4, 8]]
    caches = [RotatingBufferCache(2, 2, N, args.n_kv_heads, args.head_dim, dtype=torch.bfloat16) for _ in range(3)]
    decoder = CompiledDecoder(model, caches[2], backend=lambda gm, inputs: graphs.append(gm) or gm.forward)
    with torch.no_grad():
        for m, c in zip((plain, model, model), caches):
            m(torch.tensor(sum(prompts, [])), [len(p) for p in prompts], c)
        torch.manual_seed(1)
        for step in range(2 * N):
            ids = torch.randint(0, args.vocab_size, (2,))
            want, eager = plain(ids, [1, 1], caches[0]), model(ids, [1, 1], caches[1])
            got = decoder.step(ids, [1, 1], caches[2])
            torch.testing.assert_close(got, eager)
            torch.testing.assert_close(got, want, rtol=0, atol=0.05 * want.abs().max().item())
    assert len(graphs) == 1


def test_generate_takes_the_compiled_step_for_decode_and_the_model_for_the_rest():
    graphs = []
    torch._dynamo.reset()
    model = random_model(tiny_params())
    cache = RotatingBufferCache(2, 2, model.args.sliding_window, model.args.n_kv_heads, model.args.head_dim)
    decoder = CompiledDecoder(model, cache, backend=lambda gm, inputs: graphs.append(gm) or gm.forward)
    prompts = [[1, 5, 9, 2, 7, 3, 8], [4, 8]]
    want = generate_ids(prompts, model, max_tokens=9, chunk_size=3, engine=False)
    got = generate_ids(prompts, model, max_tokens=9, chunk_size=3, engine=False, cache=cache, compiled=decoder)
    assert got[0] == want[0] and len(graphs) == 1
    torch.testing.assert_close(torch.tensor(sum(got[1], [])), torch.tensor(sum(want[1], [])))


def test_steps_that_cannot_be_captured_are_declined():
    moe = random_model(tiny_params(moe={"num_experts": 4, "num_experts_per_tok": 2}))
    assert not CompiledDecoder.takes(moe)  # the routing reads the expert counts on the host
    model = random_model(tiny_params())
    cache = RotatingBufferCache(2, 2, model.args.sliding_window, model.args.n_kv_heads, model.args.head_dim)
    decoder = CompiledDecoder(model, cache, backend="eager")
    assert decoder.step(torch.tensor([1, 2, 3]), [2, 1], cache) is None  # a chunk
    assert decoder.step(torch.tensor([1]), [1, 0], cache) is None  # a row sits it out
    assert decoder.step(torch.tensor([1, 2]), [1, 1], None) is None  # another cache
    assert cache.seq_pos == [0, 0]
