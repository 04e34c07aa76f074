"""New model folders, each written whole or not at all: convert (to the native or the HF layout) and quantize (to
int8 or int4 weights)."""
import dataclasses
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

from mistral.args import QUANTIZATIONS
from mistral.checkpoint import gguf
from mistral.checkpoint.hf import hf_config_from_args, hf_name, rope_heads, to_hf_rope_order
from mistral.checkpoint.layouts import TOKENIZER_FILES, layout, read_args
from mistral.checkpoint.read import (_CHUNK_BYTES, _QUANTIZED, _SAFETENSORS_NAMES, _Source, _adapter, _bytes,
                                     _meta_state, _plan, _progress, _quantized, _read)
from mistral.errors import MistralError
from mistral.tokenizer import Tokenizer

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


# What a Hugging Face folder carries beside the weights for transformers' tokenizer and generate: copied along, so a
# converted folder keeps them, although this library reads only TOKENIZER_FILES.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def _check_tokenizer(src: Path) -> None:
    """Refuse, before writing anything, a folder whose copy no command could load: Hugging Face's tokenizer.json alone,
    without the tokenizer this library reads."""
    ours = any(any(src.glob(name)) for name in TOKENIZER_FILES)
    if not ours and (src / "tokenizer.json").is_file():
        raise MistralError(f"{src} has only tokenizer.json, a Hugging Face tokenizer, which this library does not "
                           "read, so no command could load what this writes; copy in the tekken.json or "
                           "tokenizer.model.vN of the model it was made from first")


def _copy_tokenizers(src: Path, dst: Path) -> None:
    if layout(src) == "gguf":  # the file beside it, or the one built from the file's own (mistral/tokenizer.py)
        tokenizer = Tokenizer.from_folder(src)
        if tokenizer.path.is_file() and tokenizer.path.suffix != ".gguf":
            shutil.copyfile(tokenizer.path, dst / tokenizer.path.name)
        elif (tekken := gguf.tekken_json(src)) is not None:
            (dst / "tekken.json").write_text(json.dumps(tekken))
        else:
            name = "tokenizer.model" if tokenizer.version == "v1" else f"tokenizer.model.{tokenizer.version}"
            (dst / name).write_bytes(tokenizer.sentencepiece_model)
        return
    for name in (*TOKENIZER_FILES, *HF_TOKENIZER_FILES):
        for path in src.glob(name):
            shutil.copyfile(path, dst / path.name)


def convert(src: Path | str, dst: Path | str, to: str = "native", lora: Path | str | None = None) -> Path:
    """Write the model in folder src to the new folder dst, in layout `to`: "native" or "hf".

    native: params.json + consolidated.safetensors. hf: config.json + model.safetensors that transformers'
    MistralForCausalLM / MixtralForCausalLM.from_pretrained loads. The tokenizer files are copied along. Tensors
    keep their stored dtype and pass through memory one at a time. src may be a GGUF file: its block-format matrices
    are dequantized to bf16 (a block of rows at a time), and its tokenizer written as tokenizer.model[.vN]. lora: a
    LoRA adapter (mistral/checkpoint/lora.py) merged into the weights it changes, which keep their stored dtype.
    """
    src, dst = Path(src), Path(dst)
    if to not in ("native", "hf"):
        raise MistralError(f"unknown target layout {to!r}; use native or hf")
    args = read_args(src)
    _check_tokenizer(src)
    if layout(src) == "gguf":
        Tokenizer.from_folder(src)  # refused now, not after the weights are written, if it cannot be rebuilt
    if to == "hf" and args.quantization is not None:
        raise MistralError(f"{src} holds {args.quantization} weights, which transformers' Mistral models do not "
                           "read; convert the float folder it was made from")
    plan = _plan(src, args)
    adapter = _adapter(lora, src, args, plan)
    cpu = torch.device("cpu")

    def read(name: str, source: _Source) -> torch.Tensor:
        return _read(source, cpu, source.weights[1], progress, delta=adapter.delta(name) if adapter else None)

    with _new_folder(dst) as tmp, _progress(sum(s.nbytes for s in plan.values()), f"converting {src.name}") as progress:
        if to == "native":
            params = {k: v for k, v in asdict(args).items() if v is not None}
            (tmp / "params.json").write_text(json.dumps(params, indent=2) + "\n")
            tensors = {n: (*reversed(s.weights), lambda s=s, n=n: read(n, s)) for n, s in plan.items()}
            _write_safetensors(tmp / "consolidated.safetensors", tensors)
        else:
            config = hf_config_from_args(args, plan["tok_embeddings.weight"].weights[1])
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")

            def hf_order(name: str, source: _Source, heads: int) -> torch.Tensor:
                t = read(name, source)
                return to_hf_rope_order(t, heads) if heads else t

            tensors = {hf_name(n): (*reversed(s.weights), lambda s=s, n=n: hf_order(n, s, rope_heads(n, args)))
                       for n, s in plan.items()}
            _write_safetensors(tmp / "model.safetensors", tensors)
        _copy_tokenizers(src, tmp)
    return dst


