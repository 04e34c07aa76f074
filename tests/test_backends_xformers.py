"""The xformers path (mistral/backends/xformers.py; issue #20, items 2, 5, 6).

Most of it runs on a CPU: "cpu" joins attention.KERNELS, and either the installed xformers (whose C++ library, built
for another torch, does not load here: the very case of an xformers that imports but cannot run) or a stand-in package
takes its place. The last test runs the real kernels, on a GPU only (python -m pytest --device cuda)."""
import copy
import importlib.abc
import logging
import sys
import types

import pytest
import torch
from helpers import random_model, tiny_params

import mistral.attention as attn
from mistral.attention import BlockMask, attention
from mistral.backends import xformers as xf
from mistral.cache import RotatingBufferCache


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
