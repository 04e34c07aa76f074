"""Opt-in speed-ups for inference, applied to a loaded model from outside (the model code knows nothing of them).

    model = load_model(folder)  # mistral.checkpoint
    quantize_int8(model)        # int8 weights, one scale per output feature: 4x fewer bytes than fp32
    quantize_int4(model)        # 4-bit weights, one fp16 scale per 32 of them: 4.5 bits a weight, 7x fewer
    # or, for a model loaded in bf16 on a CPU:
    bf16_weight_only(model)     # bf16 weights, fp32 activations and arithmetic

Each swaps nn.Linear modules for drop-in replacements (Int8Linear, Int4Linear, Bf16Linear), in place.

Why: decoding a few rows is memory-bound. Every token reads every weight once, so the time per token is
about (bytes of weights) / (memory bandwidth), and halving or quartering the bytes is the speed-up, provided
the kernel that multiplies by the smaller weights keeps up with memory. On a CPU without AVX-512 or
hardware bf16 (the 2-core AVX2 machine this was measured on) torch's eager kernels do not:
`torch._weight_int8pack_mm` converts through bf16 and is compute-bound at about 1/3 of the bandwidth; eager
bf16 `F.linear` rounds the activations to bf16, multiplies matrices 7x slower than fp32 (pre-fill), and
collapses (5-20x slower) when another process takes a core from one of its two threads.

So the products of int8 and int4 weights are defined as integer ones, which a CPU computes fast: x is rounded to
int8 a group of 32 along its row at a time (round_per_group), and the rounded x times the integer weights, times the
scales, is the product. int8 takes x as it is, in fp32 products with the widened weights, for more than INT8_ROWS rows:
there MKL's matrix-matrix product beats the integer kernel. That is one arithmetic wherever the weights run: the
modules' forward, below, computes it in torch (in float64, rounded once to x's dtype: the exact product of the rounded
x and the weights), and on a CPU mistral/cpu/linears.py puts in their place subclasses whose forward runs the same
products in C (mistral/cpu/kernels.c, 1b), their sums in fp32 in an order of their own, so the two agree up to fp32
rounding; mistral/cpu's engine runs whole decode steps with them. The torch forward is what runs where no kernel can:
no C compiler, autograd on (gradients pass the rounding as if it were not there), off the CPU.
The weights of the modules' forward are converted a block of rows at a time and multiplied by `F.linear`, the
conversion paid once per call and amortized over the rows (pre-fill).

Letters: M rows (tokens), N output features, K input features.
"""
import math
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mistral.device import cpu_bf16_matmul
from mistral.moe import MoeLayer

CONVERT_BLOCK_BYTES = 8 << 20  # see _converted_linear
# Up to this many rows an int8 product rounds x per group (round_per_group); beyond, x is used as it is. On a 7B layer's
# shapes here, one thread, the C kernel's integer products against MKL on the widened weights: 1.3x at 63 rows, even at
# 128, 0.85x at 256 (int4 1.6-2.2x at 63 to 512 rows: no limit). Every path keeps to the same number, so that a step
# of a given number of rows computes the same products however it runs.
INT8_ROWS = 112
# int4 rounds x at any number of rows, except past INT4_BF16_ROWS on a CPU that multiplies bf16 in hardware
# (device.cpu_bf16_matmul): there x is taken as it is and meets the weights, dequantized a block of rows at a time, in
# bf16 (dequantized_product), as the block formats of mistral/ggml.py do. On the Xeon of docs/performance-diary.md,
# 5.7x faster in bf16 than in fp32, the 7B Q4_0 file (int4) pre-filled 63 tokens at 24 tokens/s instead of 16.5, and
# 512 at 57 instead of 20. (48: the integer products are faster up to about 40 rows there.)
INT4_BF16_ROWS = 48
# The bf16 products multiply blocks of 64 MB of weights (4096 to 8192 rows of a 7B layer) rather than 8: on the Xeon,
# one 7B layer's products of 63 rows took 75 ms instead of 91 (each matmul call has a cost of its own), and those of
# 512 rows the same 192.
BF16_BLOCK_BYTES = 64 << 20
_scratch = threading.local()  # .blocks: the blocks _blockwise converts into, reused from call to call


