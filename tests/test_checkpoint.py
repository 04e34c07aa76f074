"""Model folders as users have them: HF and native layouts against transformers' own forward, the converter
both ways, dtypes, pipeline subsets, and the message of every malformed folder.

Tests that need transformers skip without it; the native layouts, the converter's round trip and every
malformed case run anyway.
"""
import json
import math
import shutil

import pytest
import torch
from helpers import MOE, params_json, random_model, randomized, save_folder, tiny_params
from safetensors.torch import load_file, save_file

from mistral import checkpoint
from mistral.args import ModelArgs
from mistral.cache import RotatingBufferCache
from mistral.checkpoint import load as loader, read as reader
from mistral.errors import MistralError
from mistral.model import Transformer

SEQLENS = [3, 20, 37]  # two prompts longer than the window of 5
_gen = torch.Generator().manual_seed(1)
SEQS = [torch.randint(0, 64, (n,), generator=_gen).tolist() for n in SEQLENS]
CHUNKS = [5, 1, 9, 2, 7]  # uneven chunk sizes, around and across the window


def packed(model: Transformer) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(sum(SEQS, [])), SEQLENS)


def chunked(model: Transformer) -> torch.Tensor:
    """Feed SEQS through a rolling cache, row b taking CHUNKS[(step + b) % 5] tokens a step; packed-order logits."""
    window = model.args.window or max(SEQLENS)  # no window: the cache holds whole sequences
    cache = RotatingBufferCache(model.n_local_layers, len(SEQS), window, model.args.n_kv_heads, model.args.head_dim,
                                windows=model.layer_windows)
    fed, outs, step = [0] * len(SEQS), [[] for _ in SEQS], 0
    with torch.no_grad():
        while any(f < len(s) for f, s in zip(fed, SEQS)):
            lens = [min(CHUNKS[(step + b) % len(CHUNKS)], len(s) - f) for b, (s, f) in enumerate(zip(SEQS, fed))]
            ids = torch.tensor([t for s, f, n in zip(SEQS, fed, lens) for t in s[f : f + n]])
            for b, part in enumerate(model(ids, lens, cache).split(lens)):
                outs[b].append(part)
            fed, step = [f + n for f, n in zip(fed, lens)], step + 1
    return torch.cat([torch.cat(o) for o in outs])


def hf_logits(hf_model) -> torch.Tensor:
    """transformers' logits, one sequence at a time (it has no packing), concatenated like ours."""
    with torch.no_grad():
        return torch.cat([hf_model(torch.tensor([s])).logits[0] for s in SEQS]).float()


