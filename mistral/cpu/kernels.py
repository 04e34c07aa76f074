"""The ctypes binding of kernels.c: few-row products, whole decode steps of transformer blocks, RMSNorm, and greedy
picking (argmax and its log-softmax). mistral/cpu/decoder.py is what uses them.

The file is compiled on first use with the system's C compiler (`$CC`, else `cc`), for this CPU (-march=native), in
about a second. The library is code this process will run, so it is only ever loaded from a folder that this user
alone can write: ~/.cache/mistral (or $XDG_CACHE_HOME/mistral) when it, and the folder holding it, belong to this user
and are writable by nobody else, under a name that hashes the source, the flags and the CPU; otherwise a fresh private
temporary folder, built again in each process. Without a compiler, `load()` gives None, one warning says why, and the
model runs on torch's own operations.

Letters: M rows of x (tokens), N rows of w (output features), K input features.
"""
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

from mistral import ggml
from mistral.quantize import INT8_ROWS, int4_shapes

log = logging.getLogger(__name__)

MAX_ROWS = 16  # beyond this, a matrix-matrix product (MKL) is faster: the weights are no longer the cost
# ... except for int8 and int4 weights, which multiply x rounded to int8 per group (kernels.c, 1b): int4 any number of
# rows, int8 up to INT8_ROWS, where the format stops rounding x (mistral/quantize.py, which measured it).
SOURCE = Path(__file__).parent / "kernels.c"
# -fopenmp first; a compiler without OpenMP (Apple's clang) still gets a single-threaded kernel.
FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-march=native"], ["-O3"])
# The weight dtypes taken: enum wtype of kernels.c. uint8 is 4-bit weights packed two a byte (mistral/quantize.py).
_TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2, torch.uint8: 3}


