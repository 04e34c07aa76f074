"""quantize_int8 and bf16_weight_only: each linear against an independent float64 computation, and whole
tiny models against fp32, packed, chunked and through generate_ids.

Error bounds used below, for y = x @ W.T over K inputs and B = |x| @ |W|.T (the sum of |x_k w_k|):
- fp32 arithmetic: |error| <= K * 2^-24 * B (the classical bound for a K-term dot product), taken as
  K * 2^-23 * B to cover the final multiplication by the scale as well.
- the int8 and int4 products with x rounded per group (Int8Linear up to INT8_ROWS rows, Int4Linear always): the
  torch forward computes them in float64 and rounds once; the emulation rounded_per_group (tests/helpers.py) rounds
  each e * q to fp32: |error| <= 2^-24 |y| + 2^-24 * B, taken as 2^-22 * B. That is, exact up to fp32 rounding.
And for whole models, int8 against fp32: logits within 0.15 of the logits' standard deviation (x rounded per group
included). Measured on these tiny models, weights alone: 4-8% at most (per-channel int8 of K = 32 inputs is about
0.6% off per dot product, and it compounds over the layers). That is noise enough to swap two
nearly tied tokens, so generation is compared int8 against int8, not against fp32.
"""
import copy
import os
import subprocess
import sys

import pytest
import torch
from conftest import VOCAB
from helpers import (MOE, ROOT, engine_first, inprocess, random_model, rounded_per_group, save_with_tokenizer,
                     tiny_params)
from torch import nn

from mistral import quantize
from mistral.cache import RotatingBufferCache
from mistral.cpu import kernels
from mistral.generate import generate_ids
from mistral.moe import MoeLayer
from mistral.quantize import Bf16Linear, Int8Linear, bf16_weight_only, quantize_int8

# K = 44 inputs also exercise the kernel's tail after its 8-wide vector loop.
K44 = dict(dim=44, hidden_dim=44, n_heads=2, n_kv_heads=1, head_dim=22)
PROMPTS = [[3, 9, 27, 17, 51, 25, 11, 33, 3, 9, 60, 1, 2], [5, 6, 7], list(range(40, 57)), [8, 1, 4, 2, 63, 0, 12, 7]]


def dequantized(q: Int8Linear) -> torch.Tensor:
    return q.weight.double() * q.scales.double()[:, None]  # (N, K)


def fp32_atol(x: torch.Tensor, w: torch.Tensor) -> float:
    return x.shape[-1] * 2.0 ** -23 * (x.double().abs() @ w.double().abs().T).max().item()


def rounding_atol(x: torch.Tensor, w: torch.Tensor) -> float:
    return 2.0 ** -22 * (x.double().abs() @ w.double().abs().T).max().item()


def assert_int8_close(q: Int8Linear, x: torch.Tensor) -> None:
    """q(x) against float64: with x rounded per group up to INT8_ROWS rows (exact but for fp32 rounding), x as it is
    (fp32 arithmetic) beyond."""
    if x.shape[0] <= quantize.INT8_ROWS:
        want, atol = rounded_per_group(x) @ dequantized(q).T, rounding_atol(x, dequantized(q))
    else:
        want, atol = x.double() @ dequantized(q).T, fp32_atol(x, dequantized(q))
    torch.testing.assert_close(q(x).double(), want, rtol=0, atol=atol)


def assert_both_fp32_close(lin: nn.Linear, x: torch.Tensor) -> None:
    """Int8Linear and Bf16Linear made from lin, each within fp32 rounding of float64 on its own weights."""
    q, b = Int8Linear.from_linear(lin), Bf16Linear(lin.weight)
    with torch.no_grad():
        assert_int8_close(q, x)
        torch.testing.assert_close(b(x).double(), x.double() @ b.weight.double().T, rtol=0, atol=fp32_atol(x, b.weight))


def random_linear(n: int, k: int) -> nn.Linear:
    torch.manual_seed(n * 1000 + k)
    return nn.Linear(k, n, bias=False).requires_grad_(False)


def test_quantization_is_symmetric_per_output_channel():
    lin = random_linear(16, 64)
    q = Int8Linear.from_linear(lin)
    assert q.weight.dtype == torch.int8 and q.scales.shape == (16,)
    assert (q.weight.abs().amax(dim=1) == 127).all()  # each row's largest weight uses the full range
    # Rounding to the nearest step: no weight is off by more than half a step of its row.
    assert ((dequantized(q) - lin.weight.double()).abs() <= q.scales.double()[:, None] / 2 * (1 + 1e-6)).all()


