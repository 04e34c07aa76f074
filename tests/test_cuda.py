"""The CUDA path's choices, checked on a CPU with the GPU's answers mocked (issues #12 and #20)."""
import copy
import importlib.abc
import logging
import sys
import types

import pytest
import torch
from helpers import random_model, save_folder, tiny_params
from oracle import oracle_logits
from torch.utils._python_dispatch import TorchDispatchMode

import mistral.attention as attn
from mistral.backends import xformers as xf
from mistral import checkpoint, grouped, pipeline, quantize
from mistral.attention import BlockMask, attention
from mistral.cache import RotatingBufferCache
from mistral.checkpoint import load as loader
from mistral.compiled import CompiledDecoder
from mistral.device import resolve_dtype
from mistral.errors import MistralError
from mistral.generate import generate_ids
from mistral.grouped import GroupedMoeLayer, group_experts
from mistral.memory import Memory
from mistral.model import FeedForward, ModelArgs, Transformer
from mistral.moe import MoeLayer

GPUS = {"Tesla T4": (7, 5), "Tesla V100-SXM2-16GB": (7, 0), "NVIDIA A100-SXM4-80GB": (8, 0),
        "NVIDIA H100 80GB HBM3": (9, 0)}


@pytest.fixture(params=GPUS)
def gpu(request, monkeypatch):
    """A GPU of this name and compute capability; torch.cuda.is_bf16_supported() says True on all of them, as torch
    2.13's does (it counts emulation)."""
    name = request.param
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: GPUS[name])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    return name


def test_auto_picks_fp16_where_the_gpu_has_no_native_bf16(gpu):
    """T4 and V100 get fp16 (xformers refuses bf16 below sm80); Ampere and later get bf16."""
    want = torch.bfloat16 if GPUS[gpu][0] >= 8 else torch.float16
    for stored in (torch.bfloat16, torch.float32):
        assert resolve_dtype(None, torch.device("cuda", 0), stored=stored) == want
        assert resolve_dtype("auto", torch.device("cuda", 0), stored=stored) == want


def test_an_explicit_bf16_without_native_bf16_is_one_line(gpu):
    if GPUS[gpu][0] >= 8:
        assert resolve_dtype("bf16", torch.device("cuda", 0)) == torch.bfloat16
        return
    with pytest.raises(MistralError) as e:
        resolve_dtype("bf16", torch.device("cuda", 0))
    major, minor = GPUS[gpu]
    assert str(e.value) == (f"this GPU ({gpu}, compute capability {major}.{minor}) has no native bf16, which needs 8.0 "
                            "(Ampere) or later: use --dtype fp16 or fp32")
    assert resolve_dtype("fp16", torch.device("cuda", 0)) == torch.float16


# ---------------------------------------------------------------------------------------------------------
# The xformers path (issue #20, items 2, 5, 6), run on a CPU: "cpu" joins attention.KERNELS, and either
# the installed xformers (whose C++ library, built for another torch, does not load here: the very case of an
# xformers that imports but cannot run) or a stand-in package takes its place.


H, HKV, D, W = 6, 2, 8, 4


@pytest.fixture
def xformers_on_cpu(monkeypatch):
    """attention() tries xformers on CPU tensors; what the probe and the import found is forgotten before and after."""
    monkeypatch.setitem(attn.KERNELS, "cpu", xf.attention)
    monkeypatch.setattr(xf, "verdicts", {})
    monkeypatch.setattr(xf, "warned", [])
    xf.ops.cache_clear()
    yield
    xf.ops.cache_clear()


