"""Model configuration. Field names are the keys of the checkpoint's params.json."""
import dataclasses
import logging
import math
from dataclasses import dataclass

from mistral.errors import MistralError

log = logging.getLogger(__name__)


# The largest value a count in a config may take: more than any model has, small enough that no arithmetic on it
# (a cache of that many positions, say) can overflow or ask the allocator for exabytes unnoticed.
_MOST = 1 << 24
# The weight formats of `python -m main quantize` and --quantize (mistral/quantize.py says what each is).
QUANTIZATIONS = ("int8", "int4")


def count_value(value, name: str, source: str) -> int:
    """A positive whole number, as JSON gives it (3, or 3.0), up to _MOST."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= _MOST:
        raise MistralError(f"{source}: {name!r} must be a whole number from 1 to {_MOST}, got {value!r}")
    return value


def positive_value(value, name: str, source: str) -> float:
    """A finite number above 0, as a float."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise MistralError(f"{source}: {name!r} must be a finite number above 0, got {value!r}")
    return float(value)


@dataclass
class MoeArgs:
    num_experts: int  # E: experts per MoE layer
    num_experts_per_tok: int  # K: experts each token is routed to

    def __post_init__(self):
        self.num_experts = count_value(self.num_experts, "moe.num_experts", "params.json")
        self.num_experts_per_tok = count_value(self.num_experts_per_tok, "moe.num_experts_per_tok", "params.json")
        if self.num_experts_per_tok > self.num_experts:
            raise MistralError(f"params.json: moe.num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 "
                               f"and moe.num_experts ({self.num_experts})")


@dataclass
class ModelArgs:
    dim: int
    n_layers: int
    head_dim: int
    hidden_dim: int
    n_heads: int
    n_kv_heads: int
    norm_eps: float
    vocab_size: int
    # None: full causal attention (no window), and the cache must hold the whole sequence. A list: each layer's own
    # window (None: that layer attends to everything), the pattern repeated over the layers, as mistral-inference 1.5
    # reads it: [4096, None] is a window of 4096 in layers 0, 2, 4, ... and full attention in 1, 3, 5, ...
    sliding_window: int | list[int | None] | None = None
    # None: 1e4 when sliding_window is set (Mistral 7B v0.1), else 1e6 (Mixtral, later Mistrals).
    rope_theta: float | None = None
    # None: a dense SwiGLU feed-forward in every layer; set: a sparse mixture of experts instead.
    moe: MoeArgs | None = None
    # None: the weights are floats, as released. "int8" or "int4": a folder `python -m main quantize` wrote, whose
    # linear weights are int8 with one fp32 scale per output feature, or 4 bits with one fp16 scale per 32 weights,
    # under "<name>.weight" and "<name>.scales" (mistral/quantize.py).
    quantization: str | None = None
    # Not a key: the file the values come from, for messages (config.json for a Hugging Face folder).
    source: dataclasses.InitVar[str] = "params.json"

    def __post_init__(self, source: str):
        """Checks every value once, here, and gives it its type: a config that passes runs (the numbers in a forward
        stay finite for finite weights)."""
        if isinstance(self.moe, dict):
            self.moe = _build(MoeArgs, self.moe, f"{source} 'moe'")
        if self.moe is not None and not isinstance(self.moe, MoeArgs):
            raise MistralError(f"{source}: 'moe' must be an object with num_experts and num_experts_per_tok, "
                               f"got {self.moe!r}")
        for name in ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "vocab_size"):
            setattr(self, name, count_value(getattr(self, name), name, source))
        if self.n_heads % self.n_kv_heads:
            raise MistralError(f"{source}: n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                               f"({self.n_kv_heads})")
        if self.head_dim % 2:
            raise MistralError(f"{source}: 'head_dim' must be even (RoPE rotates channel pairs), got {self.head_dim}")
        self.norm_eps = positive_value(self.norm_eps, "norm_eps", source)
        if isinstance(self.sliding_window, list):
            pattern = self.sliding_window
            if not pattern or self.n_layers % len(pattern):
                raise MistralError(f"{source}: 'sliding_window' as a list holds a pattern of windows repeated over the "
                                   f"layers, so its length must divide n_layers ({self.n_layers}), got {len(pattern)}")
            self.sliding_window = [None if w is None else count_value(w, "sliding_window", source) for w in pattern]
        elif self.sliding_window is not None:
            self.sliding_window = count_value(self.sliding_window, "sliding_window", source)
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise MistralError(f"{source}: 'quantization' is {self.quantization!r}; this library reads "
                               f"{' or '.join(map(repr, QUANTIZATIONS))} (or none)")
        if self.rope_theta is None:
            self.rope_theta = 1e4 if self.sliding_window is not None else 1e6
            log.info("%s has no rope_theta: using %g (sliding_window is %s)", source, self.rope_theta,
                     self.sliding_window)
        self.rope_theta = positive_value(self.rope_theta, "rope_theta", source)

    @property
    def windows(self) -> list[int | None]:
        """Each layer's window (None: full attention)."""
        if isinstance(self.sliding_window, list):
            return self.sliding_window * (self.n_layers // len(self.sliding_window))
        return [self.sliding_window] * self.n_layers

    @property
    def mixed_windows(self) -> bool:
        """Whether layers have windows of their own (Ministral's sliding layers beside full-attention ones), each then
        keeping a cache of its window."""
        return len(set(self.windows)) > 1

    @property
    def narrowest(self) -> int | None:
        """The narrowest layer's window, around which rows wrap first (None: every layer attends to everything)."""
        return min((w for w in self.windows if w is not None), default=None)

    @property
    def window(self) -> int | None:
        """The cache's window: the widest layer's, which every row of the cache holds (None: a layer attends to
        everything, so the cache holds every position). A narrower layer masks what its window leaves out."""
        return None if None in self.windows else max(self.windows)

    @classmethod
    def from_dict(cls, params: dict, source: str = "params.json") -> "ModelArgs":
        return _build(cls, params, source, source=source)


# Keys that real params.json files carry but that do not describe the network. "lora" (mistral-finetune's rank and
# scaling) describes an adapter, which --lora merges (mistral/checkpoint/lora.py reads its scaling there).
_IGNORED_KEYS = {"max_batch_size", "max_seq_len", "max_position_embeddings", "model_type", "lora"}


def _build(cls, params: dict, where: str, **extra):
    if not isinstance(params, dict):
        raise MistralError(f"{where} must be a JSON object, got {type(params).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    required = [n for n, f in fields.items() if f.default is dataclasses.MISSING]
    missing = [n for n in required if n not in params]
    if missing:
        raise MistralError(f"{where} is missing {', '.join(repr(m) for m in missing)}; it needs {', '.join(required)}")
    unknown = sorted(set(params) - set(fields) - _IGNORED_KEYS)
    if unknown:
        raise MistralError(
            f"{where} has keys this library does not implement: {', '.join(unknown)}; "
            "remove them if they do not change the architecture"
        )
    return cls(**{k: v for k, v in params.items() if k in fields}, **extra)
