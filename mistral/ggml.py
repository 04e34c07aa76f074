"""llama.cpp's block formats, as a GGUF file stores them, and the modules that keep them that way.

A quantized matrix in a GGUF file is, row after row, blocks of a fixed number of weights, each block holding its
integers and the scales that turn them into weights (llama.cpp's ggml-common.h; `d` and `dmin` are fp16):

    type   weights  bytes  a block                                         weight
    Q8_0     32      34    d, int8 q[32]                                    d q
    Q4_0     32      18    d, q[16]: byte j = weight j | weight j+16 << 4   d (q - 8)
    Q4_K    256     144    d, dmin, scales[12], q[128]                      d sc q - dmin m     (sc, m per 32)
    Q5_K    256     176    d, dmin, scales[12], qh[32], q[128]             as Q4_K, q of 5 bits
    Q6_K    256     210    ql[128], qh[64], int8 sc[16], d                  d sc (q - 32)       (sc per 16)

Q4_K and Q5_K pack eight 6-bit scales sc and mins m into 12 bytes (_scale_min). In a K-quant block each run of 32
bytes of q holds two sub-blocks of 32: weights 64 c .. 64 c + 31 in its low nibbles, the next 32 in its high ones.

`dequantize` is the plain torch reference of each format: the weights a block of rows stands for, in fp32, computed
in the order llama.cpp computes them (gguf's numpy dequantizers give the same floats, which the tests check).
GgmlLinear keeps a matrix as the file stores it and multiplies by it as the int8 and int4 formats of
mistral/quantize.py do: x rounded to int8 (round_per_group), times the weights, in float64, a block of rows
dequantized at a time. x is rounded as llama.cpp rounds it for each format (x_group): per group of 32 for Q8_0, per
super-block of 256 for the K-quants. mistral/cpu/linears.py swaps in the C kernels that compute the same from the blocks
themselves. GgmlEmbedding looks rows up without dequantizing the table. Q4_0 needs neither: its nibbles and scale
rule are int4's (mistral/quantize.py), so a Q4_0 matrix becomes an Int4Linear without a change to any weight
(q4_0_as_int4).
"""
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mistral.device import cpu_bf16_matmul
from mistral.quantize import GROUP, _blockwise, dequantized_product, int4_rounded_rows, round_per_group

# GGML type number (llama.cpp's enum ggml_type, the numbers a GGUF file stores) -> (name, weights a block, bytes).
BLOCKS = {2: ("Q4_0", 32, 18), 8: ("Q8_0", 32, 34), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
          14: ("Q6_K", 256, 210)}
TYPES = {name: number for number, (name, _, _) in BLOCKS.items()}
# Up to rounded_rows(kind) rows of x a product rounds x (x_group) and multiplies integers (kernels.c, 1c); beyond,
# it takes x as it is, times the weights dequantized a block of rows at a time, as int8 does past INT8_ROWS: in fp32
# (MKL), or in bf16 where the CPU multiplies bf16 in hardware (dequantized_product). Where the float products overtake
# the integer ones on a 7B layer's shapes, 2 threads, the Xeon of docs/performance-diary.md: in fp32, from 96 rows for
# Q8_0, 160 for Q4_K and Q5_K, and 48 for Q6_K (its integer products take twice the instructions of Q4_K's: its scales
# per 16); in bf16, 5.7x faster there, from fewer than 32 rows for all of them (48 here, above the tests' pre-fills of
# 42 rows). Q4_0 is int4, whose rule is its own (mistral/quantize.py, int4_rounded_rows).
_FP32_ROWS = {8: 96, 12: 160, 13: 160, 14: 48}
_BF16_ROWS = 48


def rounded_rows(kind: int) -> int:
    """The most rows of x a product of type `kind` multiplies rounded (see above)."""
    if kind == TYPES["Q4_0"]:
        return int4_rounded_rows()
    return _BF16_ROWS if cpu_bf16_matmul() else _FP32_ROWS[kind]