@pytest.mark.parametrize("M", [1, 3, 16, 37, quantize.INT8_ROWS, quantize.INT8_ROWS + 1])
@pytest.mark.parametrize("K", [64, 44])
def test_int8_linear(M, K):
    """Int8Linear's torch forward (where no kernel runs: no compiler, autograd, off the CPU) is the products of the
    format: up to INT8_ROWS rows, x rounded per group of 32 as kernels.c rounds it (rounded_per_group, float64),
    exact but for fp32 rounding; beyond, x as it is. (The kernel's own: tests/test_kernels.py.)"""
    q = Int8Linear.from_linear(random_linear(48, K))
    x = torch.randn(M, K) * torch.logspace(-2, 1, K)  # groups of very different sizes
    with torch.no_grad():
        assert_int8_close(q, x)
        if M <= quantize.INT8_ROWS:  # x rounded: not the unrounded product
            assert not torch.allclose(q(x).double(), x.double() @ dequantized(q).T, rtol=0,
                                      atol=100 * rounding_atol(x, dequantized(q)))


@pytest.mark.parametrize("M", [1, 3, 16, 37])
def test_bf16_linear(M):
    b = Bf16Linear(random_linear(40, 44).weight)
    x = torch.randn(M, 44)
    w = b.weight.double()  # the bf16 weights, exactly
    with torch.no_grad():
        torch.testing.assert_close(b(x).double(), x.double() @ w.T, rtol=0, atol=fp32_atol(x, w))


def test_many_rows_convert_the_weights_in_blocks(monkeypatch):
    """Pre-fill converts 5 rows of the weight at a time here (8 MB at a time normally), scales included, into one
    reused block: a second matrix of another shape, multiplied after the first, must not see its rows."""
    monkeypatch.setattr(quantize, "CONVERT_BLOCK_BYTES", 5 * 44 * 4)
    assert_both_fp32_close(random_linear(23, 44), torch.randn(37, 44))
    assert_both_fp32_close(random_linear(9, 30), torch.randn(37, 30))
    assert_both_fp32_close(random_linear(23, 44), torch.randn(60, 44))  # more rows than K: the weights scaled


@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_gradients_through_the_converted_weights(monkeypatch, kind):
    """Autograd keeps the weight block it multiplied by; the reused block would be overwritten under it, so with
    gradients on each block is a copy of its own: d(sum(y))/dx = the column sums of the weights."""
    monkeypatch.setattr(quantize, "CONVERT_BLOCK_BYTES", 5 * 44 * 4)
    lin = random_linear(23, 44)
    module = Int8Linear.from_linear(lin) if kind == "int8" else Bf16Linear(lin.weight)
    w = dequantized(module) if kind == "int8" else module.weight.double()
    x = torch.randn(37, 44, requires_grad=True)
    module(x).sum().backward()
    torch.testing.assert_close(x.grad.double(), w.sum(0).expand(37, 44), rtol=1e-5, atol=1e-5)


def test_odd_sizes():
    """K = 10: one short group of x."""
    assert_both_fp32_close(random_linear(7, 10), torch.randn(2, 10))


def test_autograd_inputs_take_the_plain_path():
    q, b = Int8Linear.from_linear(random_linear(40, 44)), Bf16Linear(random_linear(40, 44).weight)
    x = torch.randn(2, 44, requires_grad=True)
    (q(x).sum() + b(x).sum()).backward()
    torch.testing.assert_close(x.grad, (dequantized(q).sum(0) + b.weight.double().sum(0)).float().expand(2, -1))


def run_chunked(model, seqs, chunk, forward=None):
    """Feed seqs through a cache, `chunk` tokens per row and step, each step through forward (the model, unless
    said); each sequence's logits, in packed order."""
    forward = forward or model
    cache = RotatingBufferCache(model.n_local_layers, len(seqs), model.args.sliding_window, model.args.n_kv_heads,
                                model.args.head_dim, dtype=model.dtype)
    fed, outs = [0] * len(seqs), [[] for _ in seqs]
    while any(f < len(s) for f, s in zip(fed, seqs)):
        lens = [min(chunk, len(s) - f) for f, s in zip(fed, seqs)]
        ids = torch.tensor([t for b, s in enumerate(seqs) for t in s[fed[b] : fed[b] + lens[b]]])
        for b, part in enumerate(forward(ids, lens, cache).split(lens)):
            outs[b].append(part)
        fed = [f + n for f, n in zip(fed, lens)]
    return torch.cat([torch.cat(o) for o in outs])


