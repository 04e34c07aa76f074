"""Mixture-of-experts routing that never waits for the host: every expert in one grouped product.

MoeLayer (mistral/moe.py) runs each chosen expert as its own product, so the host must know how many tokens each
expert took before it can launch them: one read a layer, and on a GPU every read drains the queue. Here the E
experts' weights are stacked, (E, hidden, dim), and one grouped product takes the tokens sorted by expert, cut into
E runs at offsets that stay on the device. An expert no token chose is an empty run, so its weights are not read.
Nothing in the layer waits for the device, so a decode step of a mixture can be captured whole (mistral/compiled.py).

It is applied from outside, as quantized formats are: group_experts(model) swaps each MoeLayer for a GroupedMoeLayer.
The experts keep their modules and names, and their weights become views of the stacks, so the state dict, the CPU
engine and every reader of model.layers see what they saw before, and no weight is held twice. Loading on CUDA
applies it where torch has a fused grouped kernel: bf16 on Hopper and Blackwell (compute capability 9 and 10). On
other GPUs torch's grouped product falls back to a loop that reads the offsets on the host itself, no better than
MoeLayer's one read, so they keep MoeLayer. On a CPU torch's grouped product runs too (bf16 is needed to compile it),
which is how the tests check it.

Letters: S tokens, E experts, K experts per token.
"""
import torch
import torch.nn.functional as F
from torch import nn

from mistral.moe import MoeLayer

# torch 2.10 names the product in torch.nn.functional; before, and still underneath, it is torch._grouped_mm.
_grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm


def fused(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's grouped product runs as one kernel, with no host read, for weights of `dtype` on `device`."""
    return (device.type == "cuda" and dtype == torch.bfloat16
            and torch.cuda.get_device_capability(device)[0] in (9, 10))


class GroupedMoeLayer(MoeLayer):
    """MoeLayer's function, its experts' weights stacked into w1, w3 (E, hidden, dim) and w2 (E, dim, hidden)."""

    def __init__(self, layer: MoeLayer):
        super().__init__(list(layer.experts), layer.gate, layer.num_experts_per_tok)
        for name in ("w1", "w3", "w2"):  # one kind at a time: the most held twice is one stack
            linears = [getattr(e, name) for e in self.experts]
            stack = torch.stack([lin.weight.detach() for lin in linears])  # (E, out, in)
            for e, lin in enumerate(linears):
                lin.weight = nn.Parameter(stack[e], requires_grad=False)
            # Not in the state dict (the experts' weights are, as views): the checkpoint's names stay the only ones.
            self.register_buffer(name, stack, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (S, dim) -> (S, dim), as MoeLayer.forward, routed by its route, with the offsets kept on the device."""
        tokens, pair_weights, counts = self.route(x)  # (S*K,), (S*K, 1), (E,)
        # ends[e] is where expert e's run of the sorted choices ends: counts [2, 1, 1, 0] -> ends [2, 3, 4, 4], rows
        # 0-1 go through expert 0, row 2 through expert 1, row 3 through expert 2.
        ends = counts.cumsum(0, dtype=torch.int32)  # (E,)
        xs = x.index_select(0, tokens)  # (S*K, dim)
        h = F.silu(_grouped_mm(xs, self.w1.mT, offs=ends)) * _grouped_mm(xs, self.w3.mT, offs=ends)  # (S*K, hidden)
        ys = _grouped_mm(h, self.w2.mT, offs=ends)  # (S*K, dim)
        return torch.zeros_like(x).index_add_(0, tokens, pair_weights * ys)


def group_experts(model: nn.Module) -> int:
    """Swap every MoeLayer of `model` whose experts hold plain weights (not a quantized format) for a GroupedMoeLayer,
    in place; returns how many were swapped. Do it once the weights are where they will run: moving the model
    afterwards moves the stacks and the experts' views apart, each a copy of its own (still right, but every expert
    weight then held twice)."""
    swapped = 0
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is MoeLayer and all(type(getattr(e, n)) is nn.Linear
                                               for e in child.experts for n in ("w1", "w3", "w2")):
                setattr(module, name, GroupedMoeLayer(child))
                swapped += 1
    return swapped
