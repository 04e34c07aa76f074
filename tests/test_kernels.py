"""The CPU decode kernels (mistral/cpu/kernels.py and kernels.c) against float64 computations by torch. Where the
compiled library may come from: tests/test_kernel_build.py."""
import ctypes
import mmap

import pytest
import torch
from helpers import rounded_per_group

from mistral import quantize
from mistral.cpu import kernels, linears
from mistral.rope import inverse_frequencies

# Every tile of the kernel: M = 1, 2, 3 and blocks of 4 plus a remainder; K with and without a tail of
# fewer than 8 (and than 8 * U) inputs; N from 1 up. For x rounded per group (int8 and 4-bit weights),
# K = 300, 485 and 768 take groups eight at a time (300 and 485 one at a time after them, the last one short), the
# others one at a time.
ROWS = [1, 2, 3, 4, 5, 7, 8, 16]
# 4-bit weights take any number of rows (pre-fill): past 16, x is rounded by all the threads together.
ROWS4 = ROWS + [17, 63]
SHAPES = [(1, 1), (3, 7), (5, 8), (17, 24), (33, 40), (64, 131), (20, 300), (300, 768), (9, 485)]


def reference(x, w, scales=None):
    """x @ w^T in float64, w as stored (times its scales); for int8 and 4-bit w, x first rounded as the kernel rounds
    it."""
    if w.dtype == torch.uint8:
        return rounded_per_group(x) @ quantize.int4_dequantized(w, scales, x.shape[1]).double().T
    w64 = w.double() if scales is None else w.double() * scales.double()[:, None]
    return (rounded_per_group(x) if w.dtype == torch.int8 else x.double()) @ w64.T  # (M, N)


def weights_of(dtype, N, K, gen):
    if dtype == torch.int8:
        return torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=gen), torch.rand(N, generator=gen) / 64
    if dtype == torch.uint8:  # 4 bits: packed (N, G * 16) and fp16 scales (N, G)
        return quantize.int4_rows(torch.randn(N, K, generator=gen))
    return torch.randn(N, K, generator=gen).to(dtype), None


DTYPES = [torch.float32, torch.bfloat16, torch.int8, torch.uint8]


@pytest.fixture(scope="module", autouse=True)
def compiled(c_compiler):
    assert kernels.available(), "a C compiler is present, so the kernel must build: see the warning logged above"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", ROWS)
def test_matches_float64(dtype, M):
    gen = torch.Generator().manual_seed(M)
    for N, K in SHAPES:
        x = torch.randn(M, K, generator=gen)
        w, scales = weights_of(dtype, N, K, gen)
        assert kernels.usable(x, w)
        got = kernels.matvec(x, w, scales)
        assert got.dtype == torch.float32 and got.shape == (M, N)
        want = reference(x, w, scales)
        # fp32 sums of K products: error grows like sqrt(K) times the size of a product
        biggest = {torch.int8: 127 / 64, torch.uint8: 3 * 4.0}.get(dtype) or w.float().abs().max().item()
        atol = 1e-5 * K ** 0.5 * biggest
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_rows_product_is_the_same_whatever_rows_come_with_it(dtype):
    """Each row of x gets the same bits alone as among 2 to 9 rows (a batch, or a verified draft: mistral/speculate.py):
    so greedy decoding picks the same tokens whatever else a step carries."""
    gen = torch.Generator().manual_seed(5)
    for N, K in SHAPES:
        x = torch.randn(9, K, generator=gen)
        w, scales = weights_of(dtype, N, K, gen)
        alone = torch.cat([kernels.matvec(x[m : m + 1], w, scales) for m in range(9)])
        for M in range(2, 10):
            assert torch.equal(kernels.matvec(x[:M], w, scales), alone[:M]), (N, K, M)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8])
