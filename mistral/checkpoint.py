"""Reading and writing model folders, with errors a person can act on.

Two layouts load without a conversion step:

    native   params.json + consolidated.safetensors | consolidated-0000i-of-0000N.safetensors | consolidated.00.pth
    hf       config.json (model_type mistral or mixtral) + model.safetensors | model-0000i-of-0000N.safetensors

Everything that knows Hugging Face names lives in this file: the model only ever sees native keys.
Either way, the tokenizer is in the same folder (mistral/tokenizer.py says under which names).

Weights are read with ordinary file reads straight into the tensors the model keeps (safetensors and
torch-zip files both store each tensor as one contiguous run of little-endian bytes). Reading through an
mmap would leave the file's pages resident too, so peak memory would approach twice the weights.
"""
import ctypes
import dataclasses
import json
import logging
import math
import mmap
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from tqdm import tqdm

from mistral.args import QUANTIZATIONS, ModelArgs, MoeArgs, count_value, positive_value
from mistral.errors import MistralError

if TYPE_CHECKING:
    from mistral.model import Transformer

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}

# Reads go through a buffer of this size when the stored dtype differs from the target, so converting
# costs 8 MiB, not a second copy of the largest tensor.
_CHUNK_BYTES = 8 << 20
# Below this many bytes a load is quick enough that a progress bar is noise.
_PROGRESS_MIN_BYTES = 1 << 30

