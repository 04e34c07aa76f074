"""Where each tensor of a folder is, and reading it.

The files are indexed (safetensors headers, torch.save's zip) without reading any weight, and _plan checks them
against the model as built on the meta device before it maps each native key to its bytes. On a CPU a tensor kept
as stored is then mapped (_mapped); any other is read _CHUNK_BYTES at a time (_read) or quantized as it is read
(_quantized).
"""
import ctypes
import json
import math
import mmap
import pickle
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from mistral import ggml, quantize
from mistral.args import ModelArgs
from mistral.checkpoint import gguf, lora
from mistral.checkpoint.hf import _locate, from_hf_rope_order, rope_heads
from mistral.checkpoint.layouts import layout, weight_files
from mistral.errors import MistralError
from mistral.model import Transformer
from mistral.quantize import int4_rows, int8_rows

# Reads go through a buffer of this size when the stored dtype differs from the target, so converting
# costs 8 MiB, not a second copy of the largest tensor.
_CHUNK_BYTES = 8 << 20
# Below this many bytes a load is quick enough that a progress bar is noise.
_PROGRESS_MIN_BYTES = 1 << 30


# ---------------------------------------------------------------------------------------------------------
# Where each tensor is in the files

@dataclass(frozen=True)
class _Stored:
    """One tensor as a file holds it: shape and dtype, and where its contiguous bytes start."""

    path: Path
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I8": torch.int8,
                       "U8": torch.uint8}
_SAFETENSORS_NAMES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}
_QUANTIZED = {torch.int8: "int8", torch.uint8: "int4"}  # the dtype of each format's weights (mistral/quantize.py)


def _index_safetensors(path: Path) -> dict[str, _Stored]:
    """Parse the header: 8 bytes little-endian length, then JSON {name: {dtype, shape, data_offsets}}."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= size - 8:
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        stored = {}
        for name, info in header.items():
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise MistralError(f"{name!r} in {path.name} is stored as {info['dtype']}; this library reads "
                                   "F32, F16 and BF16 weights (and I8 or U8 in the folders `quantize` writes)")
            dtype, shape = _SAFETENSORS_DTYPES[info["dtype"]], tuple(int(d) for d in info["shape"])
            start, end = (int(o) for o in info["data_offsets"])
            if start < 0 or end - start != math.prod(shape) * dtype.itemsize or 8 + n + end > size:
                raise ValueError(f"{name!r} spans bytes {start}..{end}, which do not hold shape {list(shape)} "
                                 f"in a {size}-byte file")
            stored[name] = _Stored(path, 8 + n + start, dtype, shape)
        return stored
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise MistralError(f"cannot read {path}: not a complete safetensors file ({e}); download it again") from None


def _index_pth(path: Path) -> dict[str, _Stored]:
    # map_location="meta" unpickles the layout (weights_only: no arbitrary code) without reading any tensor
    # data, and records where each storage starts inside the zip file, which stores it uncompressed.
    try:
        state = torch.load(path, map_location="meta", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused something in it: code, not only tensors
        raise MistralError(f"{path} holds more than tensors, which this library does not unpickle "
                           f"({str(e).strip().splitlines()[0]})") from None
    except Exception:  # truncated zips, files that are not torch.save output (a bare KeyError: '101', say)
        raise MistralError(f"cannot read {path}: it is not a complete torch.save file; download it again") from None
    if not isinstance(state, dict):
        raise MistralError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    stored = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor) or not t.is_contiguous():
            raise MistralError(f"{name!r} in {path.name} is not a contiguous tensor; re-save the state dict")
        if t.dtype not in _SAFETENSORS_NAMES:
            raise MistralError(f"{name!r} in {path.name} is stored as {t.dtype}; this library reads "
                               "fp32, fp16 and bf16 weights only")
        base = getattr(t.untyped_storage(), "_checkpoint_offset", None)
        if base is None:
            raise MistralError(f"torch {torch.__version__} cannot locate tensors inside {path.name} without reading "
                               "it whole; upgrade torch or use the safetensors weights")
        stored[name] = _Stored(path, base + t.storage_offset() * t.element_size(), t.dtype, tuple(t.shape))
    return stored


def _index(files: list[Path]) -> dict[str, _Stored]:
    stored: dict[str, _Stored] = {}
    for path in files:
        for name, where in (_index_pth(path) if path.suffix == ".pth" else _index_safetensors(path)).items():
            if name in stored:
                raise MistralError(f"{name!r} is in both {stored[name].path.name} and {path.name}; keep one download")
            stored[name] = where
    return stored


@dataclass(frozen=True)
class _Source:
    """Where a native tensor's bytes are: a contiguous run in one file, rows in HF RoPE order if rope_heads."""

    key: str  # the name in the file, for messages
    path: Path
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    rope_heads: int = 0
    ggml: int = 0  # a GGUF block format's type number (mistral/ggml.py): the bytes are rows of blocks, (N, row_bytes)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def weights(self) -> tuple[tuple[int, ...], torch.dtype]:
        """The shape and dtype of the weights as floats: a block format's (N, K), bf16 (what it dequantizes to, to
        write); else as stored."""
        if not self.ggml:
            return self.shape, self.dtype
        return (self.shape[0], ggml.row_weights(self.ggml, self.shape[1])), torch.bfloat16


