"""Model configuration. Field names are the keys of the checkpoint's params.json."""
import dataclasses
import logging
from dataclasses import dataclass

from mistral.errors import MistralError

log = logging.getLogger(__name__)


@dataclass
class MoeArgs:
    num_experts: int  # E: experts per MoE layer
    num_experts_per_tok: int  # K: experts each token is routed to


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
    # None: full causal attention (no window), and the cache must hold the whole sequence.
    sliding_window: int | None = None
    # None: 1e4 when sliding_window is set (Mistral 7B v0.1), else 1e6 (Mixtral, later Mistrals).
    rope_theta: float | None = None
    # None: a dense SwiGLU feed-forward in every layer; set: a sparse mixture of experts instead.
    moe: MoeArgs | None = None
    # None: the weights are floats, as released. "int8": a folder `python -m main quantize` wrote, whose linear weights
    # are int8 with one fp32 scale per output feature, under "<name>.weight" and "<name>.scales" (mistral/quantize.py).
    quantization: str | None = None

    def __post_init__(self):
        if isinstance(self.moe, dict):
            self.moe = _build(MoeArgs, self.moe, "params.json 'moe'")
        for name in ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise MistralError(f"params.json: '{name}' must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise MistralError(
                f"params.json: n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise MistralError(f"params.json: 'sliding_window' must be a positive integer or null, got {self.sliding_window!r}")
        if self.moe is not None and not 0 < self.moe.num_experts_per_tok <= self.moe.num_experts:
            raise MistralError(
                f"params.json: moe.num_experts_per_tok ({self.moe.num_experts_per_tok}) must be between 1 "
                f"and moe.num_experts ({self.moe.num_experts})"
            )
        if self.quantization not in (None, "int8"):
            raise MistralError(f"params.json: 'quantization' is {self.quantization!r}; this library reads 'int8' "
                               "(or none)")
        if self.rope_theta is None:
            self.rope_theta = 1e4 if self.sliding_window is not None else 1e6
            log.info("params.json has no rope_theta: using %g (sliding_window is %s)", self.rope_theta, self.sliding_window)

    @classmethod
    def from_dict(cls, params: dict, source: str = "params.json") -> "ModelArgs":
        return _build(cls, params, source)


# Keys that real params.json files carry but that do not describe the network.
_IGNORED_KEYS = {"max_batch_size", "max_seq_len", "max_position_embeddings", "model_type"}


def _build(cls, params: dict, source: str):
    if not isinstance(params, dict):
        raise MistralError(f"{source} must be a JSON object, got {type(params).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    required = [n for n, f in fields.items() if f.default is dataclasses.MISSING]
    missing = [n for n in required if n not in params]
    if missing:
        raise MistralError(f"{source} is missing {', '.join(repr(m) for m in missing)}; it needs {', '.join(required)}")
    unknown = sorted(set(params) - set(fields) - _IGNORED_KEYS)
    if unknown:
        raise MistralError(
            f"{source} has keys this library does not implement: {', '.join(unknown)}; "
            "remove them if they do not change the architecture"
        )
    return cls(**{k: v for k, v in params.items() if k in fields})