def fake_xformers(monkeypatch, *, kernel, dispatch=lambda inputs, needs_gradient: "op"):
    """A stand-in xformers package: memory_efficient_attention is `kernel`, the operator dispatch `dispatch`, and every
    attn_bias class records what it was built from. Returns the list of biases built."""
    built = []

    class Bias:
        def __init__(self, kind, *args):
            self.kind, self.args = kind, args
            built.append(self)

        def __getattr__(self, name):  # make_local_attention(W) and the like: one more step of the recipe
            if name.startswith("make_"):
                return lambda *args: bias(f"{self.kind}.{name}", *args)
            raise AttributeError(name)

    def bias(kind, *args):  # of a class of its own, named after its kind, as xformers' biases are
        return type(kind, (Bias,), {})(kind, *args)

    class Recorder:
        def __init__(self, kind):
            self.kind = kind

        def from_seqlens(self, *args, device=None):
            return bias(self.kind, *args)

    attn_bias = types.ModuleType("xformers.ops.fmha.attn_bias")
    attn_bias.__getattr__ = lambda name: Recorder(name)
    dispatch_module = types.ModuleType("xformers.ops.fmha.dispatch")
    dispatch_module._dispatch_fw = dispatch
    fmha = types.ModuleType("xformers.ops.fmha")
    fmha.attn_bias, fmha.dispatch = attn_bias, dispatch_module
    fmha.Inputs = lambda query, key, value, attn_bias: types.SimpleNamespace(validate_inputs=lambda: None)
    ops = types.ModuleType("xformers.ops")
    ops.fmha, ops.memory_efficient_attention = fmha, kernel
    package = types.ModuleType("xformers")
    package.ops = ops
    for name, module in [("xformers", package), ("xformers.ops", ops), ("xformers.ops.fmha", fmha),
                         ("xformers.ops.fmha.attn_bias", attn_bias), ("xformers.ops.fmha.dispatch", dispatch_module)]:
        monkeypatch.setitem(sys.modules, name, module)
    return built


def steps():
    """(q, k, v, mask) of a first pre-fill, a chunk on a cache, and a decode step over cache rows as stored."""
    torch.manual_seed(0)
    out = []
    for mask in [BlockMask((5, 7, 2), (5, 7, 2), W), BlockMask((3, 0, 5), (7, 0, 9), W)]:
        S, Skv = mask.shape
        out.append((torch.randn(S, H, D), torch.randn(Skv, HKV, D), torch.randn(Skv, HKV, D), mask))
    mask = BlockMask((1, 1, 1), (4, 2, 3), W, kv_padding=W)
    out.append((torch.randn(3, H, D), torch.randn(3, HKV, W, D), torch.randn(3, HKV, W, D), mask))
    return out


