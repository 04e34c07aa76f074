"""GGUF files, llama.cpp's format and what most CPU users download: the model, its weights and its tokenizer in one
file (or in split parts, NAME-0000i-of-0000N.gguf).

The header is read with `gguf`, llama.cpp's own Python reader; the weights are then mapped (or read) by
mistral/checkpoint's own code, from the offsets it gives. A file holds a model of architecture `llama` (what
llama.cpp's converter writes for Mistral and Mixtral):

    llama.embedding_length dim              llama.attention.head_count       n_heads
    llama.block_count      n_layers         llama.attention.head_count_kv    n_kv_heads
    llama.feed_forward_length hidden_dim    llama.attention.key_length       head_dim (else dim / n_heads)
    llama.rope.freq_base   rope_theta       llama.attention.layer_norm_rms_epsilon  norm_eps
    llama.expert_count, llama.expert_used_count: a mixture of experts

No key holds a sliding window: llama.cpp runs these files with full attention, and so does this library unless told
a window (load_model's sliding_window; --sliding_window on the commands).

Tensors are named blk.N.attn_q.weight and so on (_NAMES); their rows are in the native order (llama.cpp's converter
undoes Hugging Face's RoPE permutation of wq and wk: the layer-0 wq of a Q8_0 file it made from an HF folder differs
from the native folder's by 0.5%, Q8_0's rounding, where the permuted order would differ by 140%). A Mixtral file
keeps experts one tensor each (blk.N.ffn_gate.E.weight) or merged (blk.N.ffn_gate_exps.weight, (E, rows, K)); both
are read, an expert of a merged tensor being a run of its rows.

Each tensor is F32, F16 or BF16, or one of the block formats of mistral/ggml.py, which the model keeps as stored.
"""
import functools
import math
import re
import struct
from pathlib import Path

import torch

from mistral.args import ModelArgs, MoeArgs, count_value, positive_value
from mistral.checkpoint.hf import _renamed
from mistral.errors import MistralError
from mistral.ggml import BLOCKS, row_bytes

_FLOATS = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}  # GGML type numbers
_SPLIT = re.compile(r"(.*)-(\d{5})-of-(\d{5})\.gguf")

# Native key -> GGUF key, {} standing for the layer index and then the expert index.
_NAMES = {
    "tok_embeddings.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
    "layers.{}.attention.wq.weight": "blk.{}.attn_q.weight",
    "layers.{}.attention.wk.weight": "blk.{}.attn_k.weight",
    "layers.{}.attention.wv.weight": "blk.{}.attn_v.weight",
    "layers.{}.attention.wo.weight": "blk.{}.attn_output.weight",
    "layers.{}.attention_norm.weight": "blk.{}.attn_norm.weight",
    "layers.{}.ffn_norm.weight": "blk.{}.ffn_norm.weight",
    "layers.{}.feed_forward.w1.weight": "blk.{}.ffn_gate.weight",
    "layers.{}.feed_forward.w2.weight": "blk.{}.ffn_down.weight",
    "layers.{}.feed_forward.w3.weight": "blk.{}.ffn_up.weight",
    "layers.{}.feed_forward.gate.weight": "blk.{}.ffn_gate_inp.weight",
    "layers.{}.feed_forward.experts.{}.w1.weight": "blk.{}.ffn_gate.{}.weight",
    "layers.{}.feed_forward.experts.{}.w2.weight": "blk.{}.ffn_down.{}.weight",
    "layers.{}.feed_forward.experts.{}.w3.weight": "blk.{}.ffn_up.{}.weight",
}
_MERGED = re.compile(r"(blk\.\d+\.ffn_(?:gate|down|up))\.(\d+)\.weight")


def is_gguf(path: Path) -> bool:
    """A .gguf file, or a folder holding one and no params.json or config.json."""
    if path.is_file():
        return path.suffix == ".gguf"
    return (path.is_dir() and not (path / "params.json").is_file() and not (path / "config.json").is_file()
            and any(path.glob("*.gguf")))