def _plan(folder: Path, args: ModelArgs) -> dict[str, _Source]:
    """Native key -> its bytes, for the whole model, after checking the files hold exactly that model."""
    kind = layout(folder)
    if kind == "gguf":
        return gguf.plan(folder, {name: tuple(t.shape) for name, t in _meta_state(args).items()})
    config_name = "params.json" if kind == "native" else "config.json"
    stored = _index(weight_files(folder, kind))
    if kind == "hf":
        # Older transformers saved RoPE's inv_freq buffer; it is derived from the config, not learned.
        stored = {k: v for k, v in stored.items() if not k.endswith("rotary_emb.inv_freq")}
    fused = kind == "hf" and any(k.endswith(".mlp.experts.gate_up_proj") for k in stored)
    as_built = _meta_state(args)
    shapes = {name: tuple(t.shape) for name, t in as_built.items()}
    located = {name: _locate(name, shape, args, kind, fused) for name, shape in shapes.items()}
    expected = {key: shape for key, shape, _ in located.values()}

    missing = [k for k in expected if k not in stored]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MistralError(f"the weights in {folder} lack {missing[0]!r}{more}, which the model in {config_name} "
                           "needs: they do not match it")
    extra = [k for k in stored if k not in expected]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise MistralError(f"the weights in {folder} hold {extra[0]!r}{more}, which the model in {config_name} does "
                           "not have: they do not match it")
    for key, shape in expected.items():
        if stored[key].shape != shape:
            raise MistralError(f"{key!r} in {stored[key].path.name} has shape {list(stored[key].shape)} but "
                               f"{config_name} implies {list(shape)}: the weights do not match it")
    if args.quantization is not None:  # then the names are native, and quantized weights and scales as made
        for name, t in as_built.items():
            quantized = t.dtype in _QUANTIZED or name.endswith(".scales")
            if (quantized or stored[name].dtype in _QUANTIZED) and stored[name].dtype != t.dtype:
                raise MistralError(f"{name!r} in {stored[name].path.name} is {stored[name].dtype}, but a "
                                   f"{args.quantization} folder keeps it as {t.dtype}: the weights do not match it")

    plan = {}
    for name, (key, _, elements) in located.items():
        where = stored[key]
        plan[name] = _Source(key, where.path, where.offset + elements * where.dtype.itemsize, where.dtype,
                             shapes[name], rope_heads(name, args) if kind == "hf" else 0)
    return plan


# ---------------------------------------------------------------------------------------------------------
# The model the files must hold, built on the meta device (load.py builds the one it runs the same way)

@contextmanager
def _on_meta():
    """Build modules on the meta device without drawing their initial weights: the file has them, and on meta the
    draw (nn.Embedding's normal_) costs torch's first import of its compiler, about 2 s of every start."""
    names = ("normal_", "uniform_", "kaiming_uniform_")
    saved = {name: getattr(torch.nn.init, name) for name in names}
    for name in names:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        with torch.device("meta"):
            yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def _meta_state(args: ModelArgs) -> dict[str, torch.Tensor]:
    """The state dict of the whole model on the meta device: its names, shapes and, in a quantized folder, dtypes."""
    with _on_meta():
        model = Transformer(args)
    if args.quantization is not None:
        quantize.prepare(model, args.quantization, torch.bfloat16, torch.float32)
    return model.state_dict()


