"""Which device and dtype a run uses, from what was asked for ("auto", a name, or None) and what the machine can run
at a usable speed."""
import functools
import re
from pathlib import Path

import torch

from mistral.errors import MistralError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def resolve_device(device: torch.device | str | None) -> torch.device:
    """None or "auto": cuda when available, else cpu."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise MistralError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise MistralError(f"device {str(device)!r} is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cpu" and device.index not in (None, 0):
        raise MistralError(f"device {str(device)!r}: a CPU has no numbered devices (all cores are used); use cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MistralError(f"device {str(device)!r} was asked for but CUDA is not available here; use --device cpu")
    return device


@functools.cache
def cpu_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX or AVX512-BF16, which torch's bf16 matmul uses
    through oneDNN): a 7B layer's product of 512 rows then runs 5.7x as fast in bf16 as in fp32 (the Xeon of
    docs/performance-diary.md), where on a CPU without it (AVX2 only) bf16 runs 7x slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"\b(amx_bf16|avx512_bf16)\b", flags) is not None


def _native_bf16(device: torch.device) -> bool:
    """Whether a GPU computes in bf16 itself (compute capability 8.0, Ampere, and later). torch's
    is_bf16_supported() also counts emulation, and says True on a T4 or a V100, where xformers refuses bf16."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device,
                  stored: torch.dtype = torch.float32) -> torch.dtype:
    """None or "auto": bf16 on cuda, fp16 on GPUs without native bf16 (before Ampere); on cpu the weights' stored
    dtype, fp16 becoming fp32 (a CPU runs fp16 hundreds of times slower), so a checkpoint is never expanded on its way
    into memory. Refuses what the device cannot run at a usable speed."""
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if _native_bf16(device) else torch.float16
        return stored if stored in (torch.float32, torch.bfloat16) else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise MistralError(f"unknown dtype {dtype!r}; use auto, fp32, bf16 or fp16")
        dtype = DTYPES[dtype]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise MistralError(f"dtype {dtype} is not supported; use fp32, bf16 or fp16")
    if device.type == "cpu" and dtype == torch.float16:
        raise MistralError("fp16 on CPU runs through a scalar fallback hundreds of times slower than fp32; "
                           "use fp32 or bf16")
    if device.type == "cuda" and dtype == torch.bfloat16 and not _native_bf16(device):
        major, minor = torch.cuda.get_device_capability(device)
        name = torch.cuda.get_device_name(device)
        raise MistralError(f"this GPU ({name}, compute capability {major}.{minor}) has no "
                           "native bf16, which needs 8.0 (Ampere) or later: use --dtype fp16 or fp32")
    return dtype