def gguf_files(path: Path) -> list[Path]:
    """The files of the model at path: the .gguf itself or the one model a folder holds, all parts of a split one."""
    if path.is_dir():
        models = sorted({_SPLIT.sub(r"\1", p.name) for p in path.glob("*.gguf") if not p.name.startswith("mmproj")})
        if len(models) != 1:
            raise MistralError(f"{path} holds {len(models)} GGUF models ({', '.join(models)}); name the file to load")
        path = min(p for p in path.glob("*.gguf") if _SPLIT.sub(r"\1", p.name) == models[0])
    m = _SPLIT.fullmatch(path.name)
    if not m:
        return [path]
    n = int(m[3])
    parts = [path.with_name(f"{m[1]}-{i:05d}-of-{m[3]}.gguf") for i in range(1, n + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise MistralError(f"{path.parent} lacks {missing[0]} ({len(missing)} of {n} parts missing); finish the "
                           "download")
    return parts


class _Tensor:
    """One tensor as a GGUF file holds it: where its bytes start, its GGML type and its shape in torch's order."""

    def __init__(self, path: Path, offset: int, kind: int, shape: tuple[int, ...]):
        self.path, self.offset, self.kind, self.shape = path, offset, kind, shape


@functools.lru_cache(maxsize=4)
def _read(files: tuple[Path, ...], stamps: tuple) -> tuple[dict, dict[str, _Tensor]]:
    """(fields, tensors) of the files: metadata from the first, tensors from all."""
    from gguf import GGUFReader  # imported only for GGUF files: it pulls numpy's memmap and a few modules

    fields, tensors = {}, {}
    for path in files:
        try:
            reader = GGUFReader(path, "r")
        except Exception as e:  # the reader raises ValueError, KeyError, struct errors on a damaged file
            raise MistralError(f"cannot read {path}: not a complete GGUF file ({e}); download it again") from None
        if not fields:
            fields = reader.fields
        for t in reader.tensors:
            if t.name in tensors:
                raise MistralError(f"{t.name!r} is in {tensors[t.name].path.name} and {path.name}; keep one download")
            tensors[t.name] = _Tensor(path, int(t.data_offset), int(t.tensor_type),
                                      tuple(int(d) for d in reversed(t.shape.tolist())))
    return fields, tensors


def read(path: Path) -> tuple[dict, dict[str, _Tensor]]:
    files = tuple(gguf_files(Path(path)))
    return _read(files, tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in files))


def forget() -> None:
    """Drop the files read so far: once a model and its tokenizer are built, gguf's reader of a 7B file (its metadata,
    the tokenizer's 32768 pieces one Python object each: 300 thousand objects) is 80 MB that every full garbage
    collection walks."""
    _read.cache_clear()


def value(fields: dict, key: str, default=None):
    """The value of metadata key `key` (a list for an array), or default when the file has none. A float32 is given
    as the shortest decimal that rounds to it (1e-05, not 9.99999974738e-06): the value the file was written from."""
    field = fields.get(key)
    if field is None:
        return default
    v = field.contents()
    return float(str(field.parts[-1][0])) if isinstance(v, float) and field.parts[-1].dtype.itemsize == 4 else v


def read_args(path: Path, sliding_window: int | None = None) -> ModelArgs:
    """The model a GGUF file describes. sliding_window: the window to run it with (the file has none)."""
    fields, tensors = read(path)
    source = Path(path).name
    arch = value(fields, "general.architecture")
    if arch != "llama":
        raise MistralError(f"{source} holds a model of architecture {arch!r} (general.architecture); this library "
                           "reads 'llama', what llama.cpp writes for Mistral and Mixtral")

    def count(key: str, default: int | None = None) -> int:
        v = value(fields, f"llama.{key}", default)
        if v is None:
            raise MistralError(f"{source} lacks llama.{key}, which the model needs: download a complete file")
        return count_value(int(v), f"llama.{key}", source)

    dim, n_heads = count("embedding_length"), count("attention.head_count")
    n_kv_heads, head_dim = count("attention.head_count_kv", n_heads), count("attention.key_length", dim // n_heads)
    if count("attention.value_length", head_dim) != head_dim or count("rope.dimension_count", head_dim) != head_dim:
        raise MistralError(f"{source}: llama.attention.value_length and llama.rope.dimension_count must equal the "
                           f"key length ({head_dim}); a model that differs is not a Mistral")
    if n_heads % n_kv_heads:
        raise MistralError(f"{source}: llama.attention.head_count ({n_heads}) must be a multiple of "
                           f"llama.attention.head_count_kv ({n_kv_heads})")
    scaling = value(fields, "llama.rope.scaling.type", "none")
    if scaling != "none":
        raise MistralError(f"{source} asks for RoPE scaling {scaling!r} (llama.rope.scaling.type), which this library "
                           "does not implement")
    vocab = value(fields, "llama.vocab_size") or len(value(fields, "tokenizer.ggml.tokens", [])) or (
        tensors["token_embd.weight"].shape[0] if "token_embd.weight" in tensors else None)
    experts = value(fields, "llama.expert_count", 0)
    moe = None
    if experts:
        moe = MoeArgs(num_experts=count("expert_count"), num_experts_per_tok=count("expert_used_count"))
    def positive(key: str, default: float) -> float:
        return positive_value(float(value(fields, f"llama.{key}", default)), f"llama.{key}", source)

    return ModelArgs(dim=dim, n_layers=count("block_count"), head_dim=head_dim, hidden_dim=count("feed_forward_length"),
                     n_heads=n_heads, n_kv_heads=n_kv_heads,
                     norm_eps=positive("attention.layer_norm_rms_epsilon", 1e-5),
                     vocab_size=count_value(int(vocab or 0), "llama.vocab_size", source),
                     sliding_window=sliding_window, rope_theta=positive("rope.freq_base", 1e4), moe=moe, source=source)


def gguf_name(name: str) -> str:
    """The GGUF key of a native key: "layers.3.attention.wk.weight" -> "blk.3.attn_k.weight"."""
    return _renamed(name, _NAMES)


def plan(path: Path, shapes: dict[str, tuple[int, ...]]):
    """Native key -> its _Source (mistral/checkpoint/read.py), for the model of `shapes` (its meta state dict's), after
    checking the file holds exactly that model. A block-format tensor is planned as its rows of blocks: uint8 (N,
    row_bytes), with its type in `ggml`."""
    from mistral.checkpoint.read import _Source

    _, tensors = read(path)
    source, used, out = Path(path).name, set(), {}
    for name, shape in shapes.items():
        key, e = gguf_name(name), None
        if key not in tensors and (m := _MERGED.fullmatch(key)):  # an expert of a merged tensor
            key, e = f"{m[1]}_exps.weight", int(m[2])
        if key not in tensors:
            raise MistralError(f"{source} lacks {gguf_name(name)!r}, which the model its metadata describes needs: "
                               "the file is incomplete or of another model")
        t = tensors[key]
        used.add(key)
        want = shape if e is None else (len(t.shape) == 3 and t.shape[0], *shape)
        if t.shape != tuple(want):
            raise MistralError(f"{key!r} in {source} has shape {list(t.shape)} but its metadata implies {list(want)}: "
                               "the file does not match it")
        if t.kind in _FLOATS:
            dtype = _FLOATS[t.kind]
            rows, width, nbytes_row = math.prod(shape[:-1]), shape[-1], shape[-1] * dtype.itemsize
        elif t.kind in BLOCKS and len(shape) == 2 and shape[1] % BLOCKS[t.kind][1] == 0:
            dtype, rows, width = torch.uint8, shape[0], row_bytes(t.kind, shape[1])
            nbytes_row = width
        else:
            kind = BLOCKS.get(t.kind, (_type_name(t.kind),))[0]
            raise MistralError(f"{key!r} in {source} is stored as {kind}; this library reads F32, F16, BF16, "
                               f"{', '.join(b[0] for b in BLOCKS.values())} (for weights of a multiple of their block)")
        offset = t.offset + (0 if e is None else e * rows * nbytes_row)
        out[name] = _Source(key, t.path, offset, dtype, shape if dtype != torch.uint8 else (rows, width),
                            ggml=0 if t.kind in _FLOATS else t.kind)
    extra = [k for k in tensors if k not in used]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise MistralError(f"{source} holds {extra[0]!r}{more}, which the model its metadata describes does not have")
    return out


def _type_name(kind: int) -> str:
    try:
        from gguf import GGMLQuantizationType
        return GGMLQuantizationType(kind).name
    except ValueError:
        return f"GGML type {kind}"


# ---------------------------------------------------------------------------------------------------------
# The tokenizer a file holds

def tekken_json(path: Path) -> dict | None:
    """The tekken.json of a file whose tokenizer is tekken (tokenizer.ggml.model "gpt2", pre-tokenizer "tekken"), as
    llama.cpp's converter writes one: the special tokens first, as CONTROL tokens, then the vocabulary in rank order,
    each token's bytes spelt in GPT-2's byte-to-character alphabet (_byte_characters). The split pattern is tekken's
    own (every tekken file has the same, taken from mistral_common's). The file does not say the version, which sets
    the chat format: special tokens that are tekken v3's list (Mistral NeMo, Pixtral) are read as v3; any other list
    is refused rather than read in a format the model may not know. None for a file of another tokenizer."""
    import base64
    import json

    import mistral_common

    fields, _ = read(path)
    if value(fields, "tokenizer.ggml.model") != "gpt2" or value(fields, "tokenizer.ggml.pre") != "tekken":
        return None
    tokens, types = value(fields, "tokenizer.ggml.tokens") or [], value(fields, "tokenizer.ggml.token_type") or []
    specials = next((i for i, k in enumerate(types) if k != 3), len(types))  # the leading CONTROL tokens
    to_byte = {c: b for b, c in _byte_characters().items()}
    try:
        vocab = [{"rank": i, "token_bytes": base64.b64encode(bytes(to_byte[c] for c in t)).decode(), "token_str": None}
                 for i, t in enumerate(tokens[specials:])]
    except KeyError as e:
        raise MistralError(f"{Path(path).name}: a tekken token holds {e.args[0]!r}, outside GPT-2's byte alphabet; "
                           "put the model's tekken.json beside the file") from None
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    names = tokens[:specials]
    v3 = [getattr(t, "value", None) or t["token_str"] for t in Tekkenizer.DEPRECATED_SPECIAL_TOKENS]
    if names[: len(v3)] != v3 or not all(re.fullmatch(r"<SPECIAL_\d+>", n) for n in names[len(v3):]):
        raise MistralError(f"{Path(path).name} holds a tekken tokenizer whose special tokens are not tekken v3's, and "
                           "the file does not say its version (which sets the chat format); put the model's "
                           "tekken.json beside the file")
    data = Path(mistral_common.__file__).parent / "data"
    pattern = json.loads(next(data.glob("tekken_*.json")).read_text())["config"]["pattern"]
    return {"config": {"pattern": pattern, "num_vocab_tokens": len(vocab), "default_vocab_size": len(tokens),
                       "default_num_special_tokens": specials, "version": "v3"},
            "vocab": vocab,
            "special_tokens": [{"rank": i, "token_str": t, "is_control": True} for i, t in enumerate(names)]}


def _byte_characters() -> dict[int, str]:
    """GPT-2's alphabet: each byte as one printable character, the printable ones as themselves, the others as the
    characters from U+0100 on, in order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def sentencepiece_model(path: Path) -> bytes | None:
    """The sentencepiece model (a serialized ModelProto) of a file whose tokenizer.ggml.model is "llama", built from
    its tokens, scores and types with the settings of Mistral's own tokenizer.model files (BPE, byte fallback, identity
    normalization, a space put before the text); None for a file without one."""
    fields, _ = read(path)
    kind = value(fields, "tokenizer.ggml.model")
    if kind is None:
        return None
    if kind != "llama":
        pre = value(fields, "tokenizer.ggml.pre")
        raise MistralError(f"{Path(path).name} holds a {kind!r} tokenizer (pre-tokenizer {pre!r}), which this library "
                           "cannot rebuild; put the model's tekken.json or tokenizer.model beside the file")
    tokens, scores = value(fields, "tokenizer.ggml.tokens"), value(fields, "tokenizer.ggml.scores")
    types = value(fields, "tokenizer.ggml.token_type")
    if not tokens or len(scores or []) != len(tokens) or len(types or []) != len(tokens):
        raise MistralError(f"{Path(path).name}: tokenizer.ggml.tokens, scores and token_type must be present and as "
                           "long as each other")
    pieces = b"".join(_message(1, _string(1, t.encode()) + _float(2, s) + (b"" if k == 1 else _varint_field(3, k)))
                      for t, s, k in zip(tokens, scores, types))
    unk = value(fields, "tokenizer.ggml.unknown_token_id", next((i for i, k in enumerate(types) if k == 2), 0))
    bos, eos = value(fields, "tokenizer.ggml.bos_token_id", 1), value(fields, "tokenizer.ggml.eos_token_id", 2)
    trainer = (_varint_field(3, 2) + _varint_field(4, len(tokens)) + _varint_field(35, 1) + _varint_field(40, unk)
               + _varint_field(41, bos) + _varint_field(42, eos) + _varint_field(43, (1 << 64) - 1)  # pad: -1
               + _string(45, tokens[unk].encode()) + _string(46, tokens[bos].encode())
               + _string(47, tokens[eos].encode()))
    space, extra = (int(value(fields, f"tokenizer.ggml.{key}", default))
                    for key, default in (("add_space_prefix", True), ("remove_extra_whitespaces", False)))
    normalizer = _string(1, b"identity") + _varint_field(3, space) + _varint_field(4, extra)
    return pieces + _message(2, trainer) + _message(3, normalizer)


# Protocol buffers' wire format, as much of it as a ModelProto needs: a field is its number and wire type as a varint,
# then a varint (0), a length and bytes (2), or 4 little-endian bytes (5).

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append(n & 127 | (128 if n > 127 else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _varint_field(number: int, n: int) -> bytes:
    return _varint(number << 3) + _varint(n)


def _string(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


_message = _string


def _float(number: int, x: float) -> bytes:
    return _varint(number << 3 | 5) + struct.pack("<f", x)
