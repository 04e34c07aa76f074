"""The model of a folder, ready to run: built on the meta device, weighed against the memory available, and only then
given its weights."""
import mmap
from pathlib import Path

import torch

from mistral import ggml, grouped, pipeline, quantize as formats
from mistral.args import QUANTIZATIONS, ModelArgs
from mistral.checkpoint.layouts import read_args
from mistral.checkpoint.lora import Adapter
from mistral.checkpoint.read import (_CHUNK_BYTES, _QUANTIZED, _Source, _adapter, _mapped, _on_meta, _plan, _progress,
                                     _q4_0_as_int4, _quantized, _read)
from mistral.device import resolve_device, resolve_dtype
from mistral.errors import MistralError
from mistral.memory import Memory, gb, memory_available
from mistral.model import Transformer


def _stored_dtype(plan: dict[str, _Source]) -> torch.dtype:
    """The float dtype that holds most of the weights' bytes (a quantized folder's scales aside)."""
    total: dict[torch.dtype, int] = {}
    for name, source in plan.items():
        if source.dtype.is_floating_point and not name.endswith(".scales"):
            total[source.dtype] = total.get(source.dtype, 0) + source.nbytes
    return max(total, key=total.get)


def load_weights(folder: Path, args: ModelArgs, wanted: dict[str, torch.Tensor], device: torch.device,
                 plan: dict[str, _Source] | None = None,
                 adapter: Adapter | None = None) -> dict[str, torch.Tensor]:
    """Read the tensors named in `wanted` (this rank's state dict on the meta device, in the dtypes its modules keep).

    A tensor kept as stored is mapped from its file on a CPU; one of another dtype is converted _CHUNK_BYTES at a
    time; an int8 weight the file has as floats is quantized as it is read, its scales with it. The whole folder is
    checked against `args` first, but only the wanted tensors are read: under pipeline parallelism each rank reads
    its own layers. adapter: a LoRA adapter (mistral/checkpoint/lora.py), merged into each weight it changes as that
    weight is read, before it is quantized.
    """
    folder = Path(folder)
    plan = _plan(folder, args) if plan is None else plan
    staging = torch.empty(_CHUNK_BYTES, dtype=torch.uint8)
    maps: dict[Path, mmap.mmap] = {}

    def as_stored(name: str) -> bool:
        source = plan[name]
        return (device.type == "cpu" and wanted[name].dtype == source.dtype and wanted[name].shape == source.shape
                and not source.rope_heads and (adapter is None or name not in adapter.pairs))

    def delta(name: str) -> torch.Tensor | None:
        return adapter.delta(name) if adapter is not None else None

    out = {}
    to_read = sum(plan[n].nbytes for n in wanted if n in plan and not as_stored(n))
    with _progress(to_read, f"loading {folder.name}") as progress:
        for name, like in wanted.items():
            if name not in plan:  # the scales of a weight quantized while loading: made with it, below
                assert name.endswith(".scales"), name
                continue
            if plan[name].ggml == ggml.TYPES["Q4_0"] and not as_stored(name):  # a GGUF's Q4_0 matrix as int4
                out[name], out[name.removesuffix("weight") + "scales"] = _q4_0_as_int4(plan[name], device, progress,
                                                                                       staging)
            elif like.dtype in _QUANTIZED and plan[name].dtype != like.dtype:
                out[name], out[name.removesuffix("weight") + "scales"] = _quantized(
                    plan[name], device, progress, staging, _QUANTIZED[like.dtype], delta(name))
            elif as_stored(name):
                out[name] = _mapped(plan[name], maps)
            else:
                out[name] = _read(plan[name], device, like.dtype, progress, staging, delta(name))
    return out


def _block_modules(model: Transformer, plan: dict[str, _Source]) -> None:
    """A GGUF file's block-format matrices, as the model keeps them (in place, on the meta device): each linear becomes
    a GgmlLinear of the rows of blocks as stored, or an Int4Linear for Q4_0 (the same weights); the token embedding a
    GgmlEmbedding."""
    def meta(shape, dtype):
        return torch.empty(shape, dtype=dtype, device="meta")

    for prefix, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            source = plan.get(f"{prefix}.{name}.weight" if prefix else f"{name}.weight")
            if source is None or not source.ggml:
                continue
            if name == "tok_embeddings":
                setattr(module, name, ggml.GgmlEmbedding(meta(source.shape, torch.uint8), source.ggml, model.args.dim))
                continue
            K = child.weight.shape[1]
            if source.ggml == ggml.TYPES["Q4_0"]:
                packed, scales = formats.int4_shapes(source.shape[0], K)
                setattr(module, name, formats.Int4Linear(meta(packed, torch.uint8), meta(scales, torch.float16), K))
            else:
                setattr(module, name, ggml.GgmlLinear(meta(source.shape, torch.uint8), source.ggml, K))