def x_group(kind: int) -> int:
    """The group along a row of x that a product of type `kind` rounds x per, as llama.cpp rounds it: a super-block of
    256 for the K-quants (its Q8_K), else 32 (its Q8_0)."""
    return 256 if BLOCKS[kind][1] == 256 else GROUP


def row_bytes(kind: int, K: int) -> int:
    """The bytes of one row of K weights of type `kind` (K a multiple of its block)."""
    _, weights, nbytes = BLOCKS[kind]
    return K // weights * nbytes


def row_weights(kind: int, nbytes: int) -> int:
    """The weights in one row of nbytes bytes of type `kind`."""
    _, weights, block = BLOCKS[kind]
    return nbytes // block * weights


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """(..., 2) uint8 little-endian fp16 -> (...,) fp32."""
    return raw.contiguous().view(torch.float16).squeeze(-1).float()


def _scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's and Q5_K's 12 bytes (..., 12) -> eight 6-bit scales and eight 6-bit mins (..., 8), as ints.

    Sub-blocks 0-3 keep theirs in the low six bits of bytes 0-3 (scales) and 4-7 (mins); sub-blocks 4-7 in the nibbles
    of bytes 8-11 (scale low, min high), their top two bits in the top two of bytes 0-3 (scales) and 4-7 (mins)."""
    s = s.int()
    sc = torch.cat([s[..., 0:4] & 63, (s[..., 8:12] & 15) | (s[..., 0:4] >> 6) << 4], -1)
    mn = torch.cat([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | (s[..., 4:8] >> 6) << 4], -1)
    return sc, mn


def _nibble_pairs(qs: torch.Tensor) -> torch.Tensor:
    """K-quant q (..., 128) bytes -> (..., 8, 32) values: run c of 32 bytes is sub-block 2c (low nibbles), 2c + 1
    (high)."""
    runs = qs.int().unflatten(-1, (4, 32))
    return torch.stack([runs & 15, runs >> 4], -2).flatten(-3, -2)


def dequantize(raw: torch.Tensor, kind: int) -> torch.Tensor:
    """Rows of blocks (n, row_bytes) uint8 of GGML type `kind` -> the (n, K) fp32 weights they stand for."""
    _, weights, nbytes = BLOCKS[kind]
    n = raw.shape[0]
    b = raw.reshape(n, -1, nbytes)  # (n, blocks, bytes)
    if kind == TYPES["Q8_0"]:
        w = _f16(b[..., :2])[..., None] * b[..., 2:].contiguous().view(torch.int8).float()
    elif kind == TYPES["Q4_0"]:
        q = b[..., 2:].int()
        w = _f16(b[..., :2])[..., None] * (torch.cat([q & 15, q >> 4], -1) - 8).float()
    elif kind in (TYPES["Q4_K"], TYPES["Q5_K"]):
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        sc, mn = _scale_min(b[..., 4:16])
        q = _nibble_pairs(b[..., -128:])  # (n, blocks, 8, 32)
        if kind == TYPES["Q5_K"]:  # bit j of qh[l] is the fifth bit of weight l of sub-block j
            qh = b[..., 16:48].int()
            q = q | ((qh[..., None, :] >> torch.arange(8, dtype=torch.int32)[:, None]) & 1) << 4
        w = (d[..., None] * sc.float())[..., None] * q.float() - (dmin[..., None] * mn.float())[..., None]
    elif kind == TYPES["Q6_K"]:
        ql, qh = b[..., 0:128].int().unflatten(-1, (2, 2, 32)), b[..., 128:192].int().unflatten(-1, (2, 1, 32))
        sc, d = b[..., 192:208].contiguous().view(torch.int8).float(), _f16(b[..., 208:210])
        # In each half of 128: runs k = 0..3 of 32, low nibbles of ql[0:32], ql[32:64], then their high nibbles,
        # with bits 2k, 2k + 1 of qh as the top two.
        low = torch.cat([ql & 15, ql >> 4], -2)  # (n, blocks, 2, 4, 32)
        high = (qh >> torch.arange(0, 8, 2, dtype=torch.int32)[:, None]) & 3
        q = (low | high << 4) - 32
        w = (d[..., None] * sc)[..., None] * q.flatten(-3).unflatten(-1, (16, 16)).float()
    else:
        raise ValueError(f"GGML type {kind} is not one of {sorted(BLOCKS)}")
    return w.reshape(n, -1)


def q4_0_as_int4(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 rows (n, G * 18) -> the (packed (n, G * 16), scales (n, G) fp16) of int4_rows that stand for the same
    weights: the same nibbles in the same places, each block's scale moved out beside them."""
    n = raw.shape[0]
    b = raw.reshape(n, -1, 18)
    return b[..., 2:].reshape(n, -1).clone(), b[..., :2].contiguous().view(torch.float16).reshape(n, -1)


