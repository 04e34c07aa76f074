"""Reading model folders: config, devices and dtypes, and weights, with errors a person can act on."""
import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from mistral.args import ModelArgs
from mistral.errors import MistralError

log = logging.getLogger(__name__)

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
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MistralError(f"device {str(device)!r} was asked for but CUDA is not available here; use --device cpu")
    return device


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """None or "auto": bf16 on cuda, fp32 on cpu. Refuses what the device cannot run at a usable speed."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise MistralError(f"unknown dtype {dtype!r}; use auto, fp32, bf16 or fp16")
        dtype = DTYPES[dtype]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise MistralError(f"dtype {dtype} is not supported; use fp32, bf16 or fp16")
    if device.type == "cpu" and dtype == torch.float16:
        raise MistralError("fp16 on CPU runs through a scalar fallback hundreds of times slower than fp32; use fp32 or bf16")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise MistralError(f"this GPU ({torch.cuda.get_device_name(device)}) has no bf16; use --dtype fp16 or fp32")
    return dtype


def read_args(folder: Path) -> ModelArgs:
    if not folder.is_dir():
        raise MistralError(f"model folder {str(folder)!r} does not exist")
    path = folder / "params.json"
    if not path.is_file():
        raise MistralError(f"{folder} has no params.json; a model folder holds params.json, the weights and tokenizer.model")
    try:
        params = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MistralError(f"{path} is not valid JSON ({e}); restore it from the original download") from None
    return ModelArgs.from_dict(params, str(path))


def pipeline_rank(num_pipeline_ranks: int) -> int:
    """This process's rank, after checking that the process group has exactly num_pipeline_ranks ranks."""
    if not dist.is_initialized():
        raise MistralError(f"num_pipeline_ranks={num_pipeline_ranks} needs one process per rank: "
                           f"run under torchrun --nproc-per-node {num_pipeline_ranks}")
    if dist.get_world_size() != num_pipeline_ranks:
        raise MistralError(f"num_pipeline_ranks={num_pipeline_ranks} but torchrun started {dist.get_world_size()} "
                           "processes; make --nproc-per-node and --num_pipeline_ranks equal")
    return dist.get_rank()


def weight_files(folder: Path) -> list[Path]:
    for pattern in ("consolidated.safetensors", "consolidated-*-of-*.safetensors", "consolidated.00.pth"):
        files = sorted(folder.glob(pattern))
        if files:
            if pattern.endswith(".pth") and (folder / "consolidated.01.pth").exists():
                raise MistralError(f"{folder} holds tensor-parallel shards consolidated.0N.pth, which this library "
                                   "does not merge; use the single-file or safetensors download")
            return files
    raise MistralError(f"{folder} has no weights: expected consolidated.safetensors, "
                       "consolidated-0000i-of-0000N.safetensors or consolidated.00.pth")


class _Reader:
    """Name -> tensor access over the weight files of a folder, reading a tensor only when asked."""

    def __init__(self, files: list[Path]):
        self.where: dict[str, object] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for path in files:
            if path.suffix == ".pth":
                try:
                    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
                except Exception as e:
                    raise MistralError(f"cannot read {path}: {e}") from None
                for name, t in state.items():
                    self.where[name], self.shapes[name] = (path, state), tuple(t.shape)
            else:
                from safetensors import SafetensorError, safe_open
                try:
                    handle = safe_open(path, framework="pt", device="cpu")
                except (SafetensorError, OSError) as e:
                    raise MistralError(f"cannot read {path}: {e}") from None
                for name in handle.keys():
                    self.where[name], self.shapes[name] = (path, handle), tuple(handle.get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        _, source = self.where[name]
        return source[name] if isinstance(source, dict) else source.get_tensor(name)

    def file(self, name: str) -> str:
        return self.where[name][0].name


def check_keys(reader: _Reader, expected: dict[str, tuple[int, ...]], folder: Path) -> None:
    """The checkpoint must hold exactly the tensors of the model params.json describes, shape for shape."""
    missing = [k for k in expected if k not in reader.shapes]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MistralError(f"the weights in {folder} lack {missing[0]!r}{more}: they do not match params.json")
    extra = [k for k in reader.shapes if k not in expected]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise MistralError(f"the weights in {folder} hold {extra[0]!r}{more}, which the model in params.json does "
                           "not have: they do not match params.json")
    for name, shape in expected.items():
        if reader.shapes[name] != shape:
            raise MistralError(f"{name!r} in {reader.file(name)} has shape {list(reader.shapes[name])} but params.json "
                               f"implies {list(shape)}: the weights do not match params.json")


def load_weights(folder: Path, args: ModelArgs, wanted: dict[str, torch.Tensor], device: torch.device,
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Read the tensors named in `wanted` (this rank's state dict), each converted on its own to dtype."""
    from mistral.model import Transformer

    reader = _Reader(weight_files(folder))
    with torch.device("meta"):
        full = Transformer(args)
    check_keys(reader, {k: tuple(v.shape) for k, v in full.state_dict().items()}, folder)
    return {name: reader.get(name).to(device=device, dtype=dtype) for name in wanted}
