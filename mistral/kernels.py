"""The CPU kernels for decoding (csrc/kernels.c): few-row products, a layer's attention and FFN, whole blocks, RMSNorm,
and greedy picking (argmax and its log-softmax).

Decoding reads every weight once per token, so its speed is the speed at which the matrix-vector products
read memory. On a CPU, MKL's product reaches about half of what the cores can stream together (it barely
uses the second of two cores); `matvec` here reaches the bandwidth (see csrc/kernels.c, and bench/kernels.py).
What a decode step spends besides the products is dispatch: at one token, each torch operation (a RoPE
multiply, a cache write, SDPA, silu) costs tens of microseconds in calls and temporaries for under a
microsecond of arithmetic, and a layer has dozens. `attention` and `feed_forward` do all of a layer's
attention, and all of its FFN, in one call each, and `blocks` all the blocks of a step, dense or mixtures of
experts; the model's torch code stays their definition.

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
from typing import NamedTuple

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
        ptr, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
        lib.matvec.argtypes = [ctypes.c_int] + [ptr] * 5 + [i64] * 2
        lib.attention.argtypes = [ctypes.c_int] + [ptr] * 10 + [i64] * 6
        lib.feed_forward.argtypes = [ctypes.c_int] + [ptr] * 6 + [i64] * 3
        lib.blocks.argtypes = [ctypes.c_int, i64] + [ptr] * 2 + [f32] + [ptr] * 3 + [i64] * 2 + [ptr] * 7 + [i64] * 8
        lib.rms_norm_f32.argtypes = [ptr] * 3 + [i64] * 2 + [f32]
        lib.greedy.argtypes = [ptr, i64, i64, ptr, ptr]
        for fn in ("matvec", "attention", "feed_forward", "blocks", "rms_norm_f32", "greedy"):
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


_TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}  # the weight dtypes taken: enum wtype of csrc/kernels.c


def usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether matvec(x, w) can run: x (M <= MAX_ROWS, K) fp32 and w (N, K) fp32/bf16/int8, on a CPU, no autograd."""
    return takes_rows(x) and w.dtype in _TYPES and w.device.type == "cpu" and _grad_free(x, [(w, None)])


def matvec(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) fp32 @ w (N, K)^T -> (M, N) fp32; for int8 w, times scales (N,) fp32, one per row of w.

    Call only where usable(x, w) holds. Inputs that are not contiguous are copied first.
    """
    return stacked(x, [(w, scales)])


_prepared: dict = {}  # what _prepare built, by everything it depends on


def _prepare(weights: list[tuple[torch.Tensor, torch.Tensor | None]], slots: int, shapes: tuple | None = None):
    """The C side of (w, scales) pairs: (type, w pointers, scales pointers, kept), the pointer arrays `slots` long
    (absent matrices NULL), or None where the kernels do not take the weights: fp32, bf16 or int8, all of one dtype,
    on a CPU, int8 with fp32 scales (N,). Asserts that w's shapes are `shapes`, when given. kept holds contiguous copies
    of weights that were not: keep it until the call returns.

    A decode step asks for the same weights at every layer of every step, and checking them costs more than a
    small product, so the answer is kept, keyed by what it depends on: each tensor's address, dtype, shape and
    contiguity (an answer with copies is not kept). Autograd is checked by the caller, at every call. A list that
    takes attributes (KeptWeights: one whose tensors its owner promises not to replace) keeps its answer itself, and
    skips even building that key."""
    if (own := getattr(weights, "prepared", None)) is not None and own[0] == (slots, shapes):
        return own[1]
    key = (slots, shapes, *[(t.data_ptr(), t.dtype, t.shape, t.is_contiguous()) if t is not None else None
                            for pair in weights for t in pair])
    if (hit := _prepared.get(key)) is None:
        hit = _prepare_new(weights, slots, shapes, key)
    if isinstance(weights, KeptWeights) and hit is not None and not hit[3]:
        weights.prepared = ((slots, shapes), hit)
    return hit


class KeptWeights(list):
    """(weight, scales) pairs whose tensors are not replaced while the list lives (see model.steady): _prepare's
    answer for them is kept on the list."""
    prepared: tuple | None = None


def _prepare_new(weights, slots: int, shapes: tuple | None, key: tuple):
    """_prepare's answer the first time: checked, built, and kept under key."""
    dtype = weights[0][0].dtype
    int8 = dtype == torch.int8
    if not (dtype in _TYPES and all(w.dtype == dtype and w.ndim == 2 and w.device.type == "cpu" for w, _ in weights)
            and all((s is not None) == int8 for _, s in weights)
            and all(s.dtype == torch.float32 and s.shape == w.shape[:1] and s.device.type == "cpu"
                    for w, s in weights if s is not None)):
        return None
    assert shapes is None or tuple(tuple(w.shape) for w, _ in weights) == shapes, (shapes, [w.shape for w, _ in weights])
    kept, ws, ss = [], (ctypes.c_void_p * slots)(), (ctypes.c_void_p * slots)()
    for j, (w, scales) in enumerate(weights):
        kept.append(w := w.contiguous())
        ws[j] = w.data_ptr()
        if int8:
            kept.append(scales := scales.contiguous())
            ss[j] = scales.data_ptr()
    copied = any(k is not t for k, t in zip(kept, (t for pair in weights for t in pair if t is not None)))
    prepared = (_TYPES[dtype], ws, ss, kept if copied else [])
    if not copied:
        if len(_prepared) >= 4096:  # weights come and go (models loaded, converted, freed): start again
            _prepared.clear()
        _prepared[key] = prepared
    return prepared


