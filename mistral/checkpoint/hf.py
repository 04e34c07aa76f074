"""Hugging Face's side of a folder: config.json's keys and defaults, tensor names, the row order of wq and wk, and
fused experts. The loader maps HF tensors through these, so the model only ever sees native keys."""
import re

import torch

from mistral.args import ModelArgs, MoeArgs, count_value, positive_value
from mistral.errors import MistralError

# Values transformers assumes for keys a config.json leaves out (its MistralConfig / MixtralConfig defaults);
# using the same ones keeps our logits equal to HF's on such files.
_HF_DEFAULTS = {
    "mistral": {"rms_norm_eps": 1e-6, "rope_theta": 1e4, "sliding_window": 4096},
    # Mistral's weights with a window per layer: layer_types says which layers slide ("sliding_attention", over
    # sliding_window) and which attend to everything ("full_attention").
    "ministral": {"rms_norm_eps": 1e-6, "rope_theta": 1e4, "sliding_window": 4096},
    "mixtral": {"rms_norm_eps": 1e-5, "rope_theta": 1e6, "sliding_window": None,
                "num_local_experts": 8, "num_experts_per_tok": 2},
}


def args_from_hf_config(config: dict, source: str = "config.json") -> ModelArgs:
    """ModelArgs from a transformers config.json, interpreting absent and null keys as transformers does."""
    if not isinstance(config, dict):
        raise MistralError(f"{source} must be a JSON object, got {type(config).__name__}")
    model_type = config.get("model_type")
    if model_type not in _HF_DEFAULTS:
        raise MistralError(f"{source} has model_type {model_type!r}; this library reads 'mistral', 'ministral' and "
                           "'mixtral'")
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
    n_layers = positive_int("num_hidden_layers")
    if model_type == "ministral" and config.get("layer_types") is not None:
        kinds = config["layer_types"]
        if not isinstance(kinds, list) or len(kinds) != n_layers or not set(kinds) <= {"sliding_attention",
                                                                                       "full_attention"}:
            raise MistralError(f"{source}: layer_types must list 'sliding_attention' or 'full_attention' for each of "
                               f"the {n_layers} layers, got {kinds!r}")
        if "sliding_attention" in kinds and sliding_window is None:
            raise MistralError(f"{source}: layer_types has sliding layers but sliding_window is null")
        windows = [sliding_window if kind == "sliding_attention" else None for kind in kinds]
        sliding_window = windows if len(set(windows)) > 1 else windows[0]
    moe = None
    if model_type == "mixtral":
        moe = MoeArgs(num_experts=positive_int("num_local_experts", defaults["num_local_experts"]),
                      num_experts_per_tok=positive_int("num_experts_per_tok", defaults["num_experts_per_tok"]))
        if moe.num_experts_per_tok > moe.num_experts:
            raise MistralError(f"{source}: num_experts_per_tok ({moe.num_experts_per_tok}) must not exceed "
                               f"num_local_experts ({moe.num_experts})")
    return ModelArgs(dim=dim, n_layers=n_layers, head_dim=head_dim,
                     hidden_dim=positive_int("intermediate_size"), n_heads=n_heads, n_kv_heads=n_kv_heads,
                     norm_eps=float(norm_eps),
                     vocab_size=positive_int("vocab_size"), sliding_window=sliding_window,
                     rope_theta=float(rope_theta), moe=moe, source=source)


def hf_config_from_args(args: ModelArgs, dtype: torch.dtype) -> dict:
    """The config.json transformers' MistralForCausalLM / MixtralForCausalLM needs for this model; with a window per
    layer, MinistralForCausalLM's, which holds one window for the sliding layers beside full-attention ones."""
    model_type = "mistral" if args.moe is None else "mixtral"
    windows, window, layer_types = args.windows, args.sliding_window, None
    if args.mixed_windows:
        sliding = set(windows) - {None}
        if args.moe is not None or len(sliding) > 1:
            raise MistralError(f"a Hugging Face config holds one window for all sliding layers, and no per-layer "
                               f"windows for a mixture; this model's are {args.sliding_window}: keep it native")
        model_type, window = "ministral", sliding.pop()
        layer_types = ["full_attention" if w is None else "sliding_attention" for w in windows]
    config = {
        "architectures": [{"mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM",
                           "ministral": "MinistralForCausalLM"}[model_type]],
        "model_type": model_type,
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "rms_norm_eps": args.norm_eps,
        "vocab_size": args.vocab_size,
        "sliding_window": window,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        # rope_theta for transformers 4.x, rope_parameters for 5.x: each version reads its own and ignores the other.
        "rope_theta": args.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "dtype": str(dtype).removeprefix("torch."),
    }
    if layer_types is not None:
        config["layer_types"] = layer_types
    if args.moe is not None:
        config["num_local_experts"] = args.moe.num_experts
        config["num_experts_per_tok"] = args.moe.num_experts_per_tok
    return config


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


def _renamed(name: str, table: dict[str, str]) -> str:
    """A native key in another layout's names: its entry in `table`, "{}" standing for the layer and expert indices."""
    return table[_INDEX.sub("{}", name)].format(*_INDEX.findall(name))


def hf_name(name: str) -> str:
    """The HF key of a native key: "layers.3.attention.wk.weight" -> "model.layers.3.self_attn.k_proj.weight"."""
    return _renamed(name, _TO_HF)


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
        E, I, D = args.moe.num_experts, args.hidden_dim, args.dim  # noqa: E741  (I: hidden, as in the shapes above)
        if w == "w2":
            return f"model.layers.{layer}.mlp.experts.down_proj", (E, D, I), e * D * I
        return f"model.layers.{layer}.mlp.experts.gate_up_proj", (E, 2 * I, D), (2 * e + (w == "w3")) * I * D
    key = hf_name(name)
    return (key.replace(".block_sparse_moe.gate.", ".mlp.gate.") if fused else key), shape, 0