def packed(model):
    with torch.no_grad():
        return model(torch.tensor(sum(PROMPTS, [])), [len(p) for p in PROMPTS])


@pytest.mark.parametrize("moe", [None, MOE])
def test_quantize_int8_model(moe):
    """Packed (the torch forward) and one token per step (the engine's kernel) against fp32: both round x to int8
    per group of 32 as well, so they are further off than weights alone would be."""
    model = random_model(tiny_params(moe=moe))
    q = quantize_int8(copy.deepcopy(model))
    assert isinstance(q.output, Int8Linear) and isinstance(q.layers["1"].attention.wk, Int8Linear)
    if moe:
        ff = q.layers["0"].feed_forward
        assert isinstance(ff, MoeLayer) and type(ff.gate) is nn.Linear and isinstance(ff.experts[3].w2, Int8Linear)
    assert q.dtype == torch.float32 and q.tok_embeddings.weight.dtype == torch.float32
    want = packed(model)
    atol = 0.15 * want.std().item()
    torch.testing.assert_close(packed(q), want, rtol=0, atol=atol)
    with torch.no_grad():
        torch.testing.assert_close(run_chunked(q, PROMPTS, 1, engine_first(q)), want, rtol=0, atol=atol)


@pytest.mark.parametrize("moe", [None, MOE])
def test_quantize_int8_generate_chunked(moe, monkeypatch):
    """The torch forward of every product (x rounded per group: each row's own, whatever the rows beside it), so
    chunking changes only the summation order: the same tokens, each the argmax of a one-pass forward over the
    whole text."""
    q = quantize_int8(random_model(tiny_params(moe=moe)))
    want, want_lp = generate_ids(PROMPTS, q, max_tokens=8, engine=False)
    for chunk_size in (1, 2, 6):
        got, got_lp = generate_ids(PROMPTS, q, max_tokens=8, chunk_size=chunk_size, engine=False)
        assert got == want
        for a, b in zip(got_lp, want_lp):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-4)
    for p, g in zip(PROMPTS, want):
        with torch.no_grad():
            logits = q(torch.tensor(p + g), [len(p) + len(g)])
        assert logits[len(p) - 1 : -1].argmax(-1).tolist() == g


