"""Grouped MoE experts (mistral/grouped.py; issue #20, item 7): routing on the device without host waits, the
oracle's logits, and where loading groups a mixture's experts."""
import copy

import pytest
import torch
from helpers import SIX_EXPERTS as MOE, random_model, save_folder, tiny_params
from oracle import oracle_logits
from torch.utils._python_dispatch import TorchDispatchMode

from mistral import checkpoint, grouped, quantize
from mistral.grouped import GroupedMoeLayer, group_experts
from mistral.model import FeedForward
from mistral.moe import MoeLayer


# Operators whose result's size or value the host must wait for: on a GPU each drains the queue.
HOST_WAITS = {"nonzero", "_unique2", "unique_dim", "unique_consecutive", "_local_scalar_dense", "masked_select",
              "bincount", "repeat_interleave", "one_hot"}


class HostWaits(TorchDispatchMode):
    """Notes every operator run that makes the host wait for the device's data."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in HOST_WAITS:
            self.seen.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_moe_routing_waits_for_the_host_once_per_layer(tokens, monkeypatch):
    """No unique, no where per expert: the routing runs on the device, and the host reads only the E row counts,
    once, which it needs to launch each chosen expert on its rows (and no other)."""
    torch.manual_seed(0)
    E = 6
    layer = MoeLayer([FeedForward(16, 24) for _ in range(E)], torch.nn.Linear(16, E, bias=False), 2)
    reads, tolist = [], torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(tuple(self.shape)) or tolist(self))
    with torch.no_grad(), HostWaits() as waits:
        layer(torch.randn(tokens, 16))
    assert waits.seen == [] and reads == [(E,)]


@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_grouped_routing_never_waits_for_the_host(tokens, monkeypatch):
    """GroupedMoeLayer: counts and offsets stay on the device, and the host reads nothing at all."""
    torch.manual_seed(0)
    layer = GroupedMoeLayer(MoeLayer([FeedForward(16, 24) for _ in range(6)], torch.nn.Linear(16, 6, bias=False), 2))
    reads, tolist = [], torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(tuple(self.shape)) or tolist(self))
    with torch.no_grad(), HostWaits() as waits:
        layer(torch.randn(tokens, 16))
    assert waits.seen == [] and reads == []


def test_a_grouped_mixture_is_the_oracles_and_keeps_its_weights_once():
    """Against tests/oracle.py's token-by-token routing. Twelve tokens over six experts, two each: some expert is
    chosen by several tokens; the one-token prompt leaves most experts an empty run. The state dict keeps the
    checkpoint's names and values, and each expert's weight is a view of its layer's stack, not a copy."""
    model = random_model(tiny_params(**MOE))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert group_experts(model) == 2 and group_experts(model) == 0  # once grouped, nothing left to swap
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)
    for layer in model.layers.values():
        ffn = layer.feed_forward
        assert type(ffn) is GroupedMoeLayer
        for e, expert in enumerate(ffn.experts):
            for name in ("w1", "w3", "w2"):
                assert getattr(expert, name).weight.data_ptr() == getattr(ffn, name)[e].data_ptr()
    for prompt in ([3, 17, 5, 60, 2, 9, 41, 33, 8, 1, 27, 50], [7]):
        with torch.no_grad():
            got = model(torch.tensor(prompt), [len(prompt)])
        want = oracle_logits(before, model.args.__dict__ | MOE, prompt).float()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_grouped_experts_agree_with_moelayer_on_the_device(device):
    """bf16 on the device under test: on Hopper or Blackwell, torch's fused grouped kernel. The grouped logits are
    MoeLayer's within twice bf16's own rounding there (MoeLayer in fp32 as the reference)."""
    plain = random_model(tiny_params(**MOE)).to(device)
    reference = copy.deepcopy(plain)
    plain = plain.to(torch.bfloat16)
    model = copy.deepcopy(plain)
    group_experts(model)
    ids = torch.tensor([3, 17, 5, 60, 2, 9, 41, 33, 8, 1, 27, 50], device=device)
    with torch.no_grad():
        want, fp32, got = (m(ids, [len(ids)]) for m in (plain, reference, model))
    rounding = (want - fp32).abs().max().item()
    torch.testing.assert_close(got, want, rtol=0, atol=2 * rounding)


def test_experts_in_a_quantized_format_are_not_grouped():
    model = random_model(tiny_params(**MOE))
    quantize.prepare(model, "int8", torch.float32, torch.float32)
    assert group_experts(model) == 0


def test_loading_groups_the_experts_where_the_product_is_fused(tmp_path, monkeypatch):
    """load_model groups a mixture's experts where grouped.fused says the product is one kernel (bf16 on Hopper or
    Blackwell), and only there; the logits are the ungrouped model's."""
    folder = save_folder(random_model(tiny_params(**MOE)), tmp_path)
    want = checkpoint.load_model(folder, device="cpu")
    assert not any(type(m) is GroupedMoeLayer for m in want.modules())
    monkeypatch.setattr(grouped, "fused", lambda device, dtype: True)
    model = checkpoint.load_model(folder, device="cpu")
    assert sum(type(m) is GroupedMoeLayer for m in model.modules()) == 2
    ids = torch.tensor([3, 17, 5, 60, 2, 9])
    with torch.no_grad():
        torch.testing.assert_close(model(ids, [6]), want(ids, [6]))


@pytest.mark.parametrize(("capability", "dtype", "fused"), [((9, 0), torch.bfloat16, True),
                                                          ((10, 0), torch.bfloat16, True),
                                                          ((9, 0), torch.float16, False),
                                                          ((8, 0), torch.bfloat16, False),
                                                          ((7, 5), torch.float16, False)])
def test_the_grouped_product_is_taken_where_torch_fuses_it(capability, dtype, fused, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert grouped.fused(torch.device("cuda"), dtype) is fused
    assert not grouped.fused(torch.device("cpu"), torch.bfloat16)
