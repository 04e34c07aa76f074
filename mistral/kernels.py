"""The CPU kernels for decoding (csrc/kernels.c): few-row products, decode attention, RMSNorm.

Decoding reads every weight once per token, so its speed is the speed at which the matrix-vector products
read memory. On a CPU, MKL's product reaches about half of what the cores can stream together (it barely
uses the second of two cores); `matvec` here reaches the bandwidth (see csrc/kernels.c, and bench/kernels.py).
What a decode step spends besides the products is dispatch: at one token, torch's attention and RMSNorm
cost tens of microseconds each in calls and temporaries for under a microsecond of arithmetic; `attend` and
`rms_norm` do the same work in one call each.

The file is compiled on first use with the system's C compiler (`$CC`, else `cc`), for this CPU
(-march=native), in about a second, and kept in ~/.cache/mistral (or $XDG_CACHE_HOME/mistral) under a name
that hashes the source, the flags and the CPU, so a shared home directory never hands one machine another's
build. Without a compiler, `available()` is False, one warning says why, and callers use torch's own operations.

Letters: M rows of x (tokens), N rows of w (output features), K input features.
"""
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MAX_ROWS = 16  # beyond this, a matrix-matrix product (MKL) is faster: the weights are no longer the cost
SOURCE = Path(__file__).parent / "csrc" / "kernels.c"
# -fopenmp first; a compiler without OpenMP (Apple's clang) still gets a single-threaded kernel.
FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-march=native"], ["-O3"])

_lib: ctypes.CDLL | None = None
_tried = False


def _cpu_id() -> str:
    """What -march=native depends on: the model and feature flags of this CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return platform.processor() + platform.machine()


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mistral"


def _build(cc: str, flags: list[str], target: Path) -> str | None:
    """Compile SOURCE into target; None on success, else the compiler's last line of complaint."""
    tmp = None
    try:
        # Build beside the target and rename: processes starting together (torchrun) never load a half file.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        done = subprocess.run([cc, *flags, "-shared", "-fPIC", str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if done.returncode:
            return (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        os.replace(tmp, target)
        return None
    except OSError as e:  # CC names no program, or the folder takes no files
        return str(e)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _compile() -> ctypes.CDLL | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.warning("no C compiler found (set CC): decoding on CPU uses torch's slower matrix-vector products")
        return None
    try:
        (folder := _cache_dir()).mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"{folder} is not writable")
    except OSError:  # no usable cache folder: build in the temporary folder, once per boot
        folder = Path(tempfile.gettempdir())
    source, cpu, errors = SOURCE.read_bytes(), _cpu_id(), []
    for flags in FLAG_SETS:
        key = hashlib.sha256(b"\0".join([source, cc.encode(), " ".join(flags).encode(), cpu.encode()]))
        target, lib, error = folder / f"kernels-{key.hexdigest()[:16]}.so", None, None
        for _ in range(2):  # a file in the cache that does not load (damaged) is built again, once
            error = None if target.exists() else _build(cc, flags, target)
            if error is not None:
                break
            try:
                # torch is imported, so an OpenMP build shares torch's OpenMP runtime (and its thread count).
                lib = ctypes.CDLL(str(target))
                break
            except OSError as e:
                error = f"loading {target}: {e}"
                target.unlink(missing_ok=True)
        if lib is None:
            errors.append(f"{cc} {' '.join(flags)}: {error}")
            continue
        # Without argtypes, ctypes would pass Python ints as 32-bit C ints.
        pointer, int64 = ctypes.c_void_p, ctypes.c_int64
        lib.matvec_f32.argtypes = [pointer] + [pointer, int64] * 3 + [pointer, int64, int64]
        lib.matvec_bf16.argtypes = lib.matvec_f32.argtypes
        lib.matvec_int8.argtypes = [pointer] + [pointer, pointer, int64] * 3 + [pointer, int64, int64]
        lib.attend_f32.argtypes = [pointer] * 5 + [int64] * 5 + [ctypes.c_float]
        lib.rms_norm_f32.argtypes = [pointer] * 3 + [int64] * 2 + [ctypes.c_float]
        for fn in ("matvec_f32", "matvec_bf16", "matvec_int8", "attend_f32", "rms_norm_f32"):
            getattr(lib, fn).restype = None
        return lib
    log.warning("compiling %s failed, decoding on CPU uses torch's slower products: %s", SOURCE.name, "; ".join(errors))
    return None


def available() -> bool:
    """Whether the kernel is compiled and loaded (compiling it on the first call)."""
    global _lib, _tried
    if not _tried:
        _tried = True
        _lib = _compile()
    return _lib is not None