def _cpu_id() -> str:
    """What -march=native depends on: the model and feature flags of this CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return platform.processor() + platform.machine()


def _ours_alone(path: Path) -> bool:
    """path belongs to this user and nobody else may write to it: what another local user cannot plant a file in."""
    try:
        st = path.lstat()
    except OSError:
        return False
    return not stat.S_ISLNK(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _cache_dir() -> Path | None:
    """~/.cache/mistral, made if need be, when it and its parent are ours alone; else None."""
    folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mistral"
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
        return None
    return folder if _ours_alone(folder) and _ours_alone(folder.parent) and os.access(folder, os.W_OK) else None


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


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    # Without argtypes, ctypes would pass Python ints as 32-bit C ints.
    ptr, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    lib.matvec.argtypes = [ctypes.c_int] + [ptr] * 5 + [i64] * 2
    lib.blocks.argtypes = [ctypes.c_int, i64] + [ptr] * 2 + [f32] + [ptr] * 3 + [i64] * 2 + [ptr] * 9 + [i64] * 6
    lib.rms_norm_f32.argtypes = [ptr] * 3 + [i64] * 2 + [f32]
    lib.greedy.argtypes = [ptr, i64, i64, ptr, ptr]
    lib.block_dequantize.argtypes = [ctypes.c_int, ptr, ptr, i64, i64, ctypes.c_int]
    lib.int4_dequantize.argtypes = [ptr, ptr, ptr, i64, i64, ctypes.c_int]
    for fn in ("matvec", "blocks", "rms_norm_f32", "greedy", "block_dequantize", "int4_dequantize"):
        getattr(lib, fn).restype = None
    return lib


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled kernels, built on the first call of the process; None (and one warning) where they cannot be."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.warning("no C compiler found (set CC): decoding on CPU uses torch's slower operations")
        return None
    cache, private = _cache_dir(), None
    if cache is None:  # nowhere safe to keep a build: one of this process's own, in a folder only it knows
        cache = private = Path(tempfile.mkdtemp(prefix="mistral-kernels-"))
    try:
        source, cpu, errors = SOURCE.read_bytes(), _cpu_id(), []
        for flags in FLAG_SETS:
            key = hashlib.sha256(b"\0".join([source, cc.encode(), " ".join(flags).encode(), cpu.encode()]))
            target, lib, error = cache / f"kernels-{key.hexdigest()[:16]}.so", None, None
            for _ in range(2):  # a file in the cache that does not load (damaged) is built again, once
                if target.exists() and not _ours_alone(target):
                    target.unlink()  # in our own folder, but not as we would have written it: never load it
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
            if lib is not None:
                return _bind(lib)
            errors.append(f"{cc} {' '.join(flags)}: {error}")
        log.warning("compiling %s failed, decoding on CPU uses torch's slower operations: %s", SOURCE.name,
                    "; ".join(errors))
        return None
    finally:
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)  # a loaded library stays mapped


def available() -> bool:
    """Whether the kernels are compiled and loaded (compiling them on the first call)."""
    return load() is not None


def takes_rows(x: torch.Tensor, most: int | None = MAX_ROWS) -> bool:
    """x (M, K) fp32 on a CPU, 0 < M <= most (None: any M), outside autograd, and the kernels built."""
    return (x.dtype == torch.float32 and x.ndim == 2 and 0 < x.shape[0] <= (most or x.shape[0])
            and x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad) and available())


class Prepared(NamedTuple):
    """Weight matrices as the C side takes them: one type, and pointer arrays to each matrix and its scales."""
    type: int  # enum wtype
    ws: ctypes.Array
    ss: ctypes.Array  # NULL unless int8 or int4
    kept: list  # the tensors behind the pointers: alive as long as this is
    rows: tuple[int, ...]  # N of each matrix
    needs_grad: bool


GG = 4  # enum wtype of llama.cpp's block formats (kernels.c, 1c): w (N, row_bytes) uint8 with its type number


def _format(w: torch.Tensor, s: torch.Tensor | None) -> int | None:
    """The enum wtype of a (w, scales) pair, None where the kernels do not take it. scales: None for fp32 or bf16 w;
    (N,) fp32 for int8 w; (N, G) fp16 for 4-bit w (N, G * 16); a GGML type number (1,) fp32 for w (N, row_bytes) of a
    block format (mistral/ggml.py), whose rows must be whole super-blocks of 256 weights."""
    if w.ndim != 2 or w.device.type != "cpu" or (s is not None and s.device.type != "cpu"):
        return None
    if s is None:
        return _TYPES.get(w.dtype) if w.is_floating_point() else None
    if w.dtype == torch.int8:
        return _TYPES[w.dtype] if s.dtype == torch.float32 and s.shape == w.shape[:1] else None
    if w.dtype != torch.uint8:
        return None
    if s.dtype == torch.float16:
        packed, scales = int4_shapes(w.shape[0], 2 * w.shape[1])
        return _TYPES[w.dtype] if w.shape == packed and s.shape == scales else None
    if s.dtype == torch.float32 and s.shape == (1,) and int(s) in ggml.BLOCKS:
        _, per_block, nbytes = ggml.BLOCKS[int(s)]
        K = w.shape[1] // nbytes * per_block
        return GG if int(s) != ggml.TYPES["Q4_0"] and K % 256 == 0 and w.shape[1] == ggml.row_bytes(int(s), K) else None
    return None


def prepare(weights: list[tuple[torch.Tensor, torch.Tensor | None]], slots: int | None = None) -> Prepared | None:
    """(w, scales) pairs for the kernels, all of one format (see _format), on a CPU; None where they do not qualify.
    The pointer arrays are `slots` long (default: as many as pairs, the rest NULL). Pointers stay valid while no tensor
    is replaced; values changed in place are read anew."""
    if not weights:
        return None
    kinds = {_format(w, s) for w, s in weights}
    if len(kinds) != 1 or None in kinds:
        return None
    slots = len(weights) if slots is None else slots
    kept, ws, ss = [], (ctypes.c_void_p * slots)(), (ctypes.c_void_p * slots)()
    for j, (w, scales) in enumerate(weights):
        kept.append(w := w.contiguous())
        ws[j] = w.data_ptr()
        if scales is not None:
            kept.append(scales := scales.contiguous())
            ss[j] = scales.data_ptr()
    return Prepared(kinds.pop(), ws, ss, kept, tuple(w.shape[0] for w, _ in weights),
                    any(t.requires_grad for t in kept))


def stored_width(w: torch.Tensor, s: torch.Tensor | None, K: int) -> int:
    """The columns of a stored w of K input features: K, 16 bytes per group of 32 for 4-bit weights, or a block
    format's bytes per row."""
    if w.dtype == torch.uint8 and s is not None and s.dtype == torch.float32:
        return ggml.row_bytes(int(s), K)
    return int4_shapes(1, K)[0][1] if w.dtype == torch.uint8 else K


def usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether matvec(x, w) can run: x (M, K) fp32 and w fp32/bf16/int8/int4, on a CPU, no autograd; M <= MAX_ROWS
    (int8: INT8_ROWS; int4: any M)."""
    most = {torch.uint8: None, torch.int8: INT8_ROWS}.get(w.dtype, MAX_ROWS)
    return takes_rows(x, most) and w.dtype in _TYPES and w.device.type == "cpu" and not (
        torch.is_grad_enabled() and w.requires_grad)


def stacked(x: torch.Tensor, weights: Prepared) -> torch.Tensor:
    """x (M, K) @ [w0; w1; w2]^T -> (M, N0 + N1 + N2): up to three products of the same x side by side, in one call
    and one pass over the weights. Call where takes_rows(x) holds."""
    assert 1 <= len(weights.rows) <= 3 and len(weights.ws) == 3, weights.rows
    x = x.contiguous()
    y = torch.empty(x.shape[0], sum(weights.rows))
    load().matvec(weights.type, x.data_ptr(), weights.ws, weights.ss, (ctypes.c_int64 * 3)(*weights.rows),
                  y.data_ptr(), *x.shape)
    return y


def matvec(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) fp32 @ w (N, K)^T -> (M, N) fp32; for int8 w, times scales (N,) fp32, one per row of w; for 4-bit w
    (stored (N, G * 16), see prepare); for a block format, w its rows of blocks and scales its type (see _format); for
    all three, with x rounded to int8 per group (kernels.c, 1b and 1c).
    Call where usable(x, w) holds. Inputs that are not contiguous are copied first."""
    assert w.shape[1] == stored_width(w, scales, x.shape[1]), f"x {tuple(x.shape)}, w {tuple(w.shape)}"
    return stacked(x, prepare([(w, scales)], 3))


def block_dequantize(w: torch.Tensor, kind: int, out: torch.Tensor) -> torch.Tensor:
    """Rows of blocks w (N, row_bytes) of a block format (see _format) as weights, into out (N, K) fp32 or bf16: what
    mistral/ggml.py's dequantize gives, up to an ulp, then torch's rounding to bf16 (kernels.c 1c). Returns out."""
    assert w.is_contiguous() and out.is_contiguous() and out.dtype in (torch.float32, torch.bfloat16), out.dtype
    assert out.shape == (w.shape[0], ggml.row_weights(kind, w.shape[1])), (tuple(w.shape), tuple(out.shape))
    load().block_dequantize(kind, w.data_ptr(), out.data_ptr(), *out.shape, out.dtype == torch.bfloat16)
    return out


