"""Resolving the device and dtype a run uses (mistral/device.py), with the GPU's answers mocked."""
import pytest
import torch

from mistral.device import resolve_dtype
from mistral.errors import MistralError


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