def _ready() -> bool:
    """Whether the kernels are loaded, building them on the first call."""
    return _lib is not None or (not _tried and available())


_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.int8)


def usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether matvec(x, w) can run: x (M <= MAX_ROWS, K) fp32 and w (N, K) fp32/bf16/int8, on a CPU, no autograd."""
    # Cheapest tests first: this runs before every linear of every decode step.
    return (x.dtype == torch.float32 and x.ndim == 2 and 0 < x.shape[0] <= MAX_ROWS
            and w.dtype in _WEIGHT_DTYPES and x.device.type == "cpu" and w.device.type == "cpu"
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)) and _ready())


def matvec(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) fp32 @ w (N, K)^T -> (M, N) fp32; for int8 w, times scales (N,) fp32, one per row of w.

    Call only where usable(x, w) holds. Inputs that are not contiguous are copied first.
    """
    return stacked(x, [(w, scales)])


def stacked(x: torch.Tensor, weights: list[tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
    """x (M, K) @ [w0; w1; ...]^T -> (M, N0 + N1 + ...): up to three products of the same x side by side, in
    one call and one pass over the weights. weights: (w, scales) pairs of one dtype, scales None unless int8."""
    if not _ready():
        raise RuntimeError("mistral.kernels could not be built (see the warning logged); check usable() first")
    assert 1 <= len(weights) <= 3, f"1 to 3 weight matrices, got {len(weights)}"
    M, K = x.shape
    x, dtype = x.contiguous(), weights[0][0].dtype
    int8 = dtype == torch.int8
    kept, args = [x], []  # kept: the tensors whose pointers are passed, alive until the call returns
    for w, scales in weights:
        assert w.shape[1] == K and w.dtype == dtype and (scales is not None) == int8, \
            f"x {tuple(x.shape)}, w {w.dtype} {tuple(w.shape)}: weights of one dtype and x's K; scales with int8 only"
        kept.append(w := w.contiguous())
        if int8:
            assert scales.shape == w.shape[:1] and scales.dtype == torch.float32, f"int8 scales: {scales.dtype} {scales.shape}"
            kept.append(scales := scales.contiguous())
            args += [w.data_ptr(), scales.data_ptr(), w.shape[0]]
        else:
            args += [w.data_ptr(), w.shape[0]]
    args += [0] * ((3 if int8 else 2) * (3 - len(weights)))  # absent matrices: no pointer, no rows
    y = torch.empty(M, sum(w.shape[0] for w, _ in weights))
    fn = _lib.matvec_int8 if int8 else _lib.matvec_f32 if dtype == torch.float32 else _lib.matvec_bf16
    fn(x.data_ptr(), *args, y.data_ptr(), M, K)
    return y


def _plain(*ts: torch.Tensor) -> bool:
    """fp32 on a CPU, outside autograd: what attend and rms_norm take."""
    return (all(t.dtype == torch.float32 and t.device.type == "cpu" for t in ts)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in ts)) and _ready())


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor | None:
    """Decode attention: q (B, H, D), k and v (B, Hkv, P, D) cache rows, lengths (B,) int64 valid slots
    per row (each >= 1), -> (B, H, D): softmax(q k^T / sqrt(D)) v over each row's first lengths[b] slots.
    None where the kernel does not apply (not fp32 on a CPU, or not built)."""
    if not _plain(q, k, v):
        return None
    (B, H, D), (_, Hkv, P, _) = q.shape, k.shape
    assert k.shape == v.shape == (B, Hkv, P, D) and H % Hkv == 0 and lengths.shape == (B,) and lengths.dtype == torch.int64, \
        (q.shape, k.shape, lengths.dtype, lengths.shape)
    q, k, v, lengths = q.contiguous(), k.contiguous(), v.contiguous(), lengths.contiguous()
    out = torch.empty(B, H, D)
    _lib.attend_f32(q.data_ptr(), k.data_ptr(), v.data_ptr(), lengths.data_ptr(), out.data_ptr(), B, H, Hkv, P, D, D ** -0.5)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """x (M, K) / sqrt(mean(x^2) + eps) * weight (K,), for up to MAX_ROWS rows; None where the kernel does not apply."""
    if not (x.ndim == 2 and x.shape[0] <= MAX_ROWS and _plain(x, weight)):
        return None
    assert weight.shape == x.shape[1:], f"x {tuple(x.shape)} and weight {tuple(weight.shape)}"
    x, weight = x.contiguous(), weight.contiguous()
    y = torch.empty_like(x)
    _lib.rms_norm_f32(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.shape[0], x.shape[1], eps)
    return y