def _converted_linear(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ (w * scales[:, None]).to(x.dtype).T, converting w a block of rows at a time on a CPU.

    A block converted just before its matmul is still in cache when the matmul reads it, and converting into
    the same (rows, K) memory every time avoids a fresh allocation per block, whose pages the kernel would
    fault in and zero on every call: that halved the conversion's speed (a 14336 x 4096 bf16 matrix: 19 ms
    converting into new blocks, 9 ms into one reused). With it, 63 rows of a 7B layer's products run at
    1.0-1.3x the speed of fp32 weights, which read twice the bytes (measured on the 2-core AVX2 machine).
    The scales multiply whichever is smaller, the block's (rows, K) weights or its (M, rows) outputs: with
    fewer tokens than input features (a 7B model's pre-fill), that is the outputs, and the conversion is then
    a single pass over the weights.
    """
    scale_outputs = scales is not None and x.shape[0] < w.shape[1]

    def product(start: int, end: int, block: Callable[[tuple[int, ...]], torch.Tensor]) -> torch.Tensor:
        converted = block((end - start, w.shape[1])).copy_(w[start:end])
        if scales is None:
            return F.linear(x, converted)
        s = scales[start:end].to(x.dtype)
        if scale_outputs:
            return F.linear(x, converted).mul_(s)
        return F.linear(x, converted.mul_(s[:, None]))

    return _blockwise(x, w.shape[0], w.shape[1], product)


def _blockwise(x: torch.Tensor, N: int, K: int,
               product: Callable[[int, int, Callable[[tuple[int, ...]], torch.Tensor]], torch.Tensor],
               block_bytes: int = CONVERT_BLOCK_BYTES) -> torch.Tensor:
    """The (M, N) products of x with a weight converted a block of rows (of about block_bytes) at a time (all N at
    once off the CPU): product(start, end, block) multiplies x by rows start .. end - 1, converted into block(shape),
    an uninitialized tensor of x's dtype that is the same memory every time (see _converted_linear) unless autograd
    is on, which keeps the block it multiplied by and so needs a new one each time."""
    reuse = x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad)

    def block(shape: tuple[int, ...]) -> torch.Tensor:
        if not reuse:
            return torch.empty(shape, dtype=x.dtype)
        # One per dtype, and per inference mode: a block made under torch.inference_mode (generation) cannot be
        # written in place outside it (a forward under no_grad after a generation).
        blocks, key = _scratch.__dict__.setdefault("blocks", {}), (x.dtype, torch.is_inference_mode_enabled())
        n, buf = math.prod(shape), blocks.get(key)
        if buf is None or buf.numel() < n:
            buf = blocks[key] = torch.empty(max(n, block_bytes // x.element_size()), dtype=x.dtype)
        return buf[:n].view(shape)

    rows = N if x.device.type != "cpu" else max(1, block_bytes // (K * x.element_size()))
    y = [product(start, min(start + rows, N), block) for start in range(0, N, rows)]
    return y[0] if len(y) == 1 else torch.cat(y, dim=-1)


def dequantized_product(x: torch.Tensor, N: int, K: int,
                        into: Callable[[int, int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """x (M, K) as it is, times N rows of weights that into(start, end, out) writes, rows start .. end - 1, into out
    (end - start, K) in out's dtype: a block of rows at a time. On a CPU that multiplies bf16 matrices in hardware
    (device.py, cpu_bf16_matmul), x and the weights meet in bf16 and the products come out in bf16 (fp32 sums; torch's
    CPU matmul has no fp32 output for bf16 inputs): 5.7x as fast as fp32 there, each output within half a bf16 unit
    (2^-9 of it) of the exact product of the bf16 operands. Elsewhere, in x's dtype."""
    compute = torch.bfloat16 if x.device.type == "cpu" and cpu_bf16_matmul() else x.dtype
    xc = x.to(compute)

    def product(start: int, end: int, block: Callable[[tuple[int, ...]], torch.Tensor]) -> torch.Tensor:
        return F.linear(xc, into(start, end, block((end - start, K))))

    block_bytes = BF16_BLOCK_BYTES if compute == torch.bfloat16 else CONVERT_BLOCK_BYTES
    return _blockwise(xc, N, K, product, block_bytes).to(x.dtype)


def int4_rounded_rows() -> int:
    """The most rows of x an int4 product multiplies rounded (see INT4_BF16_ROWS)."""
    return INT4_BF16_ROWS if cpu_bf16_matmul() else 1 << 62


def round_per_group(x: torch.Tensor, group: int = 32) -> torch.Tensor:
    """x (M, K) as the integer products take it, in float64: each group of `group` (32; 256 for mistral/ggml.py's
    K-quants) along a row (the last one shorter if it does not divide K) becomes e * q, e = max|x| / 127 of the group
    and q = round(x * (127 / max|x|)) an integer in -127 .. 127 (0 for a group of zeros). Every operation is
    kernels.c's, in fp32: 127 / max|x| one division (not torch's `127 / top`, which multiplies by a rounded
    reciprocal), the product with x, rounding half to even (lrintf), e one division; e * q is then exact in float64.
    Under autograd the gradient passes through as if x were unrounded.

    x = [[0.5, -1.27, 0.02]] (one short group): max|x| = 1.27, 127 / 1.27 = 100, x * 100 = [50, -127, 2],
    e = 0.01, so [[0.5, -1.27, 0.02]] again, up to the fp32 rounding of e.
    """
    x = x.float()
    M, K = x.shape
    G = -(-K // group)
    xg = F.pad(x, (0, G * group - K)).view(M, G, group)  # (M, G, group), zeros past K
    top = xg.detach().abs().amax(2, keepdim=True)  # (M, G, 1)
    inv = torch.where(top > 0, torch.full_like(top, 127).div(top), 0)
    q = (xg.detach() * inv).round_()
    rounded = (q.double() * top.div(torch.full_like(top, 127)).double()).view(M, G * group)[:, :K]  # (M, K)
    if torch.is_grad_enabled() and x.requires_grad:
        x64 = x.double()
        return x64 + (rounded - x64).detach()  # exactly `rounded`: the two differ by less than a unit of x's group
    return rounded


def int8_rows(w: torch.Tensor, out: torch.Tensor | None = None,
              scratch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel quantization of w (N, K): scale = max|w| / 127 per row, q = round(w / scale).

    Each row stands alone, so a matrix can be quantized a block of rows at a time (straight from the file); out
    (N, K) int8 and scratch (N, K) fp32, when given, are where that happens, so that a block allocates nothing.
    """
    x = w.detach().to(torch.float32, copy=True) if scratch is None else scratch.copy_(w)  # (N, K) fp32, w untouched
    scales = torch.linalg.vector_norm(x, float("inf"), dim=1).clamp_(min=torch.finfo(torch.float32).tiny).div_(127)
    x.div_(scales[:, None]).round_().clamp_(-127, 127)
    return (x.to(torch.int8) if out is None else out.copy_(x)), scales


class Int8Linear(nn.Module):
    """A bias-free nn.Linear with int8 weights: y = (x @ weight.T) * scales, one scale per output feature."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        assert weight.dtype == torch.int8 and weight.ndim == 2 and scales.shape == weight.shape[:1], (
            weight.dtype, weight.shape, scales.shape)
        self.register_buffer("weight", weight.contiguous())  # (N, K) int8
        self.register_buffer("scales", scales.float())  # (N,) fp32

    @classmethod
    def from_linear(cls, linear: nn.Module) -> "Int8Linear":
        return cls(*int8_rows(linear.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The products of the format (see the module's doc): up to INT8_ROWS rows, x rounded per group times the
        weights, in float64; beyond, x as it is, in x's dtype."""
        *lead, K = x.shape
        x2 = x.reshape(-1, K)  # (M, K)
        if x2.shape[0] > INT8_ROWS:
            return _converted_linear(x2, self.weight, self.scales).view(*lead, -1)
        return _converted_linear(round_per_group(x2), self.weight, self.scales).to(x.dtype).view(*lead, -1)

    def extra_repr(self) -> str:
        N, K = self.weight.shape
        return f"in_features={K}, out_features={N}"


GROUP = 32  # weights per int4 scale: 4 bits each and a 16-bit scale per group is 4.5 bits per weight


def int4_shapes(N: int, K: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The shapes int4_rows gives an (N, K) matrix: packed (N, G * 16) and scales (N, G), G = ceil(K / 32)."""
    G = -(-K // GROUP)
    return (N, G * GROUP // 2), (N, G)


def int4_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-wise symmetric 4-bit quantization of w (N, K): (packed (N, G * 16) uint8, scales (N, G) fp16),
    G = ceil(K / 32) groups of 32 weights per row.

    A group never straddles two rows: a row whose length is not a multiple of 32 ends in a group padded with
    zeros. Each group's scale is its weight of largest magnitude divided by -8, sign included, so that weight
    becomes exactly -8 and the others fall in -8 .. 7 (all 16 codes in use, where max|w| / 7 would leave -8
    unused). The scale is rounded to fp16 before the weights are divided by it, so dequantizing with the stored
    scale reproduces what was rounded. Byte j of a group holds weight j in its low four bits and weight j + 16 in
    its high four, each plus 8: the layout the C kernel unpacks with one shift and one mask.
    """
    N, K = w.shape
    G = -(-K // GROUP)
    x = torch.zeros(N, G * GROUP)
    x[:, :K] = w.detach()
    x = x.view(N, G, GROUP)
    extreme = x.gather(2, x.abs().argmax(2, keepdim=True))  # (N, G, 1), with its sign
    scales = (extreme / -8).clamp(-65504, 65504).half()  # fp16's range; real weights are far inside it
    s = scales.float()
    q = (x / torch.where(s == 0, 1, s)).round_().clamp_(-8, 7).add_(8).to(torch.uint8)  # (N, G, 32), 0 .. 15
    packed = q[..., :GROUP // 2] | (q[..., GROUP // 2:] << 4)  # (N, G, 16)
    return packed.reshape(N, G * GROUP // 2), scales.view(N, G)


def int4_dequantized(packed: torch.Tensor, scales: torch.Tensor, K: int,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """The (N, K) weights that int4_rows' (packed, scales) stand for, unpacked into out (N, G * 32) if given (its
    dtype; else a new fp32 tensor): a view of its first K columns."""
    N, G = scales.shape
    p = packed.view(N, G, GROUP // 2)
    full = (torch.empty(N, G * GROUP) if out is None else out).view(N, G, GROUP)
    full[..., :GROUP // 2].copy_(p & 15)
    full[..., GROUP // 2:].copy_(p >> 4)
    full.sub_(8).mul_(scales[..., None].to(full.dtype))
    return full.view(N, G * GROUP)[:, :K]


class Int4Linear(nn.Module):
    """A bias-free nn.Linear with 4-bit weights, one fp16 scale per group of 32 along each row (int4_rows)."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, in_features: int):
        super().__init__()
        assert weight.dtype == torch.uint8 and scales.dtype == torch.float16 and (
            (weight.shape, scales.shape) == int4_shapes(scales.shape[0], in_features)), (
            weight.dtype, weight.shape, scales.dtype, scales.shape, in_features)
        self.in_features = in_features
        self.register_buffer("weight", weight.contiguous())  # (N, G * 16) uint8: two weights a byte
        self.register_buffer("scales", scales.contiguous())  # (N, G) fp16

    @classmethod
    def from_linear(cls, linear: nn.Module) -> "Int4Linear":
        return cls(*int4_rows(linear.weight), linear.weight.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x rounded per group times the dequantized weights, in float64 (see the module's doc), the weights unpacked a
        block of rows at a time (see _converted_linear); past int4_rounded_rows rows, dequantized_product."""
        *lead, K = x.shape
        N, G = self.scales.shape
        x2 = x.reshape(-1, K)  # (M, K)
        if x2.shape[0] > int4_rounded_rows():
            return self.dequantized_product(x2).view(*lead, N)
        x64 = round_per_group(x2)

        def product(start: int, end: int, block: Callable[[tuple[int, ...]], torch.Tensor]) -> torch.Tensor:
            w = int4_dequantized(self.weight[start:end], self.scales[start:end], K, out=block((end - start, G * GROUP)))
            return F.linear(x64, w)

        return _blockwise(x64, N, K, product).to(x.dtype).view(*lead, N)

    def dequantized_product(self, x: torch.Tensor,
                            into: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                            ) -> torch.Tensor:
        """x (M, K) as it is times the weights (the module-level dequantized_product): into(packed rows, their scales,
        out) writes their weights into out, in its dtype (default: int4_dequantized, then a copy)."""
        K = self.in_features

        def rows(start: int, end: int, out: torch.Tensor) -> torch.Tensor:
            w, s = self.weight[start:end], self.scales[start:end]
            return out.copy_(int4_dequantized(w, s, K)) if into is None else into(w, s, out)

        return dequantized_product(x, self.scales.shape[0], K, rows)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.scales.shape[0]}, group={GROUP}"


class Bf16Linear(nn.Module):
    """A bias-free nn.Linear that stores its weight in bf16 and computes in fp32 (the activations' dtype)."""

    scales = None  # as Linear's: only int8 and int4 weights have scales

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        assert weight.ndim == 2, weight.shape
        self.register_buffer("weight", weight.detach().to(torch.bfloat16).contiguous())  # (N, K) bf16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *lead, K = x.shape
        return _converted_linear(x.reshape(-1, K), self.weight).view(*lead, -1)

    def extra_repr(self) -> str:
        N, K = self.weight.shape
        return f"in_features={K}, out_features={N}"


class Bf16Embedding(nn.Module):
    """nn.Embedding's table kept in bf16, its rows handed out in fp32: the activations' dtype on a CPU."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)  # (V, dim) bf16

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).float()


def _replace_linears(model: nn.Module, make: Callable[[nn.Module], nn.Module]) -> None:
    """Swap every weight matrix of the layers and the head (nn.Linear or Bf16Linear) for make(it), except
    the MoE routers."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            # The router stays exact: it is tiny (E x dim), and a small error in its logits can change which
            # experts a token goes to, a large change in the output for no saving.
            if isinstance(module, MoeLayer) and name == "gate":
                continue
            if isinstance(child, (nn.Linear, Bf16Linear)):
                assert getattr(child, "bias", None) is None, f"{name} has a bias; the model's linears have none"
                setattr(module, name, make(child))


def prepare(model: nn.Module, linears: str, embeddings: torch.dtype, compute: torch.dtype) -> nn.Module:
    """Give a model built on the meta device the modules of a weight format, before its weights are read into them.

    linears: "int8" (Int8Linear), "int4" (Int4Linear), "bf16" with fp32 compute (Bf16Linear), or "float" (as built,
    in `compute`).
    embeddings: the table's dtype; bf16 under fp32 compute makes it a Bf16Embedding. Every other parameter (norms,
    MoE routers) gets dtype `compute`, the activations'. How the weights get there is mistral.checkpoint's business.
    """
    assert linears in ("int8", "int4", "bf16", "float"), linears

    def meta(shape, dtype):
        return torch.empty(shape, dtype=dtype, device="meta")

    if linears == "int8":
        _replace_linears(model, lambda lin: Int8Linear(meta(lin.weight.shape, torch.int8),
                                                       meta(lin.weight.shape[:1], torch.float32)))
    elif linears == "int4":
        def int4(lin: nn.Module) -> Int4Linear:
            packed, scales = int4_shapes(*lin.weight.shape)
            return Int4Linear(meta(packed, torch.uint8), meta(scales, torch.float16), lin.weight.shape[1])
        _replace_linears(model, int4)
    elif linears == "bf16":
        _replace_linears(model, lambda lin: Bf16Linear(meta(lin.weight.shape, torch.bfloat16)))
    table = getattr(model, "tok_embeddings", None)
    if isinstance(table, nn.Embedding) and embeddings == torch.bfloat16 and compute == torch.float32:
        model.tok_embeddings = Bf16Embedding(meta(table.weight.shape, torch.bfloat16))
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            dtype = embeddings if isinstance(module, nn.Embedding) else compute
            setattr(module, name, nn.Parameter(meta(p.shape, dtype), requires_grad=False))
    return model


@torch.no_grad()
def quantize_int8(model: nn.Module) -> nn.Module:
    """Int8 weight-only quantization, in place: every linear of the transformer layers and the output head
    becomes an Int8Linear with per-output-channel symmetric scales. Returns the model.

    Left as they are: the MoE routers (see _replace_linears) and the embeddings, which are read one row per
    token, so int8 would save memory but no time. Activations keep the model's dtype.
    """
    _replace_linears(model, Int8Linear.from_linear)
    return model


@torch.no_grad()
def quantize_int4(model: nn.Module) -> nn.Module:
    """4-bit group-wise quantization, in place: as quantize_int8, with Int4Linear. Returns the model."""
    _replace_linears(model, Int4Linear.from_linear)
    return model


@torch.no_grad()
def bf16_weight_only(model: nn.Module) -> nn.Module:
    """bf16 weights, fp32 compute, in place: every linear becomes a Bf16Linear (its weight kept in, or
    rounded to, bf16) and every other parameter (embeddings, norms, MoE routers) becomes fp32. Returns the model.

    For a model loaded in bf16 on a CPU without bf16 arithmetic: it keeps bf16's memory and bytes per token
    but never runs a bf16 kernel. The linear weights are buffers, so model.dtype (the first parameter's)
    becomes fp32, and with it the activations and the KV cache that generate allocates.
    """
    _replace_linears(model, lambda linear: Bf16Linear(linear.weight))
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_floating_point() and p.dtype != torch.float32:
                setattr(module, name, nn.Parameter(p.float(), requires_grad=p.requires_grad))
    return model