# ---------------------------------------------------------------------------------------------------------
# Reading bytes

def _bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor as a writable buffer, so file reads land in its storage."""
    assert t.device.type == "cpu" and t.is_contiguous(), (t.device, t.stride())
    raw = (ctypes.c_ubyte * t.nbytes).from_address(t.data_ptr())
    raw.owner = t  # the buffer only points at t's memory: keep t alive for as long as the view is
    return memoryview(raw).cast("B")


def _read_exactly(f, view: memoryview, source: _Source, progress: tqdm) -> None:
    # Reads are capped (Linux returns at most ~2 GiB per call), and small steps keep the progress bar moving.
    while view:
        n = f.readinto(view[:_CHUNK_BYTES])
        if not n:
            raise MistralError(f"{source.path} ends inside {source.key!r}: the file is truncated; download it again")
        view = view[n:]
        progress.update(n)


def _read(source: _Source, device: torch.device, dtype: torch.dtype, progress: tqdm,
          staging: torch.Tensor | None = None, delta: torch.Tensor | None = None) -> torch.Tensor:
    """One native tensor, in dtype on device, holding at most _CHUNK_BYTES of it in any other form.

    staging: uint8 scratch of _CHUNK_BYTES for dtype conversion or a device copy. Pass the same one for
    every tensor: a fresh scratch per tensor lands between the tensors kept and fragments the heap.
    delta: (N, K) fp32 added to the weights (a LoRA adapter's, mistral/checkpoint/lora.py): the tensor is then read
    whole in fp32, the delta added there, and the sum converted.
    """
    if delta is not None:
        merged = _read(source, torch.device("cpu"), torch.float32, progress, staging).add_(delta)
        return merged.to(device=device, dtype=dtype)
    if source.ggml:
        return _dequantized(source, device, dtype, progress, staging)
    out = torch.empty(source.shape, dtype=dtype, device=device)
    with open(source.path, "rb", buffering=0) as f:
        f.seek(source.offset)
        if device.type == "cpu" and dtype == source.dtype:
            _read_exactly(f, _bytes(out), source, progress)
        else:
            staging = torch.empty(_CHUNK_BYTES, dtype=torch.uint8) if staging is None else staging
            flat, step = out.view(-1), max(1, _CHUNK_BYTES // source.dtype.itemsize)
            chunk = staging[: step * source.dtype.itemsize].view(source.dtype)  # (step,)
            for start in range(0, flat.numel(), step):
                part = chunk[: min(step, flat.numel() - start)]
                _read_exactly(f, _bytes(part), source, progress)
                flat[start : start + part.numel()].copy_(part)  # converts dtype and moves to device
    return from_hf_rope_order(out, source.rope_heads) if source.rope_heads else out


def _block_rows(source: _Source, progress: tqdm, staging: torch.Tensor | None, rows: int):
    """A GGUF block-format matrix's rows of blocks, `rows` at a time: (start, uint8 (n, row_bytes)) in staging."""
    N, width = source.shape
    staging = torch.empty(_CHUNK_BYTES, dtype=torch.uint8) if staging is None else staging
    with open(source.path, "rb", buffering=0) as f:
        f.seek(source.offset)
        for start in range(0, N, rows):
            block = staging[: min(rows, N - start) * width].view(-1, width)
            _read_exactly(f, _bytes(block), source, progress)
            yield start, block


def _dequantized(source: _Source, device: torch.device, dtype: torch.dtype, progress: tqdm,
                 staging: torch.Tensor | None = None) -> torch.Tensor:
    """A GGUF block-format matrix as floats of dtype, dequantized (mistral/ggml.py) a block of rows at a time."""
    (N, K), _ = source.weights
    out = torch.empty(N, K, dtype=dtype, device=device)
    for start, block in _block_rows(source, progress, staging, max(1, _CHUNK_BYTES // (4 * K))):
        out[start : start + len(block)] = ggml.dequantize(block, source.ggml)
    return out


def _q4_0_as_int4(source: _Source, device: torch.device, progress: tqdm,
                  staging: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A GGUF file's Q4_0 matrix (N, G * 18 bytes) as int4's (packed (N, G * 16), scales (N, G)), read a block of rows
    at a time: the same weights (mistral/ggml.py, q4_0_as_int4), the file's pages never held beside them."""
    N, width = source.shape
    packed = torch.empty(N, width // 18 * 16, dtype=torch.uint8)
    scales = torch.empty(N, width // 18, dtype=torch.float16)
    for start, block in _block_rows(source, progress, staging, max(1, _CHUNK_BYTES // width)):
        packed[start : start + len(block)], scales[start : start + len(block)] = ggml.q4_0_as_int4(block)
    return packed.to(device), scales.to(device)


def _progress(total: int, desc: str) -> tqdm:
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=total < _PROGRESS_MIN_BYTES)


def _mapped(source: _Source, maps: dict) -> torch.Tensor:
    """A native tensor as it lies in its file, mapped rather than read: the page cache is then the only copy, and a
    second start finds it there. Copy-on-write (MAP_PRIVATE): nothing done to the tensor reaches the file."""
    if source.path not in maps:
        with open(source.path, "rb") as f:
            maps[source.path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        if hasattr(mmap, "MADV_HUGEPAGE"):  # Linux: see above
            maps[source.path].madvise(mmap.MADV_HUGEPAGE)
    count = math.prod(source.shape)
    return torch.frombuffer(maps[source.path], dtype=source.dtype, count=count, offset=source.offset).view(source.shape)


def _adapter(path: Path | str | None, folder: Path, args: ModelArgs, plan: dict[str, _Source]) -> lora.Adapter | None:
    """The LoRA adapter at path for the folder's model (None without one), every key and shape checked before any
    weight is read; refused on quantized weights, since it merges into float ones."""
    if path is None:
        return None
    blocks = {ggml.BLOCKS[s.ggml][0] for s in plan.values() if s.ggml}
    if blocks or args.quantization is not None:
        held = " and ".join(sorted(blocks)) if blocks else args.quantization
        raise MistralError(f"{folder.name} holds {held} weights: a LoRA adapter merges into float weights, so give it "
                           "with the float model those were made from (--quantize then quantizes the merged ones)")
    return lora.read(path, folder, args, {n: tuple(t.shape) for n, t in _meta_state(args).items()})


def _quantized(source: _Source, device: torch.device, progress: tqdm, staging: torch.Tensor,
               to: str, delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A float matrix of the file as (weight, scales) in format `to` (int8: int8 and fp32; int4: packed uint8 and
    fp16), quantized a block of rows at a time as it is read: the full-precision matrix is never held. (Rows in HF's
    RoPE order are read whole first, to put them in ours.) delta: (N, K) fp32 added to the weights before they are
    quantized (a LoRA adapter's, mistral/checkpoint/lora.py)."""
    rows_of = int8_rows if to == "int8" else int4_rows
    if source.ggml == ggml.TYPES["Q4_0"] and to == "int4" and delta is None:
        return _q4_0_as_int4(source, device, progress, staging)
    if source.rope_heads or source.ggml:
        return tuple(t.to(device) for t in rows_of(_read(source, torch.device("cpu"), torch.float32, progress, None,
                                                         delta)))
    N, K = source.shape
    rows = max(1, _CHUNK_BYTES // (K * source.dtype.itemsize))
    if to == "int8":
        q, scales = torch.empty(N, K, dtype=torch.int8), torch.empty(N)
        scratch = torch.empty(rows, K)  # (rows, K) fp32, reused by every block: fresh pages for each would cost more
    with open(source.path, "rb", buffering=0) as f:
        f.seek(source.offset)
        for start in range(0, N, rows):
            n = min(rows, N - start)
            block = staging[: n * K * source.dtype.itemsize].view(source.dtype).view(n, K)
            _read_exactly(f, _bytes(block), source, progress)
            if delta is not None:
                block = block.float() + delta[start : start + n]
            if to == "int8":
                _, scales[start : start + n] = int8_rows(block, out=q[start : start + n], scratch=scratch[:n])
                continue
            packed, group_scales = int4_rows(block)
            if start == 0:
                q = torch.empty(N, packed.shape[1], dtype=packed.dtype)
                scales = torch.empty(N, group_scales.shape[1], dtype=group_scales.dtype)
            q[start : start + n], scales[start : start + n] = packed, group_scales
    return q.to(device), scales.to(device)