def _checked_args(folder: Path, device: torch.device, quantize: str | None,
                  sliding_window: int | None = None) -> ModelArgs:
    """The folder's model, after refusing what the run cannot have: an unknown quantize, or any on CUDA (int8 and int4
    are CPU formats), before the folder is read; then a quantize other than the folder's own, or its quantized weights
    on CUDA."""
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise MistralError(f"unknown quantize {quantize!r}; the choices are {' and '.join(QUANTIZATIONS)} (or leave "
                           "it out)")
    if quantize is not None and device.type == "cuda":
        raise MistralError(f"--quantize {quantize} is a CPU format: on CUDA every product would widen its weights back "
                           "to float, slower than bf16, and the whole model would reach the GPU before being "
                           "quantized; leave out --quantize (CUDA runs bf16, or fp16 before Ampere)")
    args = read_args(folder, sliding_window)
    if args.quantization is not None and quantize not in (None, args.quantization):
        raise MistralError(f"{folder} holds {args.quantization} weights already; leave out --quantize")
    if args.quantization is not None and device.type == "cuda":
        raise MistralError(f"{folder} holds {args.quantization} weights, a CPU format: on CUDA every product would "
                           "widen them back to float, slower than bf16; load the folder it was made from, or run this "
                           "one with --device cpu")
    return args


def _refusal(need: Memory, free: int, device: torch.device, others: list[tuple[str, int]],
             shrinks_cache: str) -> MistralError:
    """The one line that refuses a run needing `need` where `free` bytes are available: it names each of `others`
    (a flag, and the bytes the run would need with it) that would fit, and the cache when it is a large share (as
    what `shrinks_cache` does)."""
    fits = [f"{flag} needs {gb(total)}" for flag, total in others if total <= free]
    if need.cache > need.weights / 4:
        fits.append(f"{shrinks_cache} would shrink the cache ({gb(need.cache)})")
    return MistralError(f"this run needs about {gb(need.total)} ({need}) but {gb(free)} is available on "
                        f"{device.type}: {'; '.join(fits) or 'no option of this library fits it here'}")


def load_model(folder: Path | str, max_batch_size: int = 1, num_pipeline_ranks: int = 1,
               device: torch.device | str | None = None, dtype: torch.dtype | str | None = None,
               quantize: str | None = None, cache_slots: int = 0, prefill_tokens: int = 512,
               shrinks_cache: str = "fewer rows or a shorter run", sliding_window: int | None = None,
               lora_path: Path | str | None = None) -> Transformer:
    """The model of a native or Hugging Face folder, ready to run.

    device: cuda when available, else cpu. dtype: on CUDA the activations' and weights' (auto: bf16); on a CPU the
    weights' (auto: as stored, so a bf16 checkpoint stays bf16 in memory), while activations and arithmetic are fp32
    there whatever the weights (no CPU here has bf16 arithmetic at speed). quantize="int8" or "int4": linear weights
    in that format (mistral/quantize.py), quantized from the file one block of rows at a time; a folder `quantize`
    wrote is quantized already. Weights kept as
    stored are mapped from the file. Under pipeline parallelism each rank builds and reads only its own layers.

    Before any weight is read, what the run will need (the weights as they will be kept, a cache of cache_slots
    per row for max_batch_size rows, and the work space of pre-filling prefill_tokens at a time) is compared with
    the memory available, and a run that cannot fit is refused in one line that says what would (shrinks_cache: what
    the caller can do to shrink the cache, said where the cache is a large share of the need).

    A GGUF file (or a folder holding one) loads too: its block-format matrices are kept as stored (mistral/ggml.py),
    and it runs with full attention unless sliding_window gives a window (the file holds none).

    lora_path: a LoRA adapter (mistral-finetune's lora.safetensors, or a PEFT folder: mistral/checkpoint/lora.py),
    merged into the weights as they are read, before quantize; checked against the model before any weight is read.
    """
    folder, device = Path(folder), resolve_device(device)
    args = _checked_args(folder, device, quantize, sliding_window)
    plan = _plan(folder, args)
    blocks = {ggml.BLOCKS[s.ggml][0] for s in plan.values() if s.ggml}
    if blocks and quantize is not None:
        raise MistralError(f"{folder.name} holds {' and '.join(sorted(blocks))} weights, quantized already; leave out "
                           "--quantize")
    adapter = _adapter(lora_path, folder, args, plan)
    dtype = resolve_dtype(dtype, device, stored=_stored_dtype(plan))
    rank = 0
    if num_pipeline_ranks > 1:
        rank = pipeline.pipeline_rank(num_pipeline_ranks)
        if device.type == "cuda":
            device = pipeline.rank_gpu(device, rank)
    compute = torch.float32 if device.type == "cpu" else dtype

    def built(dtype: torch.dtype, quantize: str | None) -> Transformer:
        linears = args.quantization or quantize or ("bf16" if compute != dtype else "float")
        with _on_meta():
            model = Transformer(args, rank, num_pipeline_ranks, max_batch_size)
        model = formats.prepare(model, linears, embeddings=dtype, compute=compute)
        if blocks:
            _block_modules(model, plan)
        return model

    model = built(dtype, quantize)
    group = args.moe is not None and grouped.fused(device, dtype)  # routing with no host read (mistral/grouped.py)
    need = Memory.of(model, compute, cache_slots, prefill_tokens, group)
    free = memory_available(device)
    if need.total > free:
        others = [(flag, Memory.of(built(*how), compute, cache_slots, prefill_tokens, group).total)
                  for flag, how in (("--dtype bf16", (torch.bfloat16, None)),
                                    *((f"--quantize {q}", (dtype, q)) for q in QUANTIZATIONS))
                  if how != (dtype, quantize) and args.quantization is None]
        raise _refusal(need, free, device, others, shrinks_cache)
    model.load_state_dict(load_weights(folder, args, model.state_dict(), device, plan, adapter), assign=True,
                          strict=True)
    if group:
        grouped.group_experts(model)
    return model.eval()