class GgmlLinear(nn.Module):
    """A bias-free nn.Linear whose weight is a GGUF file's rows of blocks, kept as stored: (N, row_bytes) uint8."""

    scales = None  # the blocks hold their own

    def __init__(self, weight: torch.Tensor, kind: int, in_features: int):
        super().__init__()
        assert kind in BLOCKS and weight.dtype == torch.uint8 and weight.shape[1] == row_bytes(kind, in_features), (
            kind, weight.dtype, weight.shape, in_features)
        self.kind, self.in_features = kind, in_features
        self.register_buffer("weight", weight)  # (N, row_bytes) uint8

    @property
    def code(self) -> torch.Tensor:
        """The type number as the C kernels take it, in place of scales: (1,) fp32."""
        return torch.tensor([float(self.kind)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x rounded per x_group times the dequantized weights, in float64; past rounded_rows rows, x as it is,
        in x's dtype. The weights are dequantized a block of rows at a time."""
        *lead, K = x.shape
        x2 = x.reshape(-1, K)  # (M, K)
        if x2.shape[0] > rounded_rows(self.kind):
            return self.dequantized_product(x2).view(*lead, -1)
        x64 = round_per_group(x2, x_group(self.kind))

        def product(start: int, end: int, block: Callable[[tuple[int, ...]], torch.Tensor]) -> torch.Tensor:
            return F.linear(x64, block((end - start, K)).copy_(dequantize(self.weight[start:end], self.kind)))

        return _blockwise(x64, self.weight.shape[0], K, product).to(x.dtype).view(*lead, -1)

    def dequantized_product(self, x: torch.Tensor,
                            into: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """x (M, K) as it is times the weights (mistral/quantize.py, dequantized_product): into(rows of blocks, out)
        writes their weights into out, in its dtype (default: dequantize, then a copy)."""
        def rows(start: int, end: int, out: torch.Tensor) -> torch.Tensor:
            raw = self.weight[start:end]
            return out.copy_(dequantize(raw, self.kind)) if into is None else into(raw, out)

        return dequantized_product(x, self.weight.shape[0], self.in_features, rows)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.weight.shape[0]}, type={BLOCKS[self.kind][0]}"


class GgmlEmbedding(nn.Module):
    """nn.Embedding whose table is a GGUF file's rows of blocks: only the rows looked up are dequantized (fp32)."""

    def __init__(self, weight: torch.Tensor, kind: int, dim: int):
        super().__init__()
        assert kind in BLOCKS and weight.dtype == torch.uint8 and weight.shape[1] == row_bytes(kind, dim), (
            kind, weight.shape, dim)
        self.kind, self.dim = kind, dim
        self.register_buffer("weight", weight)  # (V, row_bytes) uint8

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return dequantize(self.weight[ids.reshape(-1)], self.kind).view(*ids.shape, self.dim)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.dim}, type={BLOCKS[self.kind][0]}"


assert GROUP == 32  # every block holds whole groups of the rounding of x