@pytest.mark.parametrize("M", [17, 20, 63, kernels.INT8_ROWS, 130])
def test_quantized_weights_take_a_prefills_rows(dtype, M):
    """A pre-fill's rows: x rounded per group by all the threads together, in blocks of rows (130 rows of K = 768
    make two), against int4 weights (any number of rows) and int8 weights (up to INT8_ROWS; rows ending inside a
    group)."""
    gen = torch.Generator().manual_seed(M)
    if dtype == torch.int8 and M > kernels.INT8_ROWS:
        assert not kernels.usable(torch.randn(M, 8), torch.zeros(2, 8, dtype=dtype))
        return
    for N, K in SHAPES:
        x = torch.randn(M, K, generator=gen)
        w, scales = weights_of(dtype, N, K, gen)
        assert kernels.usable(x, w)
        biggest = 127 / 64 if dtype == torch.int8 else 12
        torch.testing.assert_close(kernels.matvec(x, w, scales).double(), reference(x, w, scales), rtol=1e-5,
                                   atol=1e-5 * K ** 0.5 * biggest)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_c_linears_compute_the_formats_products(fmt, monkeypatch):
    """mistral/cpu/linears.py: with_kernels puts C-backed modules in place of Int8Linear and Int4Linear, holding the
    same tensors, once (a second call changes nothing). Their products run in C where the kernel takes x (int8 up to
    INT8_ROWS rows, int4 any number; not under autograd), the torch forward elsewhere, and either way they are the
    format's products: x rounded per group (int8 past INT8_ROWS, int4 past int4_rounded_rows: x as it is, the torch
    forward's bit for bit)."""
    gen = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(300, 40, bias=False)
    torch.nn.init.normal_(lin.weight, generator=gen)
    plain = {"int8": quantize.Int8Linear, "int4": quantize.Int4Linear}[fmt].from_linear(lin)
    model = torch.nn.Sequential(plain)
    assert linears.with_kernels(model) is model and type(model[0]) is not type(plain)
    swapped = model[0]
    assert isinstance(swapped, type(plain)) and swapped.weight is plain.weight and swapped.scales is plain.scales
    linears.with_kernels(model)
    assert model[0] is swapped
    in_c = []
    real = kernels.matvec
    monkeypatch.setattr(kernels, "matvec", lambda *a: in_c.append(1) or real(*a))
    for M in [1, 3, 17, kernels.INT8_ROWS, kernels.INT8_ROWS + 1, 150]:
        x = torch.randn(M, 300, generator=gen)
        in_c.clear()
        with torch.no_grad():
            got, want = swapped(x), plain(x)
        if fmt == "int8" and M > kernels.INT8_ROWS or fmt == "int4" and M > quantize.int4_rounded_rows():
            assert not in_c and torch.equal(got, want)
        else:
            assert in_c == [1]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * 300 ** 0.5 * want.abs().max().item())
    x = torch.randn(2, 300, generator=gen, requires_grad=True)
    in_c.clear()
    assert torch.equal(swapped(x), plain(x)) and not in_c  # autograd: torch's forward


@pytest.mark.parametrize("K", [100, 768])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_dequantize_is_int4_dequantized(K, dtype):
    """kernels.int4_dequantize (C, for the products past int4_rounded_rows) against quantize.int4_dequantized (torch),
    then torch's rounding to bf16: equal, a short last group included."""
    packed, scales = quantize.int4_rows(torch.randn(37, K, generator=torch.Generator().manual_seed(K)))
    got = kernels.int4_dequantize(packed, scales, torch.empty(37, K, dtype=dtype))
    assert torch.equal(got, quantize.int4_dequantized(packed, scales, K).to(dtype))


@pytest.mark.parametrize("bf16", [False, True])
def test_int4_past_its_rounded_rows_takes_x_as_it_is(bf16, monkeypatch):
    """On a CPU that multiplies bf16 in hardware, past INT4_BF16_ROWS rows an int4 product takes x as it is, x and the
    weights rounded to bf16 (fp32 sums, each output rounded to bf16: within one bf16 unit of the float64 product of
    the bf16 operands); up to INT4_BF16_ROWS, x rounded per group. Elsewhere, x rounded at any count. Torch and C."""
    if bf16 and not quantize.cpu_bf16_matmul():
        pytest.skip("this CPU does not multiply bf16 in hardware: the fp32 case is the one it runs")
    monkeypatch.setattr(quantize, "cpu_bf16_matmul", lambda: bf16)
    gen = torch.Generator().manual_seed(5)
    lin = torch.nn.Linear(320, 96, bias=False)
    torch.nn.init.normal_(lin.weight, generator=gen)
    plain = quantize.Int4Linear.from_linear(lin)
    in_c = linears.CInt4Linear(plain.weight, plain.scales, 320)
    w = quantize.int4_dequantized(plain.weight, plain.scales, 320).double()
    for M in (quantize.INT4_BF16_ROWS, quantize.INT4_BF16_ROWS + 1):
        x = torch.randn(M, 320, generator=gen)
        if bf16 and M > quantize.INT4_BF16_ROWS:
            expected, rtol = x.bfloat16().double() @ w.bfloat16().double().T, 2 ** -7
        else:
            expected, rtol = rounded_per_group(x) @ w.T, 1e-5
        for module in (plain, in_c):
            with torch.no_grad():
                torch.testing.assert_close(module(x).double(), expected, rtol=rtol,
                                           atol=rtol * 0.1 * expected.abs().max().item())


