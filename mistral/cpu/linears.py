"""The products of int8 and int4 weights in C, put in place of the torch ones once, from outside the model.

    with_kernels(model)  # each Int8Linear / Int4Linear becomes a CInt8Linear / CInt4Linear, in place

mistral/quantize.py defines what an int8 or int4 product is: x rounded to int8 per group of 32 along its row (int8:
up to INT8_ROWS rows, int4 up to int4_rounded_rows; beyond them x as it is), times the integer weights, times the
scales. Its modules compute that
in torch. The subclasses here compute the same in C (kernels.matvec: kernels.c, 1b) wherever kernels.usable holds,
which is every product of any number of rows on a CPU outside autograd once the kernels are built (int8: up to
INT8_ROWS), and otherwise call the torch forward they inherit. So whatever runs a model (one process or pipeline
ranks, a decode step in mistral/cpu's engine or a pre-fill in the model's forward) computes the same products; the
C and torch ones differ by the order of their fp32 sums only.

CpuDecoder.of applies it, on a CPU, to every model it is asked to run (mistral.runners.Runner asks for every
generation, pipeline ranks included), loaded or quantized in memory (mistral.quantize.quantize_int8); a second call
changes nothing. A model called directly, never run by a Runner, keeps the torch forward: the same products.
"""
import torch
from torch import nn

from mistral.cpu import kernels
from mistral.ggml import GgmlLinear, rounded_rows
from mistral.quantize import Int4Linear, Int8Linear, int4_rounded_rows


class _InC:
    """Before a quantized linear of mistral/quantize.py in the bases: its products by kernels.matvec where the kernel
    takes x and the weights, else by the torch forward of that class."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *lead, K = x.shape
        x2 = x.reshape(-1, K)  # (M, K)
        if not kernels.usable(x2, self.weight):
            return super().forward(x)  # the format's own forward, inside this module's call
        return kernels.matvec(x2, self.weight, self.scales).view(*lead, -1)


class CInt8Linear(_InC, Int8Linear):
    """Int8Linear, its products in C (kernels.c, 1b) where the kernel takes them."""


class CInt4Linear(_InC, Int4Linear):
    """Int4Linear, its products in C (kernels.c, 1b) where the kernel takes them; past int4_rounded_rows rows of x, the
    weights dequantized in C."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (M, K)
        if x2.shape[0] > int4_rounded_rows() and kernels.usable(x2, self.weight):
            return self.dequantized_product(x2, kernels.int4_dequantize).view(*x.shape[:-1], -1)
        return super().forward(x)


class CGgmlLinear(GgmlLinear):
    """GgmlLinear (a GGUF file's block format), its products in C (kernels.c, 1c) where the kernel takes them: rows of
    whole super-blocks of 256 weights, on a CPU; past rounded_rows rows of x, the weights dequantized in C."""

    def __init__(self, weight: torch.Tensor, kind: int, in_features: int):
        super().__init__(weight, kind, in_features)
        self._code = self.code

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *lead, K = x.shape
        x2 = x.reshape(-1, K)  # (M, K)
        if not (kernels.takes_rows(x2, None) and kernels._format(self.weight, self._code) == kernels.GG):
            return super().forward(x)
        if x2.shape[0] > rounded_rows(self.kind):
            into = lambda w, out: kernels.block_dequantize(w, self.kind, out)  # noqa: E731
            return self.dequantized_product(x2, into).view(*lead, -1)
        return kernels.matvec(x2, self.weight, self._code).view(*lead, -1)


def with_kernels(model: nn.Module) -> nn.Module:
    """model, each of its Int8Linear, Int4Linear and GgmlLinear modules replaced, in place, by CInt8Linear, CInt4Linear
    and CGgmlLinear holding the same tensors; unchanged where the kernels are not built. Returns the model."""
    swaps = [(module, name, child) for module in model.modules() for name, child in module.named_children()
             if type(child) in (Int8Linear, Int4Linear, GgmlLinear)]
    if not swaps or not kernels.available():  # a model of other weights does not build the kernels here
        return model
    for module, name, child in swaps:
        if type(child) is GgmlLinear:
            setattr(module, name, CGgmlLinear(child.weight, child.kind, child.in_features).train(child.training))
        elif type(child) is Int8Linear:
            setattr(module, name, CInt8Linear(child.weight, child.scales).train(child.training))
        else:
            setattr(module, name, CInt4Linear(child.weight, child.scales, child.in_features).train(child.training))
    return model