def dense_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(D)) v under mask.materialize(), written out: the reference for every path."""
    if mask.kv_padding is not None:  # cache rows (B, Hkv, P, D) -> slots row after row (B * P, Hkv, D)
        k, v = (t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]) for t in (k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("shd,khd->hsk", q, k) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~mask.materialize(), float("-inf"))
    return torch.einsum("hsk,khd->shd", scores.softmax(-1), v)


def test_an_xformers_that_fails_on_import_falls_back_to_sdpa_with_one_warning(xformers_on_cpu, monkeypatch, caplog):
    """Not only ImportError: a build for another torch can fail with OSError (its C++ library does not load)."""
    class Broken(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "xformers":
                raise OSError("libc10_cuda.so: cannot open shared object file")
            return None

    for name in [m for m in sys.modules if m.split(".")[0] == "xformers"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [Broken(), *sys.meta_path])
    with caplog.at_level(logging.WARNING, logger="mistral.backends.xformers"):
        for _ in range(3):
            for q, k, v, mask in steps():
                torch.testing.assert_close(attention(q, k, v, mask), dense_attention(q, k, v, mask))
    ours = [r.getMessage() for r in caplog.records if r.name == "mistral.backends.xformers"]
    assert len(ours) == 1, ours
    assert "importing xformers failed (libc10_cuda.so: cannot open shared object file)" in ours[0]


def test_an_xformers_without_an_operator_for_the_inputs_falls_back_with_one_warning(xformers_on_cpu, monkeypatch,
                                                                                   caplog):
    """The probe asks xformers' dispatch once per kind of step; when no operator takes the inputs, the kernel is never
    called, SDPA runs, and one warning says why, however many steps and kinds follow."""
    asked, called = [], []

    def dispatch(inputs, needs_gradient):
        asked.append(inputs)
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward` with inputs:\n"
                                  "     query       : shape=(1, 14, 2, 3, 8) (torch.float32)\n"
                                  "`fa2F@2.8.3-pt` is not supported because:\n"
                                  "    device=cpu (supported: {'cuda'})\n"
                                  "    operator wasn't built - see `python -m xformers.info` for more info\n"
                                  "`cutlassF-pt` is not supported because:\n"
                                  "    device=cpu (supported: {'cuda'})")

    fake_xformers(monkeypatch, kernel=lambda *a, **k: called.append(a), dispatch=dispatch)
    with caplog.at_level(logging.WARNING, logger="mistral.backends.xformers"):
        for _ in range(3):
            for q, k, v, mask in steps():
                torch.testing.assert_close(attention(q, k, v, mask), dense_attention(q, k, v, mask))
    assert called == []
    assert len(asked) == 3  # one probe for each kind of step: first pre-fill, chunk, decode
    ours = [r.getMessage() for r in caplog.records if r.name == "mistral.backends.xformers"]
    assert len(ours) == 1, ours
    assert ("(fa2F@2.8.3-pt: device=cpu (supported: {'cuda'}), operator wasn't built - see `python -m xformers.info` "
            "for more info; cutlassF-pt: device=cpu (supported: {'cuda'}))") in ours[0] and "SDPA" in ours[0]


def test_the_installed_xformers_that_cannot_run_here_is_not_called(xformers_on_cpu, monkeypatch, caplog):
    """The real thing: the xformers in this environment imports, but no operator of its runs CPU tensors (and its C++
    library, built for another torch, may not load). Its own dispatch says so, and SDPA runs instead."""
    ops = pytest.importorskip("xformers.ops")
    called = []
    monkeypatch.setattr(ops, "memory_efficient_attention", lambda *a, **k: called.append(a))
    with caplog.at_level(logging.WARNING, logger="mistral.backends.xformers"):
        for _ in range(2):
            for q, k, v, mask in steps():
                torch.testing.assert_close(attention(q, k, v, mask), dense_attention(q, k, v, mask))
    assert called == []
    ours = [r.getMessage() for r in caplog.records if r.name == "mistral.backends.xformers"]
    assert len(ours) == 1 and "device=cpu" in ours[0], ours


def decode_over_cache(layers=2, rows=3):
    """A decode step's q, and layer 1's (k, v) as CacheView.update returns them: views of the cache's buffers."""
    torch.manual_seed(0)
    cache = RotatingBufferCache(layers, rows, W, HKV, D)
    cache.cache_k.normal_(), cache.cache_v.normal_()
    cache.seq_pos = [7, 1, 2]  # row 0 has wrapped: all W slots valid; rows 1 and 2 hold 2 and 3 keys
    meta = cache.get_input_metadata([1] * rows, W)
    k, v = cache.layer(1, meta).update(torch.randn(rows, HKV, D), torch.randn(rows, HKV, D))
    return torch.randn(rows, H, D), k, v, meta.mask, cache


def test_decode_on_the_xformers_path_reads_the_cache_in_place(xformers_on_cpu, monkeypatch):
    """The kernel gets the cache rows as stored, (B * Hkv * P, D) views of the buffers, not a copy of every slot; the
    bias has one block per (row, kv head) pair, of the G query heads that share that kv head."""
    got = []
    fake_xformers(monkeypatch, kernel=lambda q5, k5, v5, attn_bias: got.append((q5, k5, v5, attn_bias)) or q5)
    q, k, v, mask, cache = decode_over_cache()
    attention(q, k, v, mask)
    (q5, k5, v5, bias), = got
    B, P, G = 3, W, H // HKV
    assert k5.shape == v5.shape == (1, B * HKV * P, 1, 1, D) and q5.shape == (1, B * H, 1, 1, D)
    assert k5.data_ptr() == cache.cache_k[1].data_ptr() and v5.data_ptr() == cache.cache_v[1].data_ptr()
    assert k5.untyped_storage().data_ptr() == cache.cache_k.untyped_storage().data_ptr()  # a view, not a copy
    assert (bias.kind, bias.args) == ("BlockDiagonalPaddedKeysMask", ([G] * (B * HKV), P, [4, 4, 2, 2, 3, 3]))