@pytest.mark.parametrize("K", [485, 768])
def test_int8_rows_are_never_read_past_their_end(K):
    """int8 rows are K long, unpadded, and read 32 bytes at a time: w placed so that it ends where a page the process
    may not read begins. A read past the end would kill the process."""
    page = mmap.PAGESIZE
    N = 3
    buf = mmap.mmap(-1, 2 * page)
    start = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    assert ctypes.CDLL(None).mprotect(ctypes.c_void_p(start + page), ctypes.c_size_t(page), 0) == 0  # PROT_NONE
    w = torch.frombuffer(buf, dtype=torch.int8, count=N * K, offset=page - N * K).view(N, K)
    gen = torch.Generator().manual_seed(K)
    w.copy_(torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=gen))
    scales = torch.rand(N, generator=gen) / 64
    for M in (1, 20):
        x = torch.randn(M, K, generator=gen)
        torch.testing.assert_close(kernels.matvec(x, w, scales).double(), reference(x, w, scales), rtol=1e-5,
                                   atol=1e-4)


@pytest.mark.parametrize("M", ROWS4)
def test_int4_rounds_x_within_its_bound(M):
    """Against x unrounded: each element of x is off by at most e / 2 (e its group's max|x| / 127), so each output by
    at most sum_k |w_k| e_k / 2."""
    gen = torch.Generator().manual_seed(M)
    for N, K in SHAPES:
        x = torch.randn(M, K, generator=gen)
        w, scales = weights_of(torch.uint8, N, K, gen)
        w64 = quantize.int4_dequantized(w, scales, K).double()
        top = torch.cat([x[:, g:g + 32].abs().amax(1, keepdim=True).double().expand(M, min(32, K - g))
                         for g in range(0, K, 32)], dim=1)  # (M, K): the max|x| of each element's group
        bound = (top / 127 / 2) @ w64.abs().T
        err = (kernels.matvec(x, w, scales).double() - x.double() @ w64.T).abs()
        assert (err <= bound * 1.001 + 1e-5).all(), (N, K, (err - bound).max())


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8])
@pytest.mark.parametrize("M", [1, 5, 20])
def test_quantized_weights_round_x_as_rounded_per_group(dtype, M):
    """The integers the kernel rounds x to are rounded_per_group's, one by one, even for x at a rounding boundary:
    in each group of 32, its max and then the floats nearest (k + 1/2) / inv, and those one ulp either side, for
    random k, where an inverse inv = 127 / max rounded another way moves x * inv across k + 1/2 (or off an exact
    tie). Read through identity weights (8 groups a row: the AVX2 kernels' groups taken eight at a time), output j
    is x_j rounded, e * its integer."""
    gen = torch.Generator().manual_seed(M)
    K = 256
    top = (0.1 + 4 * torch.rand(M, K // 32, 1, generator=gen)).expand(M, K // 32, 31)
    k = torch.randint(-127, 127, (M, K // 32, 31), generator=gen) + 0.5
    near = k / (torch.full_like(top, 127) / top)  # |near| < top: the max stays the group's first
    step = torch.randint(0, 3, near.shape, generator=gen)
    x = torch.where(step == 0, near.nextafter(near - 1), torch.where(step == 1, near, near.nextafter(near + 1)))
    x = torch.cat([top[..., :1], x], 2).view(M, K)
    eye = torch.eye(K)
    if dtype == torch.uint8:
        w, scales = quantize.int4_rows(eye)  # scales -1/8, weights -8 (1) on the diagonal and 0 elsewhere: exact
    else:
        w, scales = eye.to(torch.int8), torch.ones(K)
    e = (x.view(M, K // 32, 32).abs().amax(2, keepdim=True) / 127).expand(M, K // 32, 32).reshape(M, K)
    got = kernels.matvec(x, w, scales).double() / e  # the kernel's integers, to within its fp32 sums' rounding
    want = rounded_per_group(x) / e
    assert (want - want.round()).abs().max() < 1e-4
    assert (got - want).abs().max() < 0.01, [(j, x[m, j].item(), got[m, j].item(), want[m, j].item())
                                             for m, j in ((got - want).abs() > 0.01).nonzero().tolist()[:5]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 3, 5])
def test_stacked_matches_float64(dtype, M):
    """Two or three matrices side by side (as wq, wk, wv and w1, w3), each with its own rows and scales."""
    gen = torch.Generator().manual_seed(M)
    for rows, K in [((4, 1), 16), ((12, 4, 4), 24), ((7, 1, 33), 131)]:
        x = torch.randn(M, K, generator=gen)
        parts = [weights_of(dtype, N, K, gen) for N in rows]
        got = kernels.stacked(x, kernels.prepare(parts, 3))
        want = torch.cat([reference(x, w, s) for w, s in parts], dim=-1)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * K ** 0.5 * 2)


def test_prepared_pointers_read_the_values_at_each_call():
    """A plan keeps pointers, not values: a weight changed in place is read as it now is."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 8, generator=gen), torch.randn(8, 8, generator=gen)
    prepared = kernels.prepare([(w, None)], 3)
    torch.testing.assert_close(kernels.stacked(x, prepared).double(), reference(x, w), rtol=1e-5, atol=1e-5)
    w.mul_(-2)
    torch.testing.assert_close(kernels.stacked(x, prepared).double(), reference(x, w), rtol=1e-5, atol=1e-5)
    # A transposed square is copied (kept with the pointers), so the product is of the matrix as seen.
    torch.testing.assert_close(kernels.matvec(x, w.t()).double(), reference(x, w.t()), rtol=1e-5, atol=1e-5)


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=gen).T  # (3, 40), strided
    w = torch.randn(40, 50, generator=gen).T  # (50, 40), strided
    torch.testing.assert_close(kernels.matvec(x, w).double(), reference(x, w), rtol=1e-5, atol=1e-4)


def test_not_used_where_it_does_not_apply():
    w = torch.randn(8, 16)
    assert not kernels.usable(torch.randn(1, 16, dtype=torch.float64), w)  # only fp32 activations
    assert not kernels.usable(torch.randn(17, 16), w)  # too many rows (but not for 4-bit weights)
    assert kernels.usable(torch.randn(17, 32), quantize.int4_rows(torch.randn(8, 32))[0])
    assert kernels.usable(torch.randn(17, 32), torch.zeros(8, 32, dtype=torch.int8))
    assert not kernels.usable(torch.randn(kernels.INT8_ROWS + 1, 32), torch.zeros(8, 32, dtype=torch.int8))
    assert not kernels.usable(torch.randn(1, 16), w.half())
    x = torch.randn(1, 16, requires_grad=True)
    assert not kernels.usable(x, w)  # autograd needs torch's ops
    with torch.no_grad():
        assert kernels.usable(x, w)


def mm64(x, pair):
    """x @ w^T in float64 for a (w, scales) pair, as the kernel computes it (see reference)."""
    return reference(x, *pair)


def rotate64(x, positions):
    """RoPE in float64 from its definition: channel pairs (2i, 2i+1) times exp(j * pos * theta^(-2i/D))."""
    D = x.shape[-1]
    angles = positions.double()[:, None] * 1e4 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)  # (M, D/2)
    z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], D // 2, 2).contiguous())
    return torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)[:, None]).flatten(-2)


def attention_reference(x, weights, cache_k, cache_v, rows, slots, lengths, positions, H):
    """The attention of one decode step in float64, token by token; returns (out, cache_k, cache_v) updated."""
    wq, wk, wv, wo = weights
    B, Hkv, W, D = cache_k.shape
    ck, cv = cache_k.double().clone(), cache_v.double().clone()
    q = rotate64(mm64(x, wq).view(-1, H, D), positions)
    k = rotate64(mm64(x, wk).view(-1, Hkv, D), positions)
    v = mm64(x, wv).view(-1, Hkv, D)
    heads = torch.empty(len(rows), H, D, dtype=torch.float64)
    for m, (r, slot, n) in enumerate(zip(rows.tolist(), slots.tolist(), lengths.tolist())):
        ck[r, :, slot], cv[r, :, slot] = k[m], v[m]
        keys = ck[r, :, :n].repeat_interleave(H // Hkv, dim=0)  # (H, n, D)
        values = cv[r, :, :n].repeat_interleave(H // Hkv, dim=0)
        scores = (keys @ q[m][:, :, None]).squeeze(-1) / D**0.5  # (H, n)
        heads[m] = (scores.softmax(-1)[:, None, :] @ values).squeeze(1)
    return mm64(heads.view(len(rows), H * D), wo), ck, cv


def rms64(x, w, eps=1e-5):
    return x.double() / (x.double().pow(2).mean(-1, keepdim=True) + eps).sqrt() * w.double()


def ffn64(x, weights):
    w1, w3, w2 = weights
    gate, up = mm64(x, w1), mm64(x, w3)
    return mm64(gate * torch.sigmoid(gate) * up, w2)


def moe64(x, router, weights, top_k):
    """A mixture of experts in float64, token by token: the top_k experts by router logit, weighted by the softmax of
    their logits. Returns (out, chosen): the experts each token took, as sets."""
    out, chosen = torch.zeros_like(x, dtype=torch.float64), []
    for m, logits in enumerate(x.double() @ router.double().T):
        top = logits.topk(top_k + 1 if top_k < len(logits) else top_k)
        if top_k < len(logits):  # the data must choose clearly: fp32 and float64 sums differ in the last digits
            assert top.values[top_k - 1] - top.values[top_k] > 1e-4, "pick another seed: two logits nearly tie"
        experts = top.indices[:top_k].tolist()
        for p, e in zip(top.values[:top_k].softmax(-1), experts):
            out[m] += p * ffn64(x[m : m + 1], weights[3 * e : 3 * e + 3])[0]
        chosen.append(set(experts))
    return out, chosen


# Dense blocks, and mixtures of experts: 8 experts of which each of the 3 tokens takes 2 (so an expert runs on some of
# the rows, gathered, or on none), and 3 of which each takes all 3 (every expert on every row, in place).
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L", [1, 3])
@pytest.mark.parametrize("moe", [None, (8, 2), (3, 3)], ids=["dense", "8-experts-top-2", "3-experts-top-3"])
def test_blocks_match_float64(dtype, L, moe):
    """Whole blocks one after another, x = h + ffn(norm(h)) with h = x + attention(norm(x)), each layer with its own
    weights, norms and cache, for rows out of order, one of them wrapped."""
    check_blocks(dtype, L, moe, 6, 2, 8)


# Head groups of 3 (the benchmark model), 4 and 6 query heads per kv head, and none shared; head_dim 20 leaves a tail.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H, Hkv, D", [(12, 4, 64), (8, 2, 128), (4, 4, 20), (6, 1, 8)])
def test_blocks_attention_of_every_head_shape(dtype, H, Hkv, D):
    check_blocks(dtype, 1, None, H, Hkv, D)


def check_blocks(dtype, L, moe, H, Hkv, D):
    """Cache lengths around the kernel's blocks of 64 keys (one key, a block and one past it) and a full row whose new
    key lands mid-row (the buffer has wrapped); tokens in another order than the cache rows."""
    gen = torch.Generator().manual_seed(7 + L)
    B, W, dim, hidden = 4, 70, 48, 131
    E, top_k = moe or (1, 1)
    rows, lengths = torch.tensor([2, 0, 3]), torch.tensor([1, 65, W])
    slots = torch.where(lengths < W, lengths - 1, 11)
    positions = torch.where(lengths < W, lengths - 1, 2 * W + 11)
    x = torch.randn(len(rows), dim, generator=gen) * 3
    shapes = ([(H * D, dim), (Hkv * D, dim), (Hkv * D, dim), (dim, H * D)]
              + [(hidden, dim), (hidden, dim), (dim, hidden)] * E)
    layers = []
    for _ in range(L):
        norms = (torch.rand(dim, generator=gen) + 0.5, torch.rand(dim, generator=gen) + 0.5)
        weights = [weights_of(dtype, n, k, gen) for n, k in shapes]
        weights = [(w, s / k**0.5) if s is not None else ((w.float() / k**0.5).to(dtype), None) for (w, s), (_, k) in
                   zip(weights, shapes)]  # unit-sized activations throughout
        router = torch.randn(E, dim, generator=gen) / dim**0.5 if moe else None
        layers.append(kernels.KernelLayer(norms, weights, router, top_k))
    cache_k, cache_v = torch.randn(2, L, B, Hkv, W, D, generator=gen)
    want, want_k, want_v, counts = x.double(), [], [], []  # counts: how many tokens took each expert, by layer
    for layer, ck, cv in zip(layers, cache_k, cache_v):
        att, k, v = attention_reference(rms64(want, layer.norms[0]), layer.weights[:4], ck, cv, rows, slots, lengths,
                                        positions, H)
        h = want + att
        if moe:
            ffn, chosen = moe64(rms64(h, layer.norms[1]), layer.router, layer.weights[4:], top_k)
            counts.append([sum(e in c for c in chosen) for e in range(E)])
        else:
            ffn = ffn64(rms64(h, layer.norms[1]), layer.weights[4:])
        want = h + ffn
        want_k.append(k)
        want_v.append(v)
    if moe == (8, 2):  # the kernel's loop over experts meets an expert taken by some tokens (gathered) and by none
        assert all(any(0 < n < len(rows) for n in c) and 0 in c for c in counts), counts
    for layer, count in zip(layers, counts):  # an expert no token took is never read: NaN weights change nothing
        for e in (e for e, n in enumerate(count) if n == 0):
            for w, s in layer.weights[4 + 3 * e : 4 + 3 * e + 3]:
                (s if s is not None else w).fill_(float("nan"))
    step = torch.stack([rows, slots, lengths, positions])
    plan = kernels.plan_blocks(layers, 1e-5, H, Hkv, D)
    got = kernels.blocks(x, plan, cache_k, cache_v, step, inverse_frequencies(D, 1e4, x.device))
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
    torch.testing.assert_close(cache_k.double(), torch.stack(want_k), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(cache_v.double(), torch.stack(want_v), rtol=1e-5, atol=1e-5)


def test_what_the_kernels_decline():
    gen = torch.Generator().manual_seed(0)
    ffn = [weights_of(torch.float32, n, k, gen) for n, k in [(24, 8), (24, 8), (8, 24)]]
    x = torch.randn(2, 8)
    assert not kernels.takes_rows(x.bfloat16())  # fp32 activations only
    assert not kernels.takes_rows(torch.randn(17, 8))  # more rows than decode: torch's products
    assert not kernels.takes_rows(x.clone().requires_grad_())  # autograd needs torch's ops
    assert kernels.prepare([ffn[0], (ffn[1][0].bfloat16(), None), ffn[2]]) is None  # one weight dtype per call
    assert kernels.prepare([(ffn[0][0].to(torch.int8), None)]) is None  # int8 weights come with their scales
    cache = torch.zeros(1, 1, 2, 4, 4)
    assert kernels.takes_cache(cache, cache) and not kernels.takes_cache(cache.bfloat16(), cache.bfloat16())
    att = [weights_of(torch.float32, n, k, gen) for n, k in [(16, 8), (8, 8), (8, 8), (8, 16)]]
    norms = (torch.ones(8), torch.ones(8))
    assert not kernels.plan_blocks([(norms, att + ffn)], 1e-5, 4, 2, 4).needs_grad
    needs_grad = kernels.plan_blocks([(norms, att + ffn[:2] + [(ffn[2][0].clone().requires_grad_(), None)])], 1e-5, 4,
                                     2, 4)
    assert needs_grad.needs_grad  # the engine declines it where autograd is on
    assert kernels.plan_blocks([((norms[0].double(), norms[1]), att + ffn)], 1e-5, 4, 2, 4) is None  # fp32 norms only
    assert kernels.plan_blocks([(norms, att + ffn)], 1e-5, 2, 2, 8) is None  # weights of other shapes
    layer = (norms, att + ffn)
    assert kernels.plan_blocks([layer, (norms, att + [(w.bfloat16(), s) for w, s in ffn])], 1e-5, 4, 2, 4) is None
    assert kernels.plan_blocks([(norms, att + ffn[:2])], 1e-5, 4, 2, 4) is None  # a weight list too short
    router = torch.randn(2, 8)
    moe = kernels.KernelLayer(norms, att + ffn + ffn, router, 2)  # 2 experts, both taken
    assert kernels.plan_blocks([moe, moe], 1e-5, 4, 2, 4) is not None
    assert kernels.plan_blocks([moe, layer], 1e-5, 4, 2, 4) is None  # dense and MoE blocks mixed
    assert kernels.plan_blocks([moe._replace(top_k=3)], 1e-5, 4, 2, 4) is None  # more experts per token than experts
    assert kernels.plan_blocks([moe._replace(weights=att + ffn)], 1e-5, 4, 2, 4) is None  # one expert's weights of 2
    assert kernels.plan_blocks([moe._replace(router=router.bfloat16())], 1e-5, 4, 2, 4) is None  # fp32 routers only
    assert kernels.plan_blocks([moe._replace(router=router[:, :4])], 1e-5, 4, 2, 4) is None  # router (E, dim)


@pytest.mark.parametrize("M", [1, 2, 3, 16])
def test_rms_norm_matches_float64(M):
    gen = torch.Generator().manual_seed(M)
    for K in (1, 7, 8, 768, 4100):
        x = torch.randn(M, K, generator=gen) * 5
        w = torch.rand(K, generator=gen) + 0.5
        want = x.double() / (x.double().pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * w.double()
        torch.testing.assert_close(kernels.rms_norm(x, w, 1e-5).double(), want, rtol=1e-5, atol=1e-5)


def test_rms_norm_declines_what_it_does_not_take():
    x, w = torch.randn(17, 8), torch.ones(8)
    assert kernels.rms_norm(x, w, 1e-5) is None  # more rows than decode has: torch's op
    assert kernels.rms_norm(x[:2].double(), w.double(), 1e-5) is None


@pytest.mark.parametrize("V", [1, 5, 16, 17, 40, 1001, 32000])
@pytest.mark.parametrize("M", [1, 3])
def test_greedy_matches_argmax_and_float64_log_softmax(V, M):
    """Each row's argmax and its log-softmax; the largest value also put at a later place in every row, in another
    lane and in the tail, so that the first of equal maxima must win."""
    gen = torch.Generator().manual_seed(V)
    logits = torch.randn(M, V, generator=gen) * 4
    for m in range(M):
        top = logits[m].argmax()
        logits[m, top::7] = logits[m, top]
    logits[:, 1::5] = float("-inf")  # masked entries, as top-k leaves them
    logits[:, 0] = logits.max(dim=1).values  # a tie with the first entry
    index, logprob = kernels.greedy(logits)
    assert torch.equal(index, logits.argmax(-1))
    want = torch.log_softmax(logits.double(), -1).gather(1, index[:, None]).squeeze(1)
    # fp32 sums of V terms (torch's own fp32 log_softmax is 6.5e-6 off at V = 32000)
    torch.testing.assert_close(logprob.double(), want, rtol=0, atol=1e-6 if V <= 1001 else 1e-5)


def test_greedy_log_softmax_over_even_spreads():
    """Rows whose sum of exponentials is spread over many terms, with every fraction of a power of two: these
    test e^x itself (random rows are dominated by their few largest terms)."""
    for low in (-1.0, -5.0, -30.0, -100.0):
        logits = torch.linspace(low, 0, 4001)[None]
        index, logprob = kernels.greedy(logits)
        want = torch.log_softmax(logits.double(), -1)[0, index]
        torch.testing.assert_close(logprob.double(), want, rtol=0, atol=1e-6)


def test_greedy_special_values_as_torch():
    """NaN wins (its first place) and gives NaN; +inf, or a row of -inf, gives NaN as log_softmax does."""
    nan, inf = float("nan"), float("inf")
    rows = [[1.0] * 20 + [nan] + [2.0] * 20 + [nan], [0.0] * 17 + [inf] + [1.0] * 3, [-inf] * 19]
    for row in rows:
        logits = torch.tensor([row])
        index, logprob = kernels.greedy(logits)
        assert torch.equal(index, logits.argmax(-1)), row
        want = torch.log_softmax(logits, -1)[0, index]
        assert torch.isnan(logprob).all() and torch.isnan(want).all(), row


def test_greedy_declines_what_it_does_not_take():
    assert kernels.greedy(torch.randn(2, 8, dtype=torch.float64)) is None
    assert kernels.greedy(torch.randn(kernels.MAX_ROWS + 1, 8)) is None
    assert kernels.greedy(torch.randn(8)) is None
    assert kernels.greedy(torch.randn(2, 0)) is None