def hf_model(kind: str, sliding_window: int | None, seed: int = 0, **overrides):
    """A tiny random MistralForCausalLM or MixtralForCausalLM, with weights scaled so logits differ clearly."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    dims = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=64, sliding_window=sliding_window, attn_implementation="eager")
    if kind == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**dims, **overrides))
    else:
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
            **dims, num_local_experts=4, num_experts_per_tok=2, **overrides))
    return randomized(model, "embed_tokens")


def load(folder, dtype=torch.float32) -> Transformer:
    return checkpoint.load_model(folder, max_batch_size=len(SEQS), device="cpu", dtype=dtype)


HF_CASES = {
    "mistral-window": ("mistral", 5, False, {}),
    "mistral-no-window-sharded": ("mistral", None, True, {}),
    "mistral-head_dim-16": ("mistral", 5, False, {"head_dim": 16}),  # head_dim != hidden_size / heads
    "mixtral-window-sharded": ("mixtral", 5, True, {}),
    "mixtral-no-window": ("mixtral", None, False, {}),
}


@pytest.mark.parametrize("case", HF_CASES)
def test_hf_folder_matches_transformers(case, tmp_path):
    kind, window, sharded, overrides = HF_CASES[case]
    hf = hf_model(kind, window, **overrides)
    hf.save_pretrained(tmp_path, max_shard_size="20KB" if sharded else "1GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded
    expected = hf_logits(hf)
    model = load(tmp_path)
    assert model.args.sliding_window == window
    torch.testing.assert_close(packed(model), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(chunked(model), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kinds", [["sliding_attention", "full_attention"], ["full_attention", "sliding_attention"]])
def test_hf_ministral_with_a_window_per_layer_matches_transformers(kinds, tmp_path):
    """transformers' MinistralForCausalLM, whose layer_types give some layers a window and others full attention:
    packed, and chunked through the cache, which then holds every position (a layer attends to all of them)."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "MinistralForCausalLM"):
        pytest.skip("this transformers has no Ministral")
    torch.manual_seed(0)
    config = transformers.MinistralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=64, head_dim=8,
                                          sliding_window=3, layer_types=kinds, attn_implementation="eager")
    hf = randomized(transformers.MinistralForCausalLM(config), "embed_tokens")
    hf.save_pretrained(tmp_path / "hf")
    expected = hf_logits(hf)
    model = load(tmp_path / "hf")
    assert model.args.windows == [3 if kind == "sliding_attention" else None for kind in kinds]
    torch.testing.assert_close(packed(model), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(chunked(model), expected, atol=1e-4, rtol=0)
    # All sliding, a window each: the same weights without the full layer's view differ clearly.
    native = checkpoint.convert(tmp_path / "hf", tmp_path / "native")
    _rewrite(native / "params.json", lambda p: {**p, "sliding_window": 3})
    assert not torch.allclose(packed(load(native)), expected, atol=1e-2)
    back = checkpoint.convert(tmp_path / "hf", tmp_path / "native2")
    hf_again = checkpoint.convert(back, tmp_path / "hf2", to="hf")
    reloaded = transformers.MinistralForCausalLM.from_pretrained(hf_again, attn_implementation="eager").eval()
    torch.testing.assert_close(hf_logits(reloaded), expected, atol=1e-5, rtol=0)


def test_hf_sliding_window_is_w_keys_including_self(tmp_path):
    """transformers' window agrees with ours (a query sees itself and the W - 1 keys before it), and the
    comparison can tell: the same weights with a window one wider give clearly different logits."""
    hf = hf_model("mistral", 5)
    hf.save_pretrained(tmp_path / "hf")
    expected = hf_logits(hf)
    wider = checkpoint.convert(tmp_path / "hf", tmp_path / "wider")
    _rewrite(wider / "params.json", lambda p: {**p, "sliding_window": 6})
    assert not torch.allclose(packed(load(wider)), expected, atol=1e-2)
    torch.testing.assert_close(packed(load(tmp_path / "hf")), expected, atol=1e-4, rtol=0)


def test_hf_mixtral_with_fused_experts(tmp_path):
    """Newer transformers hold each layer's experts as gate_up_proj (E, 2I, D) and down_proj (E, D, I)."""
    hf = hf_model("mixtral", 5)
    state = hf.state_dict()
    if not any(k.endswith("mlp.experts.gate_up_proj") for k in state):
        pytest.skip("this transformers keeps Mixtral experts unfused")
    hf.config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"), {"format": "pt"})
    model = load(tmp_path)
    expected = hf_logits(hf)
    torch.testing.assert_close(packed(model), expected, atol=1e-4, rtol=0)
    # Expert 3's w3 is the second half of its gate_up_proj block; w2 its down_proj slice.
    fused = state["model.layers.1.mlp.experts.gate_up_proj"]
    ours = model.state_dict()
    torch.testing.assert_close(ours["layers.1.feed_forward.experts.3.w3.weight"], fused[3, 48:], rtol=0, atol=0)
    torch.testing.assert_close(ours["layers.1.feed_forward.experts.3.w2.weight"],
                               state["model.layers.1.mlp.experts.down_proj"][3], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["mistral", "mixtral"])
def test_converting_hf_to_native_and_back(kind, tmp_path):
    hf = hf_model(kind, 5)
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.model").write_bytes(b"sentencepiece bytes")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # transformers' tokenizer: carried along, not read
        (tmp_path / "hf" / name).write_text('{"from": "%s"}' % name)
    expected = hf_logits(hf)

    native = checkpoint.convert(tmp_path / "hf", tmp_path / "native")
    assert sorted(p.name for p in native.iterdir()) == ["consolidated.safetensors", "generation_config.json",
                                                        "params.json", "tokenizer.json", "tokenizer.model",
                                                        "tokenizer_config.json"]
    assert (native / "tokenizer.model").read_bytes() == b"sentencepiece bytes"
    assert (native / "tokenizer.json").read_text() == '{"from": "tokenizer.json"}'
    torch.testing.assert_close(packed(load(native)), expected, atol=1e-4, rtol=0)

    back = checkpoint.convert(native, tmp_path / "back", to="hf")
    reloaded = type(hf).from_pretrained(back, attn_implementation="eager").eval()
    torch.testing.assert_close(hf_logits(reloaded), expected, atol=0, rtol=0)  # the very same weights
    torch.testing.assert_close(packed(load(back)), packed(load(native)), atol=0, rtol=0)


@pytest.mark.parametrize("moe", [None, MOE], ids=["dense", "moe"])
def test_native_to_hf_round_trip_is_exact(moe, tmp_path):
    """Runs without transformers: native -> hf -> native gives back every tensor bit for bit."""
    model = random_model(tiny_params(moe=moe))
    save_folder(model, tmp_path / "native")
    hf = checkpoint.convert(tmp_path / "native", tmp_path / "hf", to="hf")
    config = json.loads((hf / "config.json").read_text())
    assert config["model_type"] == ("mistral" if moe is None else "mixtral")
    # RoPE rows really are reordered on the way out: HF's q_proj is a row permutation of our wq.
    wq = model.state_dict()["layers.0.attention.wq.weight"]
    q_proj = load_file(hf / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(wq, q_proj) and torch.equal(wq.sort(0).values, q_proj.sort(0).values)
    again = checkpoint.convert(hf, tmp_path / "again")
    original = load_file(tmp_path / "native" / "consolidated.safetensors")
    assert load_file(again / "consolidated.safetensors").keys() == original.keys()
    for name, t in load_file(again / "consolidated.safetensors").items():
        torch.testing.assert_close(t, original[name], atol=0, rtol=0, msg=name)
    torch.testing.assert_close(packed(load(hf)), packed(model), atol=0, rtol=0)


def test_native_model_converted_to_hf_matches_transformers(tmp_path):
    """Our random model (not one transformers made) through convert(to="hf") runs the same in transformers."""
    transformers = pytest.importorskip("transformers")
    model = random_model(tiny_params(moe=MOE))
    save_folder(model, tmp_path / "native")
    hf = checkpoint.convert(tmp_path / "native", tmp_path / "hf", to="hf")
    reloaded = transformers.MixtralForCausalLM.from_pretrained(hf, attn_implementation="eager").eval()
    torch.testing.assert_close(hf_logits(reloaded), packed(model), atol=1e-4, rtol=0)


def test_bf16_load_rounds_each_tensor_once(tmp_path, monkeypatch):
    hf_model("mistral", 5).save_pretrained(tmp_path)
    fp32 = load(tmp_path)
    # Reads go in pieces of _CHUNK_BYTES; make them small and out of step with rows (32 values) so that
    # every tensor takes several, as large ones do with the real size.
    monkeypatch.setattr(reader, "_CHUNK_BYTES", 1000)
    bf16, fp32_in_pieces = load(tmp_path, torch.bfloat16), load(tmp_path)
    # On a CPU, bf16 is the weights' storage: matrices and embeddings, while the norms (tiny) and the arithmetic
    # are fp32.
    for name, t in fp32.state_dict().items():
        torch.testing.assert_close(fp32_in_pieces.state_dict()[name], t, atol=0, rtol=0, msg=name)
        want = t if "norm" in name else t.to(torch.bfloat16)
        torch.testing.assert_close(bf16.state_dict()[name], want, atol=0, rtol=0, msg=name)
    # bf16 keeps 8 significant bits (relative step 2^-8 ~ 0.4%): through 2 layers the logits (about +-4 here) drift
    # by a percent or so of their scale, while a wrong conversion (swapped rows, bytes read as the wrong dtype)
    # changes logits by whole units.
    torch.testing.assert_close(packed(bf16), packed(fp32), atol=0.1, rtol=0.02)


def _save_shards(model: Transformer, folder, n: int = 3):
    """consolidated-0000i-of-0000n.safetensors, split by tensor, with an index like real downloads carry."""
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps(params_json(model.args)))
    names = list(model.state_dict())
    weight_map = {}
    for i in range(n):
        file = f"consolidated-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: model.state_dict()[k].contiguous() for k in names[i::n]}
        save_file(part, str(folder / file))
        weight_map.update(dict.fromkeys(part, file))
    (folder / "consolidated.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("moe", [None, MOE], ids=["dense", "moe"])
def test_native_layouts_give_identical_logits(moe, tmp_path):
    model = random_model(tiny_params(moe=moe))
    expected = packed(model)
    folders = [save_folder(model, tmp_path / "st"), save_folder(model, tmp_path / "pth", fmt="pth"),
               _save_shards(model, tmp_path / "shards")]
    assert (tmp_path / "pth" / "consolidated.00.pth").exists()
    for folder in folders:
        torch.testing.assert_close(packed(load(folder)), expected, atol=0, rtol=0, msg=str(folder))


def test_params_json_wins_when_a_folder_holds_both_layouts(tmp_path):
    native = random_model(tiny_params(), seed=0)
    save_folder(native, tmp_path / "other")
    save_folder(random_model(tiny_params(), seed=1), tmp_path / "seed1")
    checkpoint.convert(tmp_path / "seed1", tmp_path / "both", to="hf")
    for name in ("params.json", "consolidated.safetensors"):
        shutil.copy(tmp_path / "other" / name, tmp_path / "both" / name)
    torch.testing.assert_close(packed(load(tmp_path / "both")), packed(native), atol=0, rtol=0)


@pytest.mark.parametrize("hf", [False, True], ids=["native", "hf"])
def test_a_pipeline_rank_reads_only_its_tensors(hf, tmp_path, monkeypatch):
    model = random_model(tiny_params())
    folder = save_folder(model, tmp_path / "native")
    if hf:
        folder = checkpoint.convert(folder, tmp_path / "hf", to="hf")
    with torch.device("meta"):
        rank1 = Transformer(model.args, pipeline_rank=1, num_pipeline_ranks=2)
    read = []
    for how in ("_read", "_mapped"):  # tensors kept as stored are mapped, the others (HF's wq and wk) read
        real = getattr(loader, how)
        monkeypatch.setattr(loader, how, lambda source, *a, real=real: read.append(source.key) or real(source, *a))
    state = checkpoint.load_weights(folder, model.args, rank1.state_dict(), torch.device("cpu"))
    assert sorted(state) == sorted(rank1.state_dict()) and "tok_embeddings.weight" not in state
    assert len(read) == len(state) and not any(".layers.0." in k or k.startswith("layers.0.") for k in read)
    for name, t in state.items():
        torch.testing.assert_close(t, model.state_dict()[name], atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("config, expected", [
    ({}, dict(head_dim=8, n_kv_heads=2, rope_theta=1e4, sliding_window=4096, norm_eps=1e-6)),
    ({"head_dim": None, "sliding_window": None}, dict(head_dim=8, sliding_window=None)),
    ({"head_dim": 16, "num_key_value_heads": None}, dict(head_dim=16, n_kv_heads=4)),
    ({"rope_theta": 5e5}, dict(rope_theta=5e5)),  # transformers 4.x
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 2e5}}, dict(rope_theta=2e5)),  # 5.x
    ({"model_type": "mixtral"}, dict(rope_theta=1e6, sliding_window=None, norm_eps=1e-5, moe=(8, 2))),
    ({"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 1}, dict(moe=(4, 1))),
])
def test_hf_config_maps_like_transformers_reads_it(config, expected):
    """Absent and null keys mean what they mean to transformers' MistralConfig / MixtralConfig."""
    base = dict(model_type="mistral", hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                num_hidden_layers=2, intermediate_size=48, vocab_size=64)
    args = checkpoint.args_from_hf_config({**base, **config})
    got = {k: getattr(args, k) for k in expected if k != "moe"}
    if "moe" in expected:
        got["moe"] = (args.moe.num_experts, args.moe.num_experts_per_tok)
    assert got == expected
    assert (args.dim, args.n_layers, args.hidden_dim, args.vocab_size) == (32, 2, 48, 64)


def _rewrite(path, edit):
    """Apply edit to the tensors of a safetensors file, or to the dict of a JSON file."""
    if path.suffix == ".json":
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    else:
        save_file(edit(load_file(path)), str(path), {"format": "pt"})


def _fused(state: dict) -> dict:
    """The per-expert HF tensors of a 4-expert model fused as newer transformers hold them."""
    out = {k: v for k, v in state.items() if ".experts." not in k}
    for i in range(2):
        pre = f"model.layers.{i}.block_sparse_moe"
        w = {n: torch.stack([state.pop(f"{pre}.experts.{e}.{n}.weight") for e in range(4)]) for n in ("w1", "w2", "w3")}
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.cat([w["w1"], w["w3"]], dim=1)  # (E, 2I, D)
        out[f"model.layers.{i}.mlp.experts.down_proj"] = w["w2"]  # (E, D, I)
        out[f"model.layers.{i}.mlp.gate.weight"] = out.pop(f"{pre}.gate.weight")
    return out


def _drop(key):
    return lambda d: {k: v for k, v in d.items() if k != key}


ST, HF_ST = "consolidated.safetensors", "model.safetensors"
MALFORMED = {
    # name: (layout, file to edit, edit, message)
    "no folder": ("native", None, None, r"model folder '.*nowhere' does not exist"),
    "no config": ("native", "params.json", "delete", r"has no params.json or config.json"),
    "bad json": ("native", "params.json", "{not json", r"params.json is not valid JSON"),
    "params incomplete": ("native", "params.json", _drop("n_kv_heads"), r"params.json is missing 'n_kv_heads'"),
    "no weights": ("native", ST, "delete", r"has no weights: expected consolidated.safetensors"),
    "truncated": ("native", ST, "truncate", r"cannot read .*consolidated.safetensors: not a complete safetensors file"),
    "missing key": ("native", ST, _drop("layers.1.ffn_norm.weight"), r"lack 'layers.1.ffn_norm.weight', which"),
    "extra key": ("native", ST, lambda d: {**d, "layers.2.ffn_norm.weight": torch.ones(32)},
                  r"hold 'layers.2.ffn_norm.weight', which the model in params.json does not have"),
    "shape": ("native", ST, lambda d: {**d, "layers.0.attention.wk.weight": torch.ones(8, 32)},
              r"'layers.0.attention.wk.weight' in consolidated.safetensors has shape \[8, 32\] "
              r"but params.json implies \[16, 32\]"),
    "vocab": ("native", "params.json", lambda p: {**p, "vocab_size": 100},
              r"'tok_embeddings.weight' in .* has shape \[64, 32\] but params.json implies \[100, 32\]"),
    "int weights": ("native", ST, lambda d: {**d, "norm.weight": torch.ones(32, dtype=torch.int64)},
                    r"'norm.weight' in consolidated.safetensors is stored as I64"),
    "missing shard": ("shards", "consolidated-00002-of-00003.safetensors", "delete",
                      r"lacks shard consolidated-00002-of-00003.safetensors \(1 of 3 missing\)"),
    "hf model_type": ("hf", "config.json", lambda c: {**c, "model_type": "llama"},
                      r"model_type 'llama'; this library reads"),
    "hf incomplete": ("hf", "config.json", _drop("hidden_size"), r"config.json is missing 'hidden_size'"),
    "hf rope scaling": ("hf", "config.json", lambda c: {**c, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}},
                        r"asks for RoPE scaling"),
    "hf no weights": ("hf", HF_ST, "delete", r"expected model.safetensors or model-0000i-of-0000N.safetensors"),
    "hf missing key": ("hf", HF_ST, _drop("model.layers.1.self_attn.k_proj.weight"),
                       r"lack 'model.layers.1.self_attn.k_proj.weight', which the model in config.json needs"),
    "hf intermediate": ("hf", "config.json", lambda c: {**c, "intermediate_size": 40},
                        r"'model.layers.0.mlp.gate_proj.weight' in model.safetensors has shape \[48, 32\] "
                        r"but config.json implies \[40, 32\]"),
    "hf fewer experts": ("moe", "config.json", lambda c: {**c, "num_local_experts": 3},
                         r"hold 'model.layers.0.block_sparse_moe.experts.3.w1.weight' \(and 5 more\), "
                         r"which the model in config.json does not have"),
    "hf more experts": ("moe", "config.json", lambda c: {**c, "num_local_experts": 5},
                        r"lack 'model.layers.0.block_sparse_moe.experts.4.w1.weight' \(and 5 more\)"),
    "hf fused experts": ("fused", "config.json", lambda c: {**c, "num_local_experts": 3},
                         r"'model.layers.0.mlp.experts.gate_up_proj' in model.safetensors has shape \[4, 96, 32\] "
                         r"but config.json implies \[3, 96, 32\]"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_folder_fails_with_its_message(case, tmp_path):
    kind, file, edit, message = MALFORMED[case]
    model = random_model(tiny_params(moe=MOE if kind in ("moe", "fused") else None))
    folder = save_folder(model, tmp_path / "native") if kind != "shards" else _save_shards(model, tmp_path / "native")
    if kind in ("hf", "moe", "fused"):
        folder = checkpoint.convert(folder, tmp_path / "hf", to="hf")
    if kind == "fused":
        _rewrite(folder / HF_ST, _fused)
        load(folder)  # the intact fused folder loads; only the contradicting config below fails
    if case == "no folder":
        folder = tmp_path / "nowhere"
    elif edit == "delete":
        (folder / file).unlink()
    elif edit == "truncate":
        (folder / file).write_bytes((folder / file).read_bytes()[:-100])
    elif isinstance(edit, str):
        (folder / file).write_text(edit)
    else:
        _rewrite(folder / file, edit)
    with pytest.raises(MistralError, match=message):
        load(folder)


def test_convert_refuses_a_bad_target(tmp_path):
    folder = save_folder(random_model(tiny_params()), tmp_path / "native")
    with pytest.raises(MistralError, match=r"unknown target layout 'gguf'; use native or hf"):
        checkpoint.convert(folder, tmp_path / "out", to="gguf")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("keep me")
    with pytest.raises(MistralError, match=r"full already exists and is not an empty folder"):
        checkpoint.convert(folder, tmp_path / "full")


def test_hf_config_round_trips_through_our_args():
    args = ModelArgs(dim=32, n_layers=2, head_dim=16, hidden_dim=48, n_heads=4, n_kv_heads=1, norm_eps=1e-5,
                     vocab_size=64, sliding_window=None, rope_theta=1e6, moe=MOE)
    assert checkpoint.args_from_hf_config(checkpoint.hf_config_from_args(args, torch.bfloat16)) == args


@pytest.mark.parametrize("key, value, message", [("rms_norm_eps", math.nan, "'rms_norm_eps' must be a finite"),
                                                 ("rope_theta", -1, "'rope_theta' must be a finite"),
                                                 ("hidden_size", "32", "'hidden_size' must be a whole number"),
                                                 ("sliding_window", 1e15, "'sliding_window' must be a whole number"),
                                                 ("head_dim", 9, "'head_dim' must be even")])
def test_hf_config_values_are_checked_as_well_and_name_config_json(key, value, message):
    config = {"model_type": "mistral", "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
              "num_hidden_layers": 2, "intermediate_size": 48, "vocab_size": 64, key: value}
    with pytest.raises(MistralError, match=message) as e:
        checkpoint.args_from_hf_config(config, "config.json")
    assert str(e.value).startswith("config.json")


@pytest.mark.parametrize("to", ["native", "hf"])
def test_convert_writes_configs_the_loader_takes(folder, tmp_path, to):
    dst = checkpoint.convert(folder, tmp_path / to, to=to)
    assert checkpoint.read_args(dst) == checkpoint.read_args(folder)


@pytest.mark.parametrize("write", ["convert", "quantize"])
def test_a_folder_with_only_a_hugging_face_tokenizer_is_refused_before_writing(folder, tmp_path, write):
    """An HF folder with tokenizer.json alone "converted" into a folder that no command loads (they read tekken.json
    or tokenizer.model*): refused in one line, before anything is written."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(folder, src)
    for name in ("tokenizer.model", "tekken.json"):
        (src / name).unlink(missing_ok=True)
    (src / "tokenizer.json").write_text("{}")
    with pytest.raises(MistralError, match="has only tokenizer.json, a Hugging Face tokenizer") as e:
        getattr(checkpoint, write)(src, tmp_path / "dst")
    assert "\n" not in str(e.value) and not (tmp_path / "dst").exists()