def test_decode_on_the_xformers_path_passes_xformers_own_checks_and_equals_sdpa(xformers_on_cpu, monkeypatch):
    """With the real bias: xformers' flash operator finds nothing wrong with these inputs but the device and its build
    (its shape, stride and bias checks pass), and the attention its bias describes is SDPA's."""
    fmha = pytest.importorskip("xformers.ops.fmha")
    from xformers.ops.fmha import flash

    got = []

    def kernel(q5, k5, v5, attn_bias):
        got.append(flash.FwOp.not_supported_reasons(fmha.Inputs(q5.half(), k5.half(), v5.half(), attn_bias)))
        scores = torch.einsum("smrd,kmrd->mrsk", q5[0], k5[0]) / D**0.5
        scores = scores + attn_bias.materialize((q5.shape[1], k5.shape[1]))  # 0 or -inf
        return torch.einsum("mrsk,kmrd->smrd", scores.softmax(-1), v5[0])[None]

    monkeypatch.setattr(sys.modules["xformers.ops"], "memory_efficient_attention", kernel)
    monkeypatch.setattr(xf, "refuses", lambda *a: None)
    q, k, v, mask, _ = decode_over_cache()
    torch.testing.assert_close(attention(q, k, v, mask), dense_attention(q, k, v, mask))
    reasons = [r for r in got[0] if "device=" not in r and "operator wasn't built" not in r]
    assert reasons == []


def test_the_xformers_bias_is_built_once_per_forward(xformers_on_cpu, monkeypatch):
    """Every layer of a forward shares one bias, as the SDPA path shares its masks: 3 layers, 1 bias per forward."""
    fake_xformers(monkeypatch, kernel=lambda q5, k5, v5, attn_bias: torch.zeros_like(q5))
    model = random_model(tiny_params(n_layers=3))
    cache = RotatingBufferCache(3, 2, model.args.sliding_window, model.args.n_kv_heads, model.args.head_dim)
    calls = []
    attn_bias = xf.attn_bias
    monkeypatch.setattr(xf, "attn_bias", lambda mask, *a: calls.append(mask) or attn_bias(mask, *a))
    with torch.no_grad():
        for ids, seqlens in [([1, 2, 3, 4, 5], [3, 2]), ([6, 7], [1, 1]), ([8, 9], [1, 1]), ([1, 2, 3], [2, 1])]:
            model(torch.tensor(ids), seqlens, cache)
    assert len(calls) == 4 and len({id(m) for m in calls}) == 4  # one per forward: pre-fill, two decodes, a chunk


# ---------------------------------------------------------------------------------------------------------
# Loading for CUDA (items 4 and 8), with the GPU's answers mocked


class Reached(Exception):
    """Raised where loading would first touch the GPU: everything before it ran."""


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine with two H100s, as torch would describe it; cuda:0 is current, as it is in a fresh process. Returns
    the devices the loader asked about memory for, and those it made current."""
    seen = {"memory": [], "current": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: seen["current"].append(torch.device(device)))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))

    def memory_available(device):
        seen["memory"].append(device)
        raise Reached

    monkeypatch.setattr(loader, "memory_available", memory_available)
    monkeypatch.setattr(pipeline, "pipeline_rank", lambda n: 1)  # this process is rank 1 of 2
    return seen


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_folder(random_model(tiny_params()), tmp_path_factory.mktemp("tiny"))


def test_a_pipeline_rank_takes_its_gpu_from_local_rank(two_gpus, folder, monkeypatch):
    """Library users who call init_process_group themselves may never pick a GPU: the rank's is cuda:LOCAL_RANK."""
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(Reached):
        checkpoint.load_model(folder, num_pipeline_ranks=2, device="cuda")
    assert two_gpus["memory"] == [torch.device("cuda", 1)] and two_gpus["current"] == [torch.device("cuda", 1)]