def int4_dequantize(packed: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """4-bit rows (packed (N, G * 16), scales (N, G) fp16: mistral/quantize.py's int4_rows) as weights, into out (N, K)
    fp32 or bf16: what int4_dequantized gives, then torch's rounding to bf16 (kernels.c 1c). Returns out."""
    assert packed.is_contiguous() and scales.is_contiguous() and out.is_contiguous(), "contiguous tensors only"
    assert out.dtype in (torch.float32, torch.bfloat16) and (packed.shape, scales.shape) == int4_shapes(*out.shape), (
        tuple(packed.shape), tuple(scales.shape), tuple(out.shape), out.dtype)
    bf16 = out.dtype == torch.bfloat16
    load().int4_dequantize(packed.data_ptr(), scales.data_ptr(), out.data_ptr(), *out.shape, bf16)
    return out


class KernelLayer(NamedTuple):
    """A transformer block as blocks() takes it."""
    norms: tuple[torch.Tensor, torch.Tensor]  # the weights of attention_norm and ffn_norm
    weights: list  # (w, scales) of wq, wk, wv, wo, then w1, w3, w2 of each expert: one for a dense FFN
    router: torch.Tensor | None = None  # (E, dim): a mixture of the E experts, else None
    top_k: int = 1  # experts per token


class BlocksPlan(NamedTuple):
    """What blocks() needs of a model's layers, gathered and checked once (plan_blocks)."""
    weights: Prepared  # (4 + 3 E) L matrices: wq, wk, wv, wo, then w1, w3, w2 of each expert, for each layer
    norms: ctypes.Array  # 2 L pointers: attention_norm and ffn_norm of each layer
    routers: ctypes.Array | None  # L pointers to the routers (E, dim) of a mixture of experts; None for dense FFNs
    kept: list  # the norms and routers behind the pointers
    layers: int
    dim: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    experts: int  # E: 1 for dense FFNs
    top_k: int  # K, experts per token
    eps: float
    needs_grad: bool  # a weight requires grad: decline where autograd is on


def _attention_shapes(dim: int, n_heads: int, n_kv_heads: int, head_dim: int) -> tuple:
    """The shapes of wq, wk, wv, wo."""
    return ((n_heads * head_dim, dim), (n_kv_heads * head_dim, dim), (n_kv_heads * head_dim, dim),
            (dim, n_heads * head_dim))


def plan_blocks(layers: list[KernelLayer], eps: float, n_heads: int, n_kv_heads: int,
                head_dim: int) -> BlocksPlan | None:
    """The plan for blocks() of these layers (KernelLayer, or tuples of its fields), all dense or all mixtures of as
    many experts. None where the kernels do not take them (see prepare; the norms and routers fp32 on a CPU). The plan
    keeps pointers into the tensors: it is valid while none of them is replaced (an in-place change is fine; the
    kernel reads the values at each call)."""
    if not layers or not available():
        return None
    layers = [KernelLayer(*layer) for layer in layers]
    first = layers[0]
    if len(first.weights) < 7:
        return None
    dim, hidden, top_k = first.norms[0].shape[0], first.weights[4][0].shape[0], first.top_k
    experts = 1 if first.router is None else first.router.shape[0]
    if not all((layer.router is None) == (first.router is None) and layer.top_k == top_k
               and len(layer.weights) == 4 + 3 * experts for layer in layers) or not 1 <= top_k <= experts:
        return None
    ffn = ((hidden, dim), (hidden, dim), (dim, hidden))  # w1, w3, w2 of each expert
    shapes = _attention_shapes(dim, n_heads, n_kv_heads, head_dim) + ffn * experts
    weights = [pair for layer in layers for pair in layer.weights]
    norms = [n.contiguous() for layer in layers for n in layer.norms]
    routers = [layer.router.contiguous() for layer in layers if layer.router is not None]
    if not all(n.dtype == torch.float32 and n.device.type == "cpu" and n.shape == (dim,) for n in norms):
        return None
    if not all(r.dtype == torch.float32 and r.device.type == "cpu" and r.shape == (experts, dim) for r in routers):
        return None
    if any(tuple(w.shape) != (n, stored_width(w, s, k)) for (w, s), (n, k) in zip(weights, shapes * len(layers))):
        return None
    prepared = prepare(weights)
    if prepared is None:
        return None
    needs_grad = prepared.needs_grad or any(t.requires_grad for t in norms + routers)
    return BlocksPlan(prepared, (ctypes.c_void_p * len(norms))(*[n.data_ptr() for n in norms]),
                      (ctypes.c_void_p * len(routers))(*[r.data_ptr() for r in routers]) if routers else None,
                      norms + routers, len(layers), dim, hidden, n_heads, n_kv_heads, head_dim, experts, top_k, eps,
                      needs_grad)


def takes_cache(cache_k: torch.Tensor, cache_v: torch.Tensor) -> bool:
    """The caches blocks() writes (a layer's, or all of them): fp32 on a CPU, rows as stored."""
    return (cache_k.dtype == torch.float32 and cache_k.device.type == "cpu" and cache_k.is_contiguous()
            and cache_v.dtype == cache_k.dtype and cache_v.shape == cache_k.shape and cache_v.is_contiguous())


def blocks(x: torch.Tensor, plan: BlocksPlan, cache_k: torch.Tensor | list[torch.Tensor],
           cache_v: torch.Tensor | list[torch.Tensor], step: torch.Tensor | list[torch.Tensor],
           inv_freq: torch.Tensor, windows: list[int] | None = None) -> torch.Tensor:
    """Transformer blocks at decode, one after another, in one call: for the plan's layers, each
        h = x + attention(rms_norm(x) * attention_norm);  x = h + ffn(rms_norm(h) * ffn_norm)
    and the last x is returned. x (M, dim) holds one new token per row. step (4, M) int64: each token's cache row, slot,
    valid length and position (CacheMetadata.step): its rotated key and its value go into its slot, then it attends to
    its row's first `length` slots. ffn is a SwiGLU feed-forward, or a mixture of experts computed as MoeLayer does
    (each token's top_k experts by router logit, weighted by the softmax of those logits, summed in increasing expert
    order). cache_k, cache_v (L, B, Hkv, N, D), the layers' caches in order, or a list of each layer's (B, Hkv, N_l,
    D) with a list of each layer's step (layers whose caches keep their own number of slots); inv_freq (D/2,) RoPE's
    frequencies, from which the kernel computes each token's rotations at its position. windows: each layer's window
    where narrower than its slots (a cache with spare slots), else 0 (None: all 0); such a layer's token attends to the
    slots of its last `window` positions only. Call where takes_rows(x), takes_cache and (with autograd on) not
    plan.needs_grad hold."""
    ks, vs = list(cache_k), list(cache_v)
    steps = step if isinstance(step, list) else [step] * len(ks)
    (M, dim), (B, Hkv, _, D), L = x.shape, ks[0].shape, len(ks)
    assert (L, dim, Hkv, D) == (plan.layers, plan.dim, plan.n_kv_heads, plan.head_dim), \
        f"the plan is for {plan.layers} layers of dim {plan.dim}, {plan.n_kv_heads} kv heads of {plan.head_dim}"
    assert len(vs) == len(steps) == L and all(k.shape == v.shape and k.shape[:2] == (B, Hkv) for k, v in zip(ks, vs))
    assert all(t.shape == (4, M) and t.dtype == torch.int64 and t.is_contiguous() for t in steps), steps[0].shape
    assert inv_freq.shape == (D // 2,) and inv_freq.dtype == torch.float32, (inv_freq.shape, inv_freq.dtype)
    H, hidden, E = plan.n_heads, plan.hidden, plan.experts
    x = x.contiguous()
    scratch = torch.empty(M * (4 * dim + (2 * H + 2 * Hkv + 1) * D + 3 * hidden + 2 * E))
    routing = torch.empty(E * (M + 1), dtype=torch.int64)
    out = torch.empty(M, dim)
    w = plan.weights

    def pointers(ts):
        return (ctypes.c_void_p * L)(*[t.data_ptr() for t in ts])

    slots = (ctypes.c_int64 * L)(*[k.shape[2] for k in ks])
    narrower = (ctypes.c_int64 * L)(*(windows or [0] * L))
    load().blocks(w.type, L, x.data_ptr(), plan.norms, plan.eps, w.ws, w.ss, plan.routers, E, plan.top_k,
                  pointers(ks), pointers(vs), pointers(steps), slots, narrower, inv_freq.data_ptr(), scratch.data_ptr(),
                  routing.data_ptr(), out.data_ptr(), M, dim, H, Hkv, D, hidden)
    return out


def _plain(*ts: torch.Tensor) -> bool:
    """fp32 on a CPU, outside autograd, and the kernels built."""
    return (all(t.dtype == torch.float32 and t.device.type == "cpu" for t in ts)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in ts)) and available())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """x (M, K) / sqrt(mean(x^2) + eps) * weight (K,), for up to MAX_ROWS rows; None where the kernel does not apply."""
    if not (x.ndim == 2 and x.shape[0] <= MAX_ROWS and _plain(x, weight)):
        return None
    assert weight.shape == x.shape[1:], f"x {tuple(x.shape)} and weight {tuple(weight.shape)}"
    x, weight = x.contiguous(), weight.contiguous()
    y = torch.empty_like(x)
    load().rms_norm_f32(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.shape[0], x.shape[1], eps)
    return y


def greedy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """logits (N, V) -> (argmax (N,) int64, its log-softmax (N,) fp32): what torch.argmax and log_softmax give (the
    first index on ties, the first NaN if any), for up to MAX_ROWS rows of fp32 on a CPU; None elsewhere."""
    if not (logits.ndim == 2 and 0 < logits.shape[0] <= MAX_ROWS and logits.shape[1] > 0 and _plain(logits)):
        return None
    logits = logits.contiguous()
    index, logprob = torch.empty(logits.shape[0], dtype=torch.int64), torch.empty(logits.shape[0])
    load().greedy(logits.data_ptr(), *logits.shape, index.data_ptr(), logprob.data_ptr())
    return index, logprob