def quantize(src: Path | str, dst: Path | str, to: str = "int8", lora: Path | str | None = None) -> Path:
    """Write the model in folder src (native or HF) to the new native folder dst with int8 (or int4) linear weights,
    which every command then loads without quantizing again: params.json says "quantization": "int8" (or "int4"), and
    consolidated.safetensors holds each linear's "<name>.weight" and "<name>.scales" (int8 and fp32 (N,); for int4,
    two weights a byte, uint8 (N, G * 16), and fp16 (N, G), G groups of 32 a row: mistral/quantize.py says how they
    are made) beside the other tensors as stored. Each weight is quantized a block of rows at a time, as it is read.
    src may be a GGUF file: a Q4_0 matrix becomes int4 unchanged, one of another block format is dequantized first.
    lora: a LoRA adapter (mistral/checkpoint/lora.py) merged into the weights before they are quantized."""
    src, dst = Path(src), Path(dst)
    if to not in QUANTIZATIONS:
        raise MistralError(f"unknown quantization {to!r}; the choices are {' and '.join(QUANTIZATIONS)}")
    args = read_args(src)
    _check_tokenizer(src)
    if layout(src) == "gguf":
        Tokenizer.from_folder(src)
    if args.quantization is not None:
        raise MistralError(f"{src} holds {args.quantization} weights already")
    plan = _plan(src, args)
    adapter = _adapter(lora, src, args, plan)
    quantized = dataclasses.replace(args, quantization=to)
    cpu, staging, made = torch.device("cpu"), torch.empty(_CHUNK_BYTES, dtype=torch.uint8), {}
    with _new_folder(dst) as tmp, _progress(sum(s.nbytes for s in plan.values()), f"quantizing {src.name}") as progress:
        def weight(name: str) -> torch.Tensor:
            delta = adapter.delta(name) if adapter is not None else None
            q, made[name.removesuffix("weight") + "scales"] = _quantized(plan[name], cpu, progress, staging, to, delta)
            return q

        tensors = {}
        for name, like in _meta_state(quantized).items():
            if like.dtype in _QUANTIZED:
                tensors[name] = (like.dtype, tuple(like.shape), lambda name=name: weight(name))
            elif name.endswith(".scales"):
                tensors[name] = (like.dtype, tuple(like.shape), lambda name=name: made.pop(name))
            else:
                source = plan[name]
                tensors[name] = (*reversed(source.weights), lambda s=source: _read(s, cpu, s.weights[1], progress))
        params = {k: v for k, v in asdict(quantized).items() if v is not None}
        (tmp / "params.json").write_text(json.dumps(params, indent=2) + "\n")
        _write_safetensors(tmp / "consolidated.safetensors", tensors)
        _copy_tokenizers(src, tmp)
    return dst
