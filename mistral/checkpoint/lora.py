"""LoRA adapters, merged into the weights as they are read: W + scaling B A, before any quantization, so that a tuned
model runs exactly as fast as its base (int8, int4, bf16 alike).

Two forms are read:
- mistral-finetune's `lora.safetensors`: native keys, `layers.{i}.attention.wq.lora_A.weight` (A: r x in-features)
  and `...lora_B.weight` (B: out-features x r), for w{q,k,v,o} and the feed-forward's w{1,2,3} (each expert of a
  mixture: `feed_forward.experts.{e}.w1`). scaling is 2.0 (mistral-finetune's), unless the base folder's
  params.json has a `lora` section that gives `scaling` (and `rank`, then checked).
- a PEFT adapter folder: `adapter_config.json` (r, lora_alpha; scaling lora_alpha / r, or / sqrt(r) with use_rslora)
  and `adapter_model.safetensors`, with HF's names. HF keeps wq's and wk's rows in its own RoPE order
  (mistral/checkpoint/hf.py), so B's rows (the rows of B A) are put back in ours, as the HF loader does for W.

Everything is checked before any weight is read, and what does not match (a key, a shape, a rank, a base of another
size) is refused in one line naming it.
"""
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mistral.args import ModelArgs
from mistral.checkpoint.hf import from_hf_rope_order, hf_name, rope_heads
from mistral.errors import MistralError

_KEY = re.compile(r"(?P<base>.+)\.lora_(?P<which>[AB])\.weight")
# The weights an adapter may change: attention's four and the feed-forward's three, of each expert of a mixture.
_TARGETS = re.compile(r"layers\.\d+\.(attention\.w[qkvo]|feed_forward\.(experts\.\d+\.)?w[123])\.weight")


@dataclass(frozen=True)
class Adapter:
    path: Path
    scaling: float
    rank: int
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]  # native weight name -> (A (r, K), B (N, r)), B in our order

    def delta(self, name: str) -> torch.Tensor | None:
        """What the adapter adds to weight `name`: scaling B A, (N, K) fp32; None for a weight it leaves alone."""
        if name not in self.pairs:
            return None
        A, B = self.pairs[name]
        return (B.double() @ A.double()).mul_(self.scaling).float()


def read(path: Path | str, folder: Path, args: ModelArgs, shapes: dict[str, tuple[int, ...]]) -> Adapter:
    """The adapter at path for the model of `folder` (args; shapes: its state dict's), every key and shape checked."""
    path = Path(path)
    if path.is_dir():
        weights, scaling, rank, native = _peft(path, shapes)
    elif path.is_file():
        weights, scaling, rank, native = path, 2.0, None, (lambda key: key if key in shapes else None)
        params = folder / "params.json"
        section = json.loads(params.read_text()).get("lora") if params.is_file() else None
        if isinstance(section, dict):
            scaling = float(section.get("scaling", scaling))
            rank = section.get("rank")
    else:
        raise MistralError(f"--lora {path}: no such file or folder (a lora.safetensors, or a PEFT adapter folder)")
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise MistralError(f"--lora {weights}: not a readable safetensors file ({e})") from None
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.fullmatch(key)
        if m is None:
            raise MistralError(f"{weights.name} holds {key!r}, which is not a LoRA weight (NAME.lora_A.weight or "
                               "NAME.lora_B.weight)")
        name = native(m["base"] + ".weight")
        if name is None or not _TARGETS.fullmatch(name):
            raise MistralError(f"{weights.name} holds {key!r}, which matches no attention or feed-forward weight of "
                               f"this model ({args.n_layers} layers{_experts(args)}): an adapter for another model?")
        halves.setdefault(name, {})[m["which"]] = t
    pairs = {}
    for name, ab in halves.items():
        if set(ab) != {"A", "B"}:
            has = next(iter(ab))
            raise MistralError(f"{weights.name} has lora_{has} of {name!r} but not its "
                               f"lora_{'B' if has == 'A' else 'A'}")
        A, B = ab["A"], ab["B"]
        N, K = shapes[name]
        if A.ndim != 2 or B.ndim != 2 or A.shape[1] != K or B.shape[0] != N or A.shape[0] != B.shape[1]:
            raise MistralError(f"{weights.name}: {name!r} is {N} x {K} here, but its lora_A is {list(A.shape)} and "
                               f"lora_B {list(B.shape)} (they must be r x {K} and {N} x r): an adapter for another "
                               "model?")
        if rank is None:
            rank = A.shape[0]
        if A.shape[0] != rank:
            raise MistralError(f"{weights.name}: {name!r} has rank {A.shape[0]}, not the adapter's {rank}")
        heads = rope_heads(name, args) if path.is_dir() else 0
        pairs[name] = (A, from_hf_rope_order(B, heads) if heads else B)
    if not pairs:
        raise MistralError(f"{weights.name} holds no LoRA weights")
    return Adapter(path, scaling, rank, pairs)


def _peft(folder: Path, shapes: dict[str, tuple[int, ...]]):
    """A PEFT adapter folder: (its weights file, scaling, rank, HF key -> native name or None)."""
    config_path, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config_path.is_file() or not weights.is_file():
        raise MistralError(f"--lora {folder}: a folder must hold adapter_config.json and adapter_model.safetensors "
                           "(a PEFT adapter); mistral-finetune's adapter is the file lora.safetensors itself")
    try:
        config = json.loads(config_path.read_text())
        r, alpha = config["r"], config["lora_alpha"]
        assert isinstance(r, int) and r > 0 and isinstance(alpha, (int, float)) and not isinstance(alpha, bool)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise MistralError(f"{config_path}: needs r (a whole number > 0) and lora_alpha (a number)") from None
    for unsupported in ("rank_pattern", "alpha_pattern", "use_dora"):
        if config.get(unsupported):
            raise MistralError(f"{config_path}: {unsupported} is not supported here (one rank and alpha for all, no "
                               "DoRA)")
    to_native = {hf_name(n): n for n in shapes if _TARGETS.fullmatch(n)}
    scaling = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
    return weights, scaling, r, lambda key: to_native.get(key.removeprefix("base_model.model."))


def _experts(args: ModelArgs) -> str:
    return f", {args.moe.num_experts} experts each" if args.moe is not None else ""
