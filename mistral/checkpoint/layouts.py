"""Which layout a model folder holds, the model its config describes, and its weight files."""
import json
import re
from pathlib import Path

from mistral.args import ModelArgs
from mistral.checkpoint import gguf
from mistral.checkpoint.hf import args_from_hf_config
from mistral.errors import MistralError

_NATIVE_PATTERNS = ("consolidated.safetensors", "consolidated-*-of-*.safetensors", "consolidated.00.pth")
_HF_PATTERNS = ("model.safetensors", "model-*-of-*.safetensors")
# What mistral.tokenizer reads, in either layout.
TOKENIZER_FILES = ("tekken.json", "tokenizer.model", "tokenizer.model.v*")


def layout(folder: Path) -> str:
    """"native", "hf" or "gguf" (a .gguf file, or a folder holding one and no params.json or config.json).
    params.json wins when its weights are there too: some downloads carry both layouts."""
    folder = Path(folder)
    if gguf.is_gguf(folder):
        return "gguf"
    if folder.exists() and not folder.is_dir():
        raise MistralError(f"{str(folder)!r} is a file; give the model folder that holds it, or a .gguf file")
    if not folder.is_dir():
        raise MistralError(f"model folder {str(folder)!r} does not exist")
    has_params, has_config = (folder / "params.json").is_file(), (folder / "config.json").is_file()
    if has_params and (not has_config or any(any(folder.glob(p)) for p in _NATIVE_PATTERNS)):
        return "native"
    if has_config:
        return "hf"
    raise MistralError(f"{folder} has no params.json or config.json; a model folder holds one of them, "
                       "the weights and a tokenizer")


def read_args(folder: Path, sliding_window: int | None = None) -> ModelArgs:
    """The model a folder describes, from params.json or, for a Hugging Face folder, config.json; for a GGUF file
    from its metadata, with sliding_window as the window (the file has none)."""
    folder = Path(folder)
    kind = layout(folder)
    if kind == "gguf":
        return gguf.read_args(folder, sliding_window)
    if sliding_window is not None:
        raise MistralError(f"--sliding_window is for GGUF files, which hold no window; {folder} says its own")
    path = folder / ("params.json" if kind == "native" else "config.json")
    try:
        params = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MistralError(f"{path} is not valid JSON ({e}); restore it from the original download") from None
    if kind == "native":
        return ModelArgs.from_dict(params, str(path))
    return args_from_hf_config(params, str(path))


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