def rounded_to_bf16(model):
    """The fp32 reference of the bf16 path: the same model, its weights rounded to bf16 and back."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.bfloat16().float())
    return ref


@pytest.mark.parametrize("moe", [None, MOE])
def test_bf16_weight_only_model(moe):
    """Both paths convert the bf16 weights exactly to fp32 and then compute as the fp32 model does (the kernel
    for few rows, F.linear for more): the logits are those of the fp32 model with bf16-rounded weights, bit
    for bit, packed, chunked and in generate_ids."""
    model = random_model(tiny_params(moe=moe))
    ref = rounded_to_bf16(model)
    b = bf16_weight_only(copy.deepcopy(model).bfloat16())
    assert b.dtype == torch.float32 and all(p.dtype == torch.float32 for p in b.parameters())
    assert isinstance(b.output, Bf16Linear) and b.output.weight.dtype == torch.bfloat16
    if moe:
        assert type(b.layers["0"].feed_forward.gate) is nn.Linear
    torch.testing.assert_close(packed(b), packed(ref), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(run_chunked(b, PROMPTS, 3), run_chunked(ref, PROMPTS, 3), rtol=0, atol=0)
    got, got_lp = generate_ids(PROMPTS, b, max_tokens=8, chunk_size=4)
    want, want_lp = generate_ids(PROMPTS, ref, max_tokens=8, chunk_size=4)
    assert got == want and got_lp == want_lp


@pytest.mark.parametrize("moe", [None, MOE])
def test_kernel_in_a_model(moe):
    """The engine's bf16 path, one token per step and in generate_ids, against an fp32 model with the same
    (bf16-rounded) weights on torch alone: fp32 arithmetic, only the summation order differs. (The engine's int8
    path rounds x as well: tests/test_decoder.py sets it against the torch model that rounds x the same way.)"""
    model = random_model(tiny_params(moe=moe, **K44))
    b, b_ref = bf16_weight_only(copy.deepcopy(model).bfloat16()), rounded_to_bf16(model)
    with torch.no_grad():
        torch.testing.assert_close(run_chunked(b, PROMPTS, 1, engine_first(b)), run_chunked(b_ref, PROMPTS, 1),
                                   rtol=1e-5, atol=1e-5)
    got, got_lp = generate_ids(PROMPTS, b, max_tokens=8, chunk_size=2)
    want, want_lp = generate_ids(PROMPTS, b_ref, max_tokens=8, chunk_size=2, engine=False)
    assert got == want
    for x, y in zip(got_lp, want_lp):
        torch.testing.assert_close(torch.tensor(x), torch.tensor(y), rtol=0, atol=1e-4)


def test_int8_on_top_of_bf16_weight_only():
    """A bf16 model on a CPU gets bf16_weight_only at load; quantize_int8 then takes its Bf16Linears."""
    model = random_model(tiny_params())
    both = quantize_int8(bf16_weight_only(copy.deepcopy(model).bfloat16()))
    assert isinstance(both.layers["0"].feed_forward.w1, Int8Linear) and both.dtype == torch.float32
    want = packed(model)
    torch.testing.assert_close(packed(both), want, rtol=0, atol=0.1 * want.std().item())


# 4-bit weights ---------------------------------------------------------------------------------------------------

def decoded_by_hand(packed: torch.Tensor, scales: torch.Tensor, K: int) -> torch.Tensor:
    """The weights int4 bytes stand for, read one byte at a time in float64 (independent of int4_dequantized)."""
    N, G = scales.shape
    w = torch.zeros(N, G * 32, dtype=torch.float64)
    for n in range(N):
        for g in range(G):
            d = float(scales[n, g])
            for j in range(16):
                byte = int(packed[n, g * 16 + j])
                w[n, g * 32 + j] = d * ((byte & 15) - 8)
                w[n, g * 32 + 16 + j] = d * ((byte >> 4) - 8)
    assert not w[:, K:].any(), "the padding of a row's last group must be zeros"
    return w[:, :K]


@pytest.mark.parametrize("K", [64, 44, 10, 32, 97])
def test_int4_groups_of_32_each_with_its_scale(K):
    """Each group of 32 along a row (the last one padded, never straddling into the next row) has the fp16 scale
    extreme / -8, sign included: its weight of largest magnitude is stored exactly as -8 times the scale, and every
    weight is within one scale (half a scale unless clamped at +7) of what it stands for."""
    torch.manual_seed(K)
    w = torch.randn(9, K) * torch.logspace(-3, 1, 9)[:, None]  # rows of very different sizes
    w[3] = 0  # an all-zero row: scale 0, weights 0
    packed, scales = quantize.int4_rows(w)
    G = -(-K // 32)
    assert packed.dtype == torch.uint8 and packed.shape == (9, G * 16)
    assert scales.dtype == torch.float16 and scales.shape == (9, G)
    back = decoded_by_hand(packed, scales, K)
    padded = torch.zeros(9, G * 32, dtype=torch.float64)
    padded[:, :K] = w.double()
    groups = padded.view(9, G, 32)
    extreme = groups.gather(2, groups.abs().argmax(2, keepdim=True))[..., 0]
    torch.testing.assert_close(scales.double(), (extreme / -8).half().double(), rtol=0, atol=0)
    signed = scales.double().repeat_interleave(32, dim=1)[:, :K]
    d, err = signed.abs(), (back - w.double()).abs()
    assert (err <= d * 1.0001 + 1e-12).all()
    inside = w.double() / torch.where(signed == 0, 1, signed) < 7.5  # codes not clamped at +7
    assert (err[inside] <= d[inside] / 2 * 1.0001 + 1e-12).all()
    assert (back[3] == 0).all()
    torch.testing.assert_close(quantize.int4_dequantized(packed, scales, K).double(), back, rtol=0, atol=0)


@pytest.mark.parametrize("M", [1, 3, 17, 40])
@pytest.mark.parametrize("K", [64, 44, 10])
def test_int4_linear(M, K, monkeypatch):
    """Int4Linear's torch forward is x rounded per group of 32 as kernels.c rounds it (rounded_per_group) @ its
    weights exactly as stored (the decoded bytes), exact but for fp32 rounding, in one block or in blocks of 5 rows."""
    lin = random_linear(23, K)
    q = quantize.Int4Linear.from_linear(lin)
    w = decoded_by_hand(q.weight, q.scales, K)
    x = torch.randn(M, K)
    for block in (quantize.CONVERT_BLOCK_BYTES, 5 * K * 4):
        monkeypatch.setattr(quantize, "CONVERT_BLOCK_BYTES", block)
        with torch.no_grad():
            torch.testing.assert_close(q(x).double(), rounded_per_group(x) @ w.T, rtol=0, atol=rounding_atol(x, w))


def test_quantize_int4_swaps_the_linears_of_a_model():
    """Every linear but the MoE routers becomes an Int4Linear, and the model's logits are those of the fp32 model
    whose linears hold the 4-bit weights as decoded by hand and take x rounded per group."""
    model = random_model(tiny_params(moe={"num_experts": 4, "num_experts_per_tok": 2}))
    ref = copy.deepcopy(model)
    quantize.quantize_int4(model)
    for name, module in ref.named_modules():
        if isinstance(module, nn.Linear) and not name.endswith(".gate"):
            q = model.get_submodule(name)
            assert isinstance(q, quantize.Int4Linear), name
            with torch.no_grad():
                module.weight.copy_(decoded_by_hand(q.weight, q.scales, q.in_features).float())
            module.register_forward_pre_hook(lambda _, args: rounded_per_group(args[0].reshape(-1, args[0].shape[-1]))
                                             .float().view(args[0].shape))
    assert all(isinstance(layer.feed_forward.gate, nn.Linear) for layer in model.layers.values())
    ids = torch.tensor(PROMPTS[0])
    with torch.no_grad():
        torch.testing.assert_close(model(ids, [len(ids)]), ref(ids, [len(ids)]), rtol=1e-4, atol=1e-4)


# Every path, the same products ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory, tokenizer_file):
    model = random_model(tiny_params(vocab_size=VOCAB, moe=MOE))
    return save_with_tokenizer(model, tmp_path_factory.mktemp("moe"), tokenizer_file)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("model", ["shipped", "moe"])
def test_without_the_kernels_the_same_tokens(model, fmt, moe_folder, monkeypatch, capsys):
    """The torch forward of Int8Linear and Int4Linear, which runs where the kernels cannot be built (no C compiler),
    computes the products the kernels do, x rounded per group of 32: greedy `demo` prints the same text with and
    without them, on the shipped model and on a mixture of experts."""
    if not kernels.available():
        pytest.skip("no C compiler: nothing to compare the torch forward with")
    args = ["demo", *([] if model == "shipped" else [moe_folder]), "--quantize", fmt, "--max_tokens", "48"]
    code, in_c, _ = inprocess(monkeypatch, capsys, *args)
    assert code == 0
    monkeypatch.setattr(kernels, "load", lambda: None)
    monkeypatch.setattr(kernels, "available", lambda: False)
    code, in_torch, err = inprocess(monkeypatch, capsys, *args)
    assert code == 0 and "activations rounded to int8 per group of 32" in err
    assert in_torch == in_c


def test_no_compiler_prints_what_the_kernels_print(tmp_path):
    """`CC=/nonexistent` in a process whose cache holds no kernels built before: a warning, then the same text."""
    if not kernels.available():
        pytest.skip("no C compiler: nothing to compare the torch forward with")

    def demo(**env):
        return subprocess.run([sys.executable, "-m", "main", "demo", "--quantize", "int8", "--max_tokens", "24"],
                              cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=240)

    in_c, in_torch = demo(), demo(CC="/nonexistent", XDG_CACHE_HOME=str(tmp_path))
    assert in_c.returncode == 0 and in_torch.returncode == 0, in_torch.stderr[-3000:]
    assert "compiling kernels.c failed" in in_torch.stderr and not any(tmp_path.rglob("*.so"))
    assert in_torch.stdout == in_c.stdout


def test_a_forward_after_a_generation_reuses_no_inference_tensor():
    """The blocks bf16 weights are converted into are kept from call to call; one made inside generation's
    inference_mode cannot be written outside it, so a forward under no_grad after a generation keeps its own."""
    model = bf16_weight_only(random_model(tiny_params()))
    generate_ids([[1, 2, 3]], model, max_tokens=3)
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor([1, 2, 3, 4]), [4]),
                                   model(torch.tensor([1, 2, 3, 4]), [4]))