_NATIVE_PATTERNS = ("consolidated.safetensors", "consolidated-*-of-*.safetensors", "consolidated.00.pth")
_HF_PATTERNS = ("model.safetensors", "model-*-of-*.safetensors")
# What mistral.tokenizer reads, in either layout.
TOKENIZER_FILES = ("tekken.json", "tokenizer.model", "tokenizer.model.v*")


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
        raise MistralError("fp16 on CPU runs through a scalar fallback hundreds of times slower than fp32; use fp32 or bf16")
    if device.type == "cuda" and dtype == torch.bfloat16 and not _native_bf16(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise MistralError(f"this GPU ({torch.cuda.get_device_name(device)}, compute capability {major}.{minor}) has no "
                           "native bf16, which needs 8.0 (Ampere) or later: use --dtype fp16 or fp32")
    return dtype


# ---------------------------------------------------------------------------------------------------------
# Which layout a folder holds, and its config

def layout(folder: Path) -> str:
    """"native" or "hf". params.json wins when its weights are there too: some downloads carry both layouts."""
    if folder.exists() and not folder.is_dir():
        raise MistralError(f"{str(folder)!r} is a file; give the model folder that holds it")
    if not folder.is_dir():
        raise MistralError(f"model folder {str(folder)!r} does not exist")
    has_params, has_config = (folder / "params.json").is_file(), (folder / "config.json").is_file()
    if has_params and (not has_config or any(any(folder.glob(p)) for p in _NATIVE_PATTERNS)):
        return "native"
    if has_config:
        return "hf"
    raise MistralError(f"{folder} has no params.json or config.json; a model folder holds one of them, "
                       "the weights and a tokenizer")


def read_args(folder: Path) -> ModelArgs:
    """The model a folder describes, from params.json or, for a Hugging Face folder, config.json."""
    folder = Path(folder)
    kind = layout(folder)
    path = folder / ("params.json" if kind == "native" else "config.json")
    try:
        params = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MistralError(f"{path} is not valid JSON ({e}); restore it from the original download") from None
    if kind == "native":
        return ModelArgs.from_dict(params, str(path))
    return args_from_hf_config(params, str(path))


# Values transformers assumes for keys a config.json leaves out (its MistralConfig / MixtralConfig defaults);
# using the same ones keeps our logits equal to HF's on such files.
_HF_DEFAULTS = {
    "mistral": {"rms_norm_eps": 1e-6, "rope_theta": 1e4, "sliding_window": 4096},
    "mixtral": {"rms_norm_eps": 1e-5, "rope_theta": 1e6, "sliding_window": None,
                "num_local_experts": 8, "num_experts_per_tok": 2},
}


def args_from_hf_config(config: dict, source: str = "config.json") -> ModelArgs:
    """ModelArgs from a transformers config.json, interpreting absent and null keys as transformers does."""
    if not isinstance(config, dict):
        raise MistralError(f"{source} must be a JSON object, got {type(config).__name__}")
    model_type = config.get("model_type")
    if model_type not in _HF_DEFAULTS:
        raise MistralError(f"{source} has model_type {model_type!r}; this library reads 'mistral' and 'mixtral'")
    defaults = _HF_DEFAULTS[model_type]

    def positive_int(key: str, default: int | None = None) -> int:
        value = config.get(key)
        value = default if value is None else value  # transformers treats absent and null alike
        if value is None:
            raise MistralError(f"{source} is missing {key!r}, which a {model_type} config needs")
        return count_value(value, key, source)

    dim, n_heads = positive_int("hidden_size"), positive_int("num_attention_heads")
    # Without them transformers uses one kv head per query head, and dim // heads channels per head.
    n_kv_heads = positive_int("num_key_value_heads", n_heads)
    head_dim = positive_int("head_dim", dim // n_heads)
    if n_heads % n_kv_heads:
        raise MistralError(f"{source}: num_attention_heads ({n_heads}) must be a multiple of "
                           f"num_key_value_heads ({n_kv_heads})")
    if config.get("hidden_act", "silu") != "silu":
        raise MistralError(f"{source}: hidden_act is {config['hidden_act']!r}; this library implements 'silu' only")
    if config.get("tie_word_embeddings"):
        raise MistralError(f"{source} ties lm_head to embed_tokens (tie_word_embeddings), "
                           "which Mistral models never do and this library does not implement")
    # transformers 5 nests RoPE settings in rope_parameters, 4.x wrote rope_theta and rope_scaling at the top.
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise MistralError(f"{source}: 'rope_parameters' must be a JSON object, got {rope!r}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default" or rope.get("partial_rotary_factor", 1) != 1:
        raise MistralError(f"{source} asks for RoPE scaling ({rope}), which this library does not implement")
    rope_theta = rope.get("rope_theta", config.get("rope_theta", defaults["rope_theta"]))
    norm_eps = config.get("rms_norm_eps", defaults["rms_norm_eps"])
    rope_theta, norm_eps = positive_value(rope_theta, "rope_theta", source), positive_value(norm_eps, "rms_norm_eps",
                                                                                             source)
    sliding_window = config.get("sliding_window", defaults["sliding_window"])
    if sliding_window is not None:
        sliding_window = count_value(sliding_window, "sliding_window", source)
    moe = None
    if model_type == "mixtral":
        moe = MoeArgs(num_experts=positive_int("num_local_experts", defaults["num_local_experts"]),
                      num_experts_per_tok=positive_int("num_experts_per_tok", defaults["num_experts_per_tok"]))
        if moe.num_experts_per_tok > moe.num_experts:
            raise MistralError(f"{source}: num_experts_per_tok ({moe.num_experts_per_tok}) must not exceed "
                               f"num_local_experts ({moe.num_experts})")
    return ModelArgs(dim=dim, n_layers=positive_int("num_hidden_layers"), head_dim=head_dim,
                     hidden_dim=positive_int("intermediate_size"), n_heads=n_heads, n_kv_heads=n_kv_heads,
                     norm_eps=float(norm_eps),
                     vocab_size=positive_int("vocab_size"), sliding_window=sliding_window,
                     rope_theta=float(rope_theta), moe=moe, source=source)


def hf_config_from_args(args: ModelArgs, dtype: torch.dtype) -> dict:
    """The config.json transformers' MistralForCausalLM / MixtralForCausalLM needs for this model."""
    model_type = "mistral" if args.moe is None else "mixtral"
    config = {
        "architectures": ["MistralForCausalLM" if args.moe is None else "MixtralForCausalLM"],
        "model_type": model_type,
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "rms_norm_eps": args.norm_eps,
        "vocab_size": args.vocab_size,
        "sliding_window": args.sliding_window,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        # rope_theta for transformers 4.x, rope_parameters for 5.x: each version reads its own and ignores the other.
        "rope_theta": args.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "dtype": str(dtype).removeprefix("torch."),
    }
    if args.moe is not None:
        config["num_local_experts"] = args.moe.num_experts
        config["num_experts_per_tok"] = args.moe.num_experts_per_tok
    return config


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


def weight_files(folder: Path, kind: str = "native") -> list[Path]:
    """The weight files of a folder of layout `kind`, after checking that no shard is missing."""
    patterns = _NATIVE_PATTERNS if kind == "native" else _HF_PATTERNS
    for pattern in patterns:
        files = sorted(folder.glob(pattern))
        if not files:
            continue
        if pattern.endswith(".pth") and (folder / "consolidated.01.pth").exists():
            raise MistralError(f"{folder} holds tensor-parallel shards consolidated.0N.pth, which this library "
                               "does not merge; use the single-file or safetensors download")
        if "-of-" in pattern:
            _check_shards(folder, files)
        return files
    expected = ("consolidated.safetensors, consolidated-0000i-of-0000N.safetensors or consolidated.00.pth"
                if kind == "native" else "model.safetensors or model-0000i-of-0000N.safetensors")
    raise MistralError(f"{folder} has no weights: expected {expected}")


def _check_shards(folder: Path, files: list[Path]) -> None:
    """Shards are named prefix-0000i-of-0000N.safetensors: all N must be there, from one set."""
    numbered = [m for f in files if (m := re.fullmatch(r"(.*)-(\d+)-of-(\d+)\.safetensors", f.name))]
    counts = {int(m[3]) for m in numbered}
    if len(counts) != 1:
        raise MistralError(f"{folder} mixes shards of different sets ({', '.join(f.name for f in files)}); "
                           "keep one download")
    n = counts.pop()
    have = {int(m[2]) for m in numbered}
    missing = [i for i in range(1, n + 1) if i not in have]
    if missing:
        width = len(numbered[0][2])
        name = f"{numbered[0][1]}-{missing[0]:0{width}d}-of-{numbered[0][3]}.safetensors"
        raise MistralError(f"{folder} lacks shard {name} ({len(missing)} of {n} missing); finish the download")


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


# Native key -> HF key, {} standing for the layer index and then the expert index. HF Mixtral files from
# transformers 4.x (and what 5.x writes to disk) keep one tensor per expert under block_sparse_moe.
_TO_HF = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{}.attention.wq.weight": "model.layers.{}.self_attn.q_proj.weight",
    "layers.{}.attention.wk.weight": "model.layers.{}.self_attn.k_proj.weight",
    "layers.{}.attention.wv.weight": "model.layers.{}.self_attn.v_proj.weight",
    "layers.{}.attention.wo.weight": "model.layers.{}.self_attn.o_proj.weight",
    "layers.{}.attention_norm.weight": "model.layers.{}.input_layernorm.weight",
    "layers.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "layers.{}.feed_forward.w1.weight": "model.layers.{}.mlp.gate_proj.weight",
    "layers.{}.feed_forward.w2.weight": "model.layers.{}.mlp.down_proj.weight",
    "layers.{}.feed_forward.w3.weight": "model.layers.{}.mlp.up_proj.weight",
    "layers.{}.feed_forward.gate.weight": "model.layers.{}.block_sparse_moe.gate.weight",
    "layers.{}.feed_forward.experts.{}.w1.weight": "model.layers.{}.block_sparse_moe.experts.{}.w1.weight",
    "layers.{}.feed_forward.experts.{}.w2.weight": "model.layers.{}.block_sparse_moe.experts.{}.w2.weight",
    "layers.{}.feed_forward.experts.{}.w3.weight": "model.layers.{}.block_sparse_moe.experts.{}.w3.weight",
}
_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")
_FUSED_EXPERT = re.compile(r"layers\.(\d+)\.feed_forward\.experts\.(\d+)\.(w[123])\.weight")


def hf_name(name: str) -> str:
    """The HF key of a native key: "layers.3.attention.wk.weight" -> "model.layers.3.self_attn.k_proj.weight"."""
    return _TO_HF[_INDEX.sub("{}", name)].format(*_INDEX.findall(name))


def rope_heads(name: str, args: ModelArgs) -> int:
    """Heads whose rows HF reorders for its RoPE: n_heads in wq, n_kv_heads in wk, none elsewhere."""
    return args.n_heads if name.endswith("wq.weight") else args.n_kv_heads if name.endswith("wk.weight") else 0


def to_hf_rope_order(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of wq/wk from our interleaved-pair RoPE order to HF's rotate_half order.

    We rotate channels (2m, 2m+1) of a head together; HF rotates (m, m + D/2). Moving channel 2m + j to
    j * D/2 + m turns one into the other, and q.k is unchanged because q and k move alike. D=4:
    ours [a0 b0 a1 b1] -> HF [a0 a1 b0 b1].
    """
    rows, cols = w.shape
    D = rows // heads
    return w.view(heads, D // 2, 2, cols).transpose(1, 2).reshape(rows, cols)  # (H, 2, D/2, cols) flattened


def from_hf_rope_order(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of to_hf_rope_order: HF [a0 a1 b0 b1] -> ours [a0 b0 a1 b1] in each head."""
    rows, cols = w.shape
    D = rows // heads
    return w.view(heads, 2, D // 2, cols).transpose(1, 2).reshape(rows, cols)  # (H, D/2, 2, cols) flattened


@dataclass(frozen=True)
class _Source:
    """Where a native tensor's bytes are: a contiguous run in one file, rows in HF RoPE order if rope_heads."""

    key: str  # the name in the file, for messages
    path: Path
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    rope_heads: int = 0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _locate(name: str, shape: tuple[int, ...], args: ModelArgs, kind: str,
            fused: bool) -> tuple[str, tuple[int, ...], int]:
    """(file key, that tensor's full shape, element offset of `name` inside it) for native tensor `name`.

    Newer transformers keep each layer's experts fused: gate_up_proj (E, 2I, D) is, per expert, its w1 rows
    then its w3 rows; down_proj (E, D, I) is every expert's w2. Each native expert tensor is then one
    contiguous block of the fused one. E=2: gate_up_proj rows [w1_0 | w3_0 | w1_1 | w3_1], w3 of expert 1
    starts at element (2 * 1 + 1) * I * D.
    """
    if kind == "native":
        return name, shape, 0
    expert = _FUSED_EXPERT.fullmatch(name) if fused else None
    if expert:
        layer, e, w = expert[1], int(expert[2]), expert[3]
        E, I, D = args.moe.num_experts, args.hidden_dim, args.dim
        if w == "w2":
            return f"model.layers.{layer}.mlp.experts.down_proj", (E, D, I), e * D * I
        return f"model.layers.{layer}.mlp.experts.gate_up_proj", (E, 2 * I, D), (2 * e + (w == "w3")) * I * D
    key = hf_name(name)
    return (key.replace(".block_sparse_moe.gate.", ".mlp.gate.") if fused else key), shape, 0


def _plan(folder: Path, args: ModelArgs) -> dict[str, _Source]:
    """Native key -> its bytes, for the whole model, after checking the files hold exactly that model."""
    kind = layout(folder)
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
    from mistral import quantize
    from mistral.model import Transformer

    with _on_meta():
        model = Transformer(args)
    if args.quantization is not None:
        quantize.prepare(model, args.quantization, torch.bfloat16, torch.float32)
    return model.state_dict()


def _stored_dtype(plan: dict[str, _Source]) -> torch.dtype:
    """The float dtype that holds most of the weights' bytes (an int8 folder's scales aside)."""
    total: dict[torch.dtype, int] = {}
    for name, source in plan.items():
        if source.dtype.is_floating_point and not name.endswith(".scales"):
            total[source.dtype] = total.get(source.dtype, 0) + source.nbytes
    return max(total, key=total.get)


# ---------------------------------------------------------------------------------------------------------
# Reading and writing bytes

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
          staging: torch.Tensor | None = None) -> torch.Tensor:
    """One native tensor, in dtype on device, holding at most _CHUNK_BYTES of it in any other form.

    staging: uint8 scratch of _CHUNK_BYTES for dtype conversion or a device copy. Pass the same one for
    every tensor: a fresh scratch per tensor lands between the tensors kept and fragments the heap.
    """
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


def _progress(total: int, desc: str) -> tqdm:
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=total < _PROGRESS_MIN_BYTES)


def _mapped(source: _Source, maps: dict) -> torch.Tensor:
    """A native tensor as it lies in its file, mapped rather than read: the page cache is then the only copy, and a
    second start finds it there. Copy-on-write (MAP_PRIVATE): nothing done to the tensor reaches the file."""
    if source.path not in maps:
        with open(source.path, "rb") as f:
            maps[source.path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    count = math.prod(source.shape)
    return torch.frombuffer(maps[source.path], dtype=source.dtype, count=count, offset=source.offset).view(source.shape)


def _quantized(source: _Source, device: torch.device, progress: tqdm, staging: torch.Tensor,
               to: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A float matrix of the file as (weight, scales) in format `to` (int8: int8 and fp32; int4: packed uint8 and
    fp16), quantized a block of rows at a time as it is read: the full-precision matrix is never held. (Rows in HF's
    RoPE order are read whole first, to put them in ours.)"""
    from mistral.quantize import int4_rows, int8_rows

    rows_of = int8_rows if to == "int8" else int4_rows
    if source.rope_heads:
        return tuple(t.to(device) for t in rows_of(_read(source, torch.device("cpu"), torch.float32, progress)))
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
            if to == "int8":
                _, scales[start : start + n] = int8_rows(block, out=q[start : start + n], scratch=scratch[:n])
                continue
            packed, group_scales = int4_rows(block)
            if start == 0:
                q = torch.empty(N, packed.shape[1], dtype=packed.dtype)
                scales = torch.empty(N, group_scales.shape[1], dtype=group_scales.dtype)
            q[start : start + n], scales[start : start + n] = packed, group_scales
    return q.to(device), scales.to(device)


def load_weights(folder: Path, args: ModelArgs, wanted: dict[str, torch.Tensor], device: torch.device,
                 plan: dict[str, _Source] | None = None) -> dict[str, torch.Tensor]:
    """Read the tensors named in `wanted` (this rank's state dict on the meta device, in the dtypes its modules keep).

    A tensor kept as stored is mapped from its file on a CPU; one of another dtype is converted _CHUNK_BYTES at a
    time; an int8 weight the file has as floats is quantized as it is read, its scales with it. The whole folder is
    checked against `args` first, but only the wanted tensors are read: under pipeline parallelism each rank reads
    its own layers.
    """
    folder = Path(folder)
    plan = _plan(folder, args) if plan is None else plan
    staging = torch.empty(_CHUNK_BYTES, dtype=torch.uint8)
    maps: dict[Path, mmap.mmap] = {}

    def as_stored(name: str) -> bool:
        source = plan[name]
        return device.type == "cpu" and wanted[name].dtype == source.dtype and not source.rope_heads

    out = {}
    to_read = sum(plan[n].nbytes for n in wanted if n in plan and not as_stored(n))
    with _progress(to_read, f"loading {folder.name}") as progress:
        for name, like in wanted.items():
            if name not in plan:  # the scales of a weight quantized while loading: made with it, below
                assert name.endswith(".scales"), name
                continue
            if like.dtype in _QUANTIZED and plan[name].dtype != like.dtype:
                out[name], out[name.removesuffix("weight") + "scales"] = _quantized(plan[name], device, progress,
                                                                                     staging, _QUANTIZED[like.dtype])
            elif as_stored(name):
                out[name] = _mapped(plan[name], maps)
            else:
                out[name] = _read(plan[name], device, like.dtype, progress, staging)
    return out


def load_model(folder: Path | str, max_batch_size: int = 1, num_pipeline_ranks: int = 1,
               device: torch.device | str | None = None, dtype: torch.dtype | str | None = None,
               quantize: str | None = None, cache_slots: int = 0, prefill_tokens: int = 512) -> "Transformer":
    """The model of a native or Hugging Face folder, ready to run.

    device: cuda when available, else cpu. dtype: on CUDA the activations' and weights' (auto: bf16); on a CPU the
    weights' (auto: as stored, so a bf16 checkpoint stays bf16 in memory), while activations and arithmetic are fp32
    there whatever the weights (no CPU here has bf16 arithmetic at speed). quantize="int8" or "int4": linear weights
    in that format (mistral/quantize.py), quantized from the file one block of rows at a time; a folder `quantize`
    wrote is quantized already. Weights kept as
    stored are mapped from the file. Under pipeline parallelism each rank builds and reads only its own layers.

    Before any weight is read, what the run will need (the weights as they will be kept, a cache of cache_slots
    per row for max_batch_size rows, and the work space of pre-filling prefill_tokens at a time) is compared with
    the memory available, and a run that cannot fit is refused in one line that says what would.
    """
    from mistral import grouped, pipeline, quantize as formats
    from mistral.model import Transformer

    folder, device = Path(folder), resolve_device(device)
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise MistralError(f"unknown quantize {quantize!r}; the choices are {' and '.join(QUANTIZATIONS)} (or leave "
                           "it out)")
    if quantize is not None and device.type == "cuda":
        raise MistralError(f"--quantize {quantize} is a CPU format: on CUDA every product would widen its weights back "
                           "to float, slower than bf16, and the whole model would reach the GPU before being "
                           "quantized; leave out --quantize (CUDA runs bf16, or fp16 before Ampere)")
    args = read_args(folder)
    if args.quantization is not None and quantize not in (None, args.quantization):
        raise MistralError(f"{folder} holds {args.quantization} weights already; leave out --quantize")
    if args.quantization is not None and device.type == "cuda":
        raise MistralError(f"{folder} holds {args.quantization} weights, a CPU format: on CUDA every product would "
                           "widen them back to float, slower than bf16; load the folder it was made from, or run this "
                           "one with --device cpu")
    plan = _plan(folder, args)
    dtype = resolve_dtype(dtype, device, stored=_stored_dtype(plan))
    rank = 0
    if num_pipeline_ranks > 1:
        rank = pipeline.pipeline_rank(num_pipeline_ranks)
        if device.type == "cuda":
            device = pipeline.rank_gpu(device, rank)
    compute = torch.float32 if device.type == "cpu" else dtype

    def built(dtype: torch.dtype, quantize: str | None) -> "Transformer":
        linears = args.quantization or quantize or ("bf16" if compute != dtype else "float")
        with _on_meta():
            model = Transformer(args, rank, num_pipeline_ranks, max_batch_size)
        return formats.prepare(model, linears, embeddings=dtype, compute=compute)

    model = built(dtype, quantize)
    group = args.moe is not None and grouped.fused(device, dtype)  # routing with no host read (mistral/grouped.py)
    need = Memory.of(model, compute, cache_slots, prefill_tokens, group)
    free = memory_available(device)
    if need.total > free:
        others = [(flag, Memory.of(built(*how), compute, cache_slots, prefill_tokens, group).total)
                  for flag, how in (("--dtype bf16", (torch.bfloat16, None)),
                                    *((f"--quantize {q}", (dtype, q)) for q in QUANTIZATIONS))
                  if how != (dtype, quantize) and args.quantization is None]
        fits = [f"{flag} needs {gb(total)}" for flag, total in others if total <= free]
        if need.cache > need.weights / 4:
            fits.append(f"fewer rows or a shorter run would shrink the cache ({gb(need.cache)})")
        raise MistralError(f"this run needs about {gb(need.total)} ({need}) but {gb(free)} is available on "
                           f"{device.type}: {'; '.join(fits) or 'no option of this library fits it here'}")
    model.load_state_dict(load_weights(folder, args, model.state_dict(), device, plan), assign=True, strict=True)
    if group:
        grouped.group_experts(model)
    return model.eval()


def gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:,.1f} GB"


@dataclass(frozen=True)
class Memory:
    """Bytes a run needs: the weights as kept, the KV cache, and the largest temporaries of a forward."""

    weights: int
    cache: int
    work: int

    @property
    def total(self) -> int:
        return self.weights + self.cache + self.work

    @staticmethod
    def of(model: "Transformer", compute: torch.dtype, cache_slots: int, prefill_tokens: int,
           grouped: bool = False) -> "Memory":
        """For a model on the meta device, whose tensors have the dtypes they will be loaded in; grouped: its experts'
        weights will be stacked once loaded (mistral/grouped.py), which holds one stack twice for a moment."""
        args, size = model.args, compute.itemsize
        weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        cache = 2 * model.n_local_layers * model.max_batch_size * cache_slots * args.n_kv_heads * args.head_dim * size
        S, H, D = prefill_tokens, args.n_heads, args.head_dim
        # A pre-fill step of S tokens: the residual and the norm's output, q/k/v and attention's output, the FFN's
        # gate, up and their product (K rows a token in a mixture whose experts are grouped); SDPA's scores for a tile
        # of 256 queries; a block of weights converted for a product (mistral/quantize.py's CONVERT_BLOCK_BYTES, 8 MB,
        # counted twice over); the logits of the rows that are sampled, and their softmax. Grouping stacks one kind of
        # a layer's expert weights at a time while loading, before any forward: the larger of the two is the need.
        ffn_rows = S * (args.moe.num_experts_per_tok if grouped else 1)
        activations = (S * (2 * args.dim + (2 * H + 2 * args.n_kv_heads) * D) + ffn_rows * 3 * args.hidden_dim) * size
        scores = 256 * (256 + (args.sliding_window or S)) * H * 4
        logits = 2 * model.max_batch_size * args.vocab_size * 4
        work = activations + scores + (16 << 20) + logits
        stack = args.moe.num_experts * args.hidden_dim * args.dim * compute.itemsize if grouped else 0
        return Memory(weights, cache, max(work, stack))

    def __str__(self) -> str:
        return f"weights {gb(self.weights)}, cache {gb(self.cache)}, work space {gb(self.work)}"


def memory_available(device: torch.device) -> int:
    """Bytes a new allocation can take without the kernel killing something: MemAvailable (free memory and the
    page cache that can be dropped), or less where a cgroup (a container) caps this process; a GPU's free memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        free = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 1 << 62  # not Linux: nothing to go by, so nothing is refused
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass
    return free


# A tensor to write: its dtype, its shape, and what makes it (called once, when its turn comes).
_Entry = tuple[torch.dtype, tuple[int, ...], Callable[[], torch.Tensor]]


def _write_safetensors(path: Path, tensors: dict[str, _Entry]) -> None:
    """Write tensors one at a time, each made just before it is written, so that writing never holds more than one."""
    header, end = {}, 0
    for name, (dtype, shape, _) in tensors.items():
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_NAMES[dtype], "shape": list(shape), "data_offsets": [end, end + nbytes]}
        end += nbytes
    # transformers refuses safetensors files without format metadata.
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # the data then starts 8-byte aligned, as other writers keep it
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, (dtype, shape, make) in tensors.items():
            t = make()
            assert t.dtype == dtype and tuple(t.shape) == shape, (name, t.dtype, t.shape)
            f.write(_bytes(t.contiguous()))


@contextmanager
def _new_folder(dst: Path):
    """A temporary folder beside dst, renamed to dst once everything is written: a failure leaves nothing behind."""
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise MistralError(f"{dst} already exists and is not an empty folder; pick a new destination")
    if not dst.parent.is_dir():
        raise MistralError(f"{dst.parent} is not a folder, so {dst.name} cannot be made in it")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent))
    except OSError as e:
        raise MistralError(f"cannot write in {dst.parent} ({e.strerror})") from None
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp made it private; the folder gets the mode any new folder would
        os.replace(tmp, dst)
    except OSError as e:
        raise MistralError(f"writing {dst} failed ({e.strerror}); nothing was left behind") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _copy_tokenizers(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        for path in src.glob(name):
            shutil.copyfile(path, dst / path.name)


def convert(src: Path | str, dst: Path | str, to: str = "native") -> Path:
    """Write the model in folder src to the new folder dst, in layout `to`: "native" or "hf".

    native: params.json + consolidated.safetensors. hf: config.json + model.safetensors that transformers'
    MistralForCausalLM / MixtralForCausalLM.from_pretrained loads. The tokenizer files are copied along. Tensors
    keep their stored dtype and pass through memory one at a time.
    """
    src, dst = Path(src), Path(dst)
    if to not in ("native", "hf"):
        raise MistralError(f"unknown target layout {to!r}; use native or hf")
    args = read_args(src)
    if to == "hf" and args.quantization is not None:
        raise MistralError(f"{src} holds {args.quantization} weights, which transformers' Mistral models do not "
                           "read; convert the float folder it was made from")
    plan = _plan(src, args)
    cpu = torch.device("cpu")
    with _new_folder(dst) as tmp, _progress(sum(s.nbytes for s in plan.values()), f"converting {src.name}") as progress:
        if to == "native":
            params = {k: v for k, v in asdict(args).items() if v is not None}
            (tmp / "params.json").write_text(json.dumps(params, indent=2) + "\n")
            tensors = {n: (s.dtype, s.shape, lambda s=s: _read(s, cpu, s.dtype, progress)) for n, s in plan.items()}
            _write_safetensors(tmp / "consolidated.safetensors", tensors)
        else:
            config = hf_config_from_args(args, plan["tok_embeddings.weight"].dtype)
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")

            def hf_order(source: _Source, heads: int) -> torch.Tensor:
                t = _read(source, cpu, source.dtype, progress)
                return to_hf_rope_order(t, heads) if heads else t

            tensors = {hf_name(n): (s.dtype, s.shape, lambda s=s, n=n: hf_order(s, rope_heads(n, args)))
                       for n, s in plan.items()}
            _write_safetensors(tmp / "model.safetensors", tensors)
        _copy_tokenizers(src, tmp)
    return dst


def quantize(src: Path | str, dst: Path | str, to: str = "int8") -> Path:
    """Write the model in folder src (native or HF) to the new native folder dst with int8 (or int4) linear weights,
    which every command then loads without quantizing again: params.json says "quantization": "int8" (or "int4"), and
    consolidated.safetensors holds each linear's "<name>.weight" and "<name>.scales" (int8 and fp32 (N,); for int4,
    two weights a byte, uint8 (N, G * 16), and fp16 (N, G), G groups of 32 a row: mistral/quantize.py says how they
    are made) beside the other tensors as stored. Each weight is quantized a block of rows at a time, as it is read."""
    src, dst = Path(src), Path(dst)
    if to not in QUANTIZATIONS:
        raise MistralError(f"unknown quantization {to!r}; the choices are {' and '.join(QUANTIZATIONS)}")
    args = read_args(src)
    if args.quantization is not None:
        raise MistralError(f"{src} holds {args.quantization} weights already")
    plan = _plan(src, args)
    quantized = dataclasses.replace(args, quantization=to)
    cpu, staging, made = torch.device("cpu"), torch.empty(_CHUNK_BYTES, dtype=torch.uint8), {}
    with _new_folder(dst) as tmp, _progress(sum(s.nbytes for s in plan.values()), f"quantizing {src.name}") as progress:
        def weight(name: str) -> torch.Tensor:
            q, made[name.removesuffix("weight") + "scales"] = _quantized(plan[name], cpu, progress, staging, to)
            return q

        tensors = {}
        for name, like in _meta_state(quantized).items():
            if like.dtype in _QUANTIZED:
                tensors[name] = (like.dtype, tuple(like.shape), lambda name=name: weight(name))
            elif name.endswith(".scales"):
                tensors[name] = (like.dtype, tuple(like.shape), lambda name=name: made.pop(name))
            else:
                source = plan[name]
                tensors[name] = (source.dtype, source.shape, lambda s=source: _read(s, cpu, s.dtype, progress))
        params = {k: v for k, v in asdict(quantized).items() if v is not None}
        (tmp / "params.json").write_text(json.dumps(params, indent=2) + "\n")
        _write_safetensors(tmp / "consolidated.safetensors", tensors)
        _copy_tokenizers(src, tmp)
    return dst