def test_a_pipeline_rank_keeps_the_gpu_it_was_given(two_gpus, folder, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(Reached):
        checkpoint.load_model(folder, num_pipeline_ranks=2, device="cuda:0")
    assert two_gpus["memory"] == [torch.device("cuda", 0)]


def test_a_pipeline_rank_that_cannot_tell_its_gpu_is_one_line(two_gpus, folder, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(MistralError) as e:
        checkpoint.load_model(folder, num_pipeline_ranks=2, device="cuda")
    assert str(e.value) == ("pipeline rank 1 on CUDA needs its own GPU: set LOCAL_RANK (torchrun does) or pass "
                            "device='cuda:N'")
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(MistralError, match=r"^pipeline rank 1 was given cuda:2 but this machine has 2 GPUs"):
        checkpoint.load_model(folder, num_pipeline_ranks=2, device="cuda")
    assert two_gpus["memory"] == []


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantize_on_cuda_is_refused_in_one_line(two_gpus, folder, quantize):
    """int8 and int4 are CPU formats here: refused before anything is read or reaches the GPU."""
    with pytest.raises(MistralError) as e:
        checkpoint.load_model(folder, device="cuda", quantize=quantize)
    assert str(e.value).startswith(f"--quantize {quantize} is a CPU format: on CUDA every product would widen")
    assert "\n" not in str(e.value) and two_gpus["memory"] == []


# ---------------------------------------------------------------------------------------------------------
# MoE routing on the device (item 7)


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


MOE = dict(moe={"num_experts": 6, "num_experts_per_tok": 2})


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


@pytest.mark.parametrize(("capability", "dtype", "fused"), [((9, 0), torch.bfloat16, True), ((10, 0), torch.bfloat16, True),
                                                          ((9, 0), torch.float16, False), ((8, 0), torch.bfloat16, False),
                                                          ((7, 5), torch.float16, False)])
def test_the_grouped_product_is_taken_where_torch_fuses_it(capability, dtype, fused, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert grouped.fused(torch.device("cuda"), dtype) is fused
    assert not grouped.fused(torch.device("cpu"), torch.bfloat16)


def test_grouping_is_counted_in_the_memory_a_run_needs():
    """Stacking holds one kind of a layer's expert weights twice for a moment (E * hidden * dim), and grouped
    pre-fill runs K FFN rows a token: with a stack larger than the work space, the need grows by the difference."""
    params = tiny_params(dim=512, hidden_dim=8192, **MOE)
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_dict(params))
    plain = Memory.of(model, torch.bfloat16, 0, 4)
    grouped_ = Memory.of(model, torch.bfloat16, 0, 4, grouped=True)
    assert grouped_.weights == plain.weights and grouped_.work == 6 * 8192 * 512 * 2 > plain.work


def test_a_quantized_folder_on_cuda_is_refused_in_one_line(two_gpus, tmp_path):
    """A folder `quantize` wrote holds a CPU format: refused before anything is read or reaches the GPU."""
    folder = checkpoint.quantize(save_folder(random_model(tiny_params()), tmp_path / "f"), tmp_path / "q", "int8")
    with pytest.raises(MistralError) as e:
        checkpoint.load_model(folder, device="cuda")
    assert str(e.value) == (f"{folder} holds int8 weights, a CPU format: on CUDA every product would widen them back "
                            "to float, slower than bf16; load the folder it was made from, or run this one with "
                            "--device cpu")
    assert two_gpus["memory"] == []


# ---------------------------------------------------------------------------------------------------------
# A decode step torch.compile captures whole (item 11)


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


# ---------------------------------------------------------------------------------------------------------
# On a GPU (python -m pytest --device cuda, as python -m bench.gpu runs it)

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_xformers_and_sdpa_agree_on_the_device(device, dtype):
    """The real kernels: packed prompts, chunked pre-fill and decode past the window, xformers against SDPA in the
    same dtype, within twice that dtype's own rounding (the same steps in fp32)."""
    if device.type != "cuda":
        pytest.skip("xformers' kernels run on CUDA only")
    pytest.importorskip("xformers.ops")
    from bench.gpu import attention_backend, build, three_paths

    params = dict(tiny_params(dim=256, head_dim=64, hidden_dim=512, vocab_size=512), sliding_window=16)
    model = build(params, device, dtype, max_batch_size=3)
    with attention_backend("sdpa"):
        want, fp32 = three_paths(model), three_paths(copy.deepcopy(model).float())
    with attention_backend("xformers") as verdicts:
        got = three_paths(model)
    refused = {kind: why for kind, why in verdicts.items() if why is not None}
    if refused:
        pytest.skip(f"xformers refused some steps here: {refused}")
    for path in want:
        rounding = (want[path] - fp32[path]).abs().max().item()
        torch.testing.assert_close(got[path], want[path], rtol=0, atol=2 * rounding, msg=path)