def takes_rows(x: torch.Tensor) -> bool:
    """x (M <= MAX_ROWS, K) fp32 on a CPU, and the kernels built: the first test of every kernel, cheap enough to make
    before gathering its weights."""
    return (x.dtype == torch.float32 and x.ndim == 2 and 0 < x.shape[0] <= MAX_ROWS and x.device.type == "cpu"
            and _ready())


def _grad_free(x: torch.Tensor, weights) -> bool:
    """Nothing here needs autograd (the kernels keep no graph)."""
    return not (torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w, _ in weights)))


def _ready_args(x: torch.Tensor, weights, slots: int, shapes: tuple | None = None):
    """_prepare's answer where the kernels take x and these weights, else None."""
    if not (takes_rows(x) and _grad_free(x, weights)):
        return None
    return _prepare(weights, slots, shapes)


def stacked(x: torch.Tensor, weights: list[tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
    """x (M, K) @ [w0; w1; ...]^T -> (M, N0 + N1 + ...): up to three products of the same x side by side, in
    one call and one pass over the weights. weights: (w, scales) pairs of one dtype, scales None unless int8."""
    if not _ready():
        raise RuntimeError("mistral.kernels could not be built (see the warning logged); check usable() first")
    assert 1 <= len(weights) <= 3, f"1 to 3 weight matrices, got {len(weights)}"
    assert all(w.shape[1] == x.shape[1] for w, _ in weights), f"x {tuple(x.shape)}, w {[tuple(w.shape) for w, _ in weights]}"
    prepared = _prepare(weights, 3)
    assert prepared is not None, f"weights of one dtype, scales with int8 only: {[(w.dtype, s is not None) for w, s in weights]}"
    t, ws, ss, kept = prepared  # kept: alive until the call returns
    x = x.contiguous()
    rows = [w.shape[0] for w, _ in weights]
    y = torch.empty(x.shape[0], sum(rows))
    _lib.matvec(t, x.data_ptr(), ws, ss, (ctypes.c_int64 * 3)(*rows), y.data_ptr(), *x.shape)
    return y


def usable_together(x: torch.Tensor, weights: list[tuple[torch.Tensor, torch.Tensor | None]]) -> bool:
    """Whether stacked takes these: usable() for every weight, all of one dtype."""
    return _ready_args(x, weights, 3) is not None


def _attention_shapes(dim: int, n_heads: int, n_kv_heads: int, head_dim: int) -> tuple:
    """The shapes of wq, wk, wv, wo."""
    return ((n_heads * head_dim, dim), (n_kv_heads * head_dim, dim), (n_kv_heads * head_dim, dim), (dim, n_heads * head_dim))


def _cache_ok(x, cache_k, cache_v, step, rope, rope_shape) -> bool:
    """Whether the kernels take this cache (fp32 on a CPU); asserts that the step's arguments fit it: step (4, M)
    int64, rope fp32 of rope_shape, both contiguous."""
    if not (cache_k.dtype == torch.float32 and cache_k.device.type == "cpu"):
        return False
    assert cache_v.dtype == cache_k.dtype and cache_v.shape == cache_k.shape, "cache_k and cache_v alike"
    assert cache_k.is_contiguous() and cache_v.is_contiguous(), "cache rows as stored"
    assert step.shape == (4, x.shape[0]) and step.dtype == torch.int64, (step.shape, step.dtype)
    assert rope.shape == rope_shape and rope.dtype == torch.float32, (rope.shape, rope.dtype)
    assert step.is_contiguous() and rope.is_contiguous(), "step and rope contiguous"
    return True


def attention(x: torch.Tensor, weights: list[tuple[torch.Tensor, torch.Tensor | None]], cache_k: torch.Tensor,
              cache_v: torch.Tensor, step: torch.Tensor, rope: torch.Tensor, n_heads: int) -> torch.Tensor | None:
    """A layer's attention at decode, in one call: x (M, dim) the normalized new tokens -> (M, dim), wo's output.
    step (4, M) int64 holds each token's cache row, slot, valid length and position (CacheMetadata.step): the
    token's rotated key and its value go into its slot, then it attends to its row's first `length` slots.
    weights: (w, scales) of wq, wk, wv, wo; cache_k, cache_v (B, Hkv, W, D) fp32, this layer's; rope (M, D/2, 2)
    cos and sin (torch.view_as_real of freqs_cis). None where the kernels do not apply (see usable)."""
    (M, dim), (_, Hkv, W, D) = x.shape, cache_k.shape
    prepared = _ready_args(x, weights, 4, _attention_shapes(dim, n_heads, Hkv, D))
    if prepared is None or not _cache_ok(x, cache_k, cache_v, step, rope, (M, D // 2, 2)):
        return None
    t, ws, ss, kept = prepared  # kept: alive until the call returns
    x = x.contiguous()
    qkv, heads = torch.empty(M * (2 * n_heads + 2 * Hkv) * D).split([M * (n_heads + 2 * Hkv) * D, M * n_heads * D])
    out = torch.empty(M, dim)
    _lib.attention(t, x.data_ptr(), ws, ss, cache_k.data_ptr(), cache_v.data_ptr(), step.data_ptr(), rope.data_ptr(),
                   qkv.data_ptr(), heads.data_ptr(), out.data_ptr(), M, dim, n_heads, Hkv, D, W)
    return out


def feed_forward(x: torch.Tensor, weights: list[tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor | None:
    """w2 (silu(w1 x) * w3 x) for x (M, dim), in one call; weights: (w, scales) of w1, w3, w2. None where the
    kernels do not apply (see usable)."""
    (M, dim), hidden = x.shape, weights[0][0].shape[0]
    prepared = _ready_args(x, weights, 3, ((hidden, dim), (hidden, dim), (dim, hidden)))
    if prepared is None:
        return None
    t, ws, ss, kept = prepared  # kept: alive until the call returns
    x = x.contiguous()
    gate_up, act = torch.empty(M * 3 * hidden).split([M * 2 * hidden, M * hidden])
    out = torch.empty(M, dim)
    _lib.feed_forward(t, x.data_ptr(), ws, ss, gate_up.data_ptr(), act.data_ptr(), out.data_ptr(), M, dim, hidden)
    return out


class KernelLayer(NamedTuple):
    """A transformer block as kernels.blocks takes it (TransformerBlock.kernel_layer)."""
    norms: tuple[torch.Tensor, torch.Tensor]  # the weights of attention_norm and ffn_norm
    weights: list  # (w, scales) of wq, wk, wv, wo, then w1, w3, w2 of each expert: one for a dense FFN
    router: torch.Tensor | None = None  # (E, dim): a mixture of the E experts, else None
    top_k: int = 1  # experts per token


class BlocksPlan(NamedTuple):
    """What kernels.blocks needs of a model's layers, gathered and checked once (plan_blocks)."""
    type: int  # enum wtype
    ws: ctypes.Array  # (4 + 3 E) L pointers: wq, wk, wv, wo, then w1, w3, w2 of each expert, for each layer
    ss: ctypes.Array  # their scales (int8), else NULL
    norms: ctypes.Array  # 2 L pointers: attention_norm and ffn_norm of each layer
    routers: ctypes.Array | None  # L pointers to the routers (E, dim) of a mixture of experts; None for dense FFNs
    kept: list  # the tensors behind the pointers, alive as long as the plan
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


def plan_blocks(layers: list[KernelLayer], eps: float, n_heads: int, n_kv_heads: int,
                head_dim: int) -> BlocksPlan | None:
    """The plan for kernels.blocks of these layers (KernelLayer, or tuples of its fields), all dense or all mixtures of
    as many experts. None where the kernels do not take them (see usable; the norms and routers fp32 on a CPU). The
    plan keeps pointers into the tensors: it is valid while none of them is replaced (an in-place change is fine; the
    kernel reads the values at each call)."""
    if not layers or not _ready():
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
    ffn_shapes = ((hidden, dim), (hidden, dim), (dim, hidden))
    shapes = _attention_shapes(dim, n_heads, n_kv_heads, head_dim) + ffn_shapes * experts
    weights = [wp for layer in layers for wp in layer.weights]
    norms = [n.contiguous() for layer in layers for n in layer.norms]
    routers = [layer.router.contiguous() for layer in layers if layer.router is not None]
    if not all(n.dtype == torch.float32 and n.device.type == "cpu" and n.shape == (dim,) for n in norms):
        return None
    if not all(r.dtype == torch.float32 and r.device.type == "cpu" and r.shape == (experts, dim) for r in routers):
        return None
    if any(tuple(w.shape) != shape for (w, _), shape in zip(weights, shapes * len(layers))):
        return None
    prepared = _prepare(weights, len(shapes) * len(layers))
    if prepared is None:
        return None
    t, ws, ss, kept = prepared
    needs_grad = any(x.requires_grad for x in [w for w, _ in weights] + norms + routers)
    return BlocksPlan(t, ws, ss, (ctypes.c_void_p * len(norms))(*[n.data_ptr() for n in norms]),
                      (ctypes.c_void_p * len(routers))(*[r.data_ptr() for r in routers]) if routers else None,
                      [*kept, *norms, *routers, *(t for pair in weights for t in pair if t is not None)], len(layers),
                      dim, hidden, n_heads, n_kv_heads, head_dim, experts, top_k, eps, needs_grad)


def blocks(x: torch.Tensor, plan: BlocksPlan, cache_k: torch.Tensor, cache_v: torch.Tensor, step: torch.Tensor,
           inv_freq: torch.Tensor) -> torch.Tensor | None:
    """Transformer blocks at decode, one after another, in one call: for the plan's layers, each
        h = x + attention(rms_norm(x) * attention_norm);  x = h + ffn(rms_norm(h) * ffn_norm)
    and the last x is returned. ffn is a SwiGLU feed-forward, or a mixture of experts computed as MoeLayer does (each
    token's top_k experts by router logit, weighted by the softmax of those logits). cache_k, cache_v (L, B, Hkv, W,
    D), the layers' caches in order; inv_freq (D/2,) RoPE's frequencies (rope.inverse_frequencies), from which the
    kernel computes each token's rotations at its position. The rest as for attention, which is one step of each.
    None where the kernels do not apply (see usable)."""
    if not takes_rows(x) or (torch.is_grad_enabled() and (plan.needs_grad or x.requires_grad)):
        return None
    if not _cache_ok(x, cache_k, cache_v, step, inv_freq, (plan.head_dim // 2,)):
        return None
    (M, dim), (L, B, Hkv, W, D) = x.shape, cache_k.shape
    assert (L, dim, Hkv, D) == (plan.layers, plan.dim, plan.n_kv_heads, plan.head_dim), \
        f"the plan is for {plan.layers} layers of dim {plan.dim}, {plan.n_kv_heads} kv heads of {plan.head_dim}"
    H, hidden, E = plan.n_heads, plan.hidden, plan.experts
    x = x.contiguous()
    scratch = torch.empty(M * (4 * dim + (2 * H + 2 * Hkv + 1) * D + 3 * hidden + 2 * E))
    routing = torch.empty(E * (M + 1), dtype=torch.int64)
    out = torch.empty(M, dim)
    _lib.blocks(plan.type, L, x.data_ptr(), plan.norms, plan.eps, plan.ws, plan.ss, plan.routers, E, plan.top_k,
                cache_k.data_ptr(), cache_v.data_ptr(), step.data_ptr(), inv_freq.data_ptr(), scratch.data_ptr(),
                routing.data_ptr(), out.data_ptr(), M, dim, H, Hkv, D, B, W, hidden)
    return out


def _plain(*ts: torch.Tensor) -> bool:
    """fp32 on a CPU, outside autograd: what rms_norm takes."""
    return (all(t.dtype == torch.float32 and t.device.type == "cpu" for t in ts)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in ts)) and _ready())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """x (M, K) / sqrt(mean(x^2) + eps) * weight (K,), for up to MAX_ROWS rows; None where the kernel does not apply."""
    if not (x.ndim == 2 and x.shape[0] <= MAX_ROWS and _plain(x, weight)):
        return None
    assert weight.shape == x.shape[1:], f"x {tuple(x.shape)} and weight {tuple(weight.shape)}"
    x, weight = x.contiguous(), weight.contiguous()
    y = torch.empty_like(x)
    _lib.rms_norm_f32(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.shape[0], x.shape[1], eps)
    return y


def greedy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """logits (N, V) -> (argmax (N,) int64, its log-softmax (N,) fp32): what torch.argmax and log_softmax give (the
    first index on ties, the first NaN if any), for up to MAX_ROWS rows of fp32 on a CPU; None elsewhere."""
    if not (logits.ndim == 2 and 0 < logits.shape[0] <= MAX_ROWS and logits.shape[1] > 0 and _plain(logits)):
        return None
    logits = logits.contiguous()
    index, logprob = torch.empty(logits.shape[0], dtype=torch.int64), torch.empty(logits.shape[0])
    _lib.greedy(logits.data_ptr(), *logits.shape, index.data_ptr(), logprob.data_ptr())
    return index, logprob
