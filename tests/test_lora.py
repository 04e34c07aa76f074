"""LoRA adapters merged as the weights are read (mistral/checkpoint/lora.py): mistral-finetune's lora.safetensors and
PEFT folders, against W + scaling B A computed here in float64; quantized after the merge; refused in one line where
they do not fit the model."""
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import VOCAB
from helpers import MOE, cli, one_error, random_model, save_folder, save_with_tokenizer, tiny_params
from safetensors.torch import save_file

from mistral.checkpoint import convert, hf_name, load_model, quantize as quantize_folder
from mistral.checkpoint.hf import rope_heads, to_hf_rope_order
from mistral.errors import MistralError
from mistral.quantize import int4_dequantized, int4_rows

RANK = 4
TARGET = re.compile(r"layers\.\d+\.(attention\.w[qkvo]|feed_forward\.(experts\.\d+\.)?w[123])\.weight")


def adapter_for(model, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random (A, B) of rank RANK for every attention and feed-forward weight of the model (each expert's), large
    enough to move the logits."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in model.state_dict().items():
        if TARGET.fullmatch(name):
            N, K = w.shape
            out[name] = (torch.randn(RANK, K, generator=gen) * 0.3, torch.randn(N, RANK, generator=gen) * 0.3)
    return out


def merged(model, pairs, scaling: float) -> dict[str, torch.Tensor]:
    """The base weights plus scaling B A, in float64."""
    state = {k: v.double() for k, v in model.state_dict().items()}
    for name, (A, B) in pairs.items():
        state[name] = state[name] + scaling * (B.double() @ A.double())
    return state


def write_finetune(pairs, path: Path) -> Path:
    save_file({name.removesuffix("weight") + f"lora_{ab}.weight": t.contiguous()
               for name, (A, B) in pairs.items() for ab, t in (("A", A), ("B", B))}, str(path))
    return path


def write_peft(pairs, args, folder: Path, r: int, alpha: float) -> Path:
    """A PEFT folder: HF names, and wq's and wk's B rows in HF's RoPE order (as PEFT trains them on an HF model)."""
    folder.mkdir(parents=True)
    tensors = {}
    for name, (A, B) in pairs.items():
        heads = rope_heads(name, args)
        key = "base_model.model." + hf_name(name).removesuffix("weight")
        tensors[key + "lora_A.weight"] = A.contiguous()
        tensors[key + "lora_B.weight"] = (to_hf_rope_order(B, heads) if heads else B).contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": r, "lora_alpha": alpha, "peft_type": "LORA"}))
    return folder


@pytest.fixture(scope="module", params=["dense", "moe"])
def base(request, tmp_path_factory):
    params = tiny_params(**({"moe": MOE} if request.param == "moe" else {}))
    model = random_model(params, seed=4)
    return model, save_folder(model, tmp_path_factory.mktemp(request.param)), adapter_for(model)


def check_model(model, expected: dict[str, torch.Tensor]) -> None:
    """Every weight of model against expected (float64)."""
    state = model.state_dict()
    for name, w in expected.items():
        torch.testing.assert_close(state[name].double(), w, rtol=1e-6, atol=1e-6)


def test_a_finetune_adapter_merges_as_w_plus_2_b_a(base, tmp_path):
    """mistral-finetune's lora.safetensors, scaling 2.0: every weight as W + 2 B A, and the logits of the model
    built from those float64 weights."""
    model, folder, pairs = base
    loaded = load_model(folder, lora_path=write_finetune(pairs, tmp_path / "lora.safetensors"))
    expected = merged(model, pairs, 2.0)
    check_model(loaded, expected)
    reference = random_model(tiny_params(**({"moe": MOE} if model.args.moe else {})))
    reference.load_state_dict({k: v.float() for k, v in expected.items()})
    ids = torch.tensor([1, 9, 27, 17, 51, 25, 11, 33])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, [8]), reference(ids, [8]), rtol=1e-5, atol=1e-5)
        assert (loaded(ids, [8]) - model(ids, [8])).abs().max() > 0.1  # the adapter does move the logits


def test_params_json_lora_section_sets_the_scaling(base, tmp_path):
    model, folder, pairs = base
    other = save_folder(model, tmp_path / "m")
    params = json.loads((other / "params.json").read_text())
    (other / "params.json").write_text(json.dumps({**params, "lora": {"enable": True, "rank": RANK, "scaling": 0.5}}))
    loaded = load_model(other, lora_path=write_finetune(pairs, tmp_path / "lora.safetensors"))
    check_model(loaded, merged(model, pairs, 0.5))


def test_a_peft_folder_merges_with_alpha_over_r_in_our_rope_order(base, tmp_path):
    """PEFT's names and HF's RoPE order for wq and wk: merged as the native adapter with scaling lora_alpha / r."""
    model, folder, pairs = base
    peft = write_peft(pairs, model.args, tmp_path / "peft", r=RANK, alpha=12)
    check_model(load_model(folder, lora_path=peft), merged(model, pairs, 12 / RANK))


def test_int4_quantizes_the_merged_weights(base, tmp_path):
    """--quantize int4 with an adapter: each weight is int4_rows of W + 2 B A (merged here in float64; a weight on a
    rounding boundary may land on the neighbouring step); `quantize --lora` writes the same weights."""
    model, folder, pairs = base
    adapter = write_finetune(pairs, tmp_path / "lora.safetensors")
    loaded = load_model(folder, quantize="int4", lora_path=adapter)
    expected = merged(model, pairs, 2.0)
    for module_name, module in loaded.named_modules():
        name = f"{module_name}.weight"
        if name in pairs:
            ours = int4_dequantized(module.weight, module.scales, module.in_features)
            theirs = int4_dequantized(*int4_rows(expected[name].float()), module.in_features)
            assert (ours != theirs).float().mean() < 0.01, name
            step = module.scales.float().abs().repeat_interleave(32, dim=1)[:, : ours.shape[1]]
            assert ((ours - theirs).abs() <= step * 1.001).all(), name
    written = quantize_folder(folder, tmp_path / "q", to="int4", lora=adapter)
    again = load_model(written)
    for name, t in loaded.state_dict().items():
        assert torch.equal(again.state_dict()[name], t), name


@pytest.mark.parametrize("change, pattern", [
    ("shape", r"'layers\.0\.attention\.wq\.weight' is 32 x 32 here, but its lora_A is \[4, 31\]"),
    ("layer", r"'layers\.9\.attention\.wq\.lora_A\.weight', which matches no attention or feed-forward weight of "
              r"this model \(2 layers"),
    ("half", r"has lora_A of 'layers\.0\.attention\.wq\.weight' but not its lora_B"),
    ("rank", r"has rank 3, not the adapter's 4"),
    ("key", r"holds 'layers\.0\.attention\.wq\.magnitude', which is not a LoRA weight"),
])
def test_an_adapter_that_does_not_fit_is_refused_in_one_line(tmp_path, tokenizer_file, change, pattern):
    """In load_model, and on the command line (no traceback), before any weight is read."""
    model = random_model(tiny_params(vocab_size=VOCAB), seed=1)
    folder, pairs = save_with_tokenizer(model, tmp_path / "m", tokenizer_file), adapter_for(model)
    A, B = pairs["layers.0.attention.wq.weight"]
    tensors = {name.removesuffix("weight") + f"lora_{ab}.weight": t.contiguous()
               for name, (a, b) in pairs.items() for ab, t in (("A", a), ("B", b))}
    if change == "shape":
        tensors["layers.0.attention.wq.lora_A.weight"] = A[:, :31].contiguous()
    elif change == "layer":
        tensors["layers.9.attention.wq.lora_A.weight"] = A.clone()
    elif change == "half":
        del tensors["layers.0.attention.wq.lora_B.weight"]
    elif change == "rank":
        tensors["layers.1.attention.wq.lora_A.weight"] = A[:3].clone()
        tensors["layers.1.attention.wq.lora_B.weight"] = B[:, :3].clone()
    else:
        tensors["layers.0.attention.wq.magnitude"] = A.clone()
    save_file(tensors, str(tmp_path / "lora.safetensors"))
    with pytest.raises(MistralError, match=pattern):
        load_model(folder, lora_path=tmp_path / "lora.safetensors")
    one_error(*cli("demo", folder, "--lora", tmp_path / "lora.safetensors")[::2], pattern)


def test_an_adapter_on_quantized_weights_or_nothing_is_refused(tmp_path):
    model = random_model(tiny_params(), seed=1)
    folder = save_folder(model, tmp_path / "m")
    adapter = write_finetune(adapter_for(model), tmp_path / "lora.safetensors")
    int8 = quantize_folder(folder, tmp_path / "q")
    with pytest.raises(MistralError, match=r"holds int8 weights: a LoRA adapter merges into float weights"):
        load_model(int8, lora_path=adapter)
    with pytest.raises(MistralError, match=r"--lora .*nothing: no such file or folder"):
        load_model(folder, lora_path=tmp_path / "nothing")
    (tmp_path / "peft").mkdir()
    with pytest.raises(MistralError, match=r"must hold adapter_config\.json and adapter_model\.safetensors"):
        load_model(folder, lora_path=tmp_path / "peft")


def test_convert_writes_the_merged_weights(base, tmp_path):
    """convert --lora, native and HF: the written folder loads as the base with the adapter merged (HF: through its
    RoPE order and back)."""
    model, folder, pairs = base
    adapter = write_finetune(pairs, tmp_path / "lora.safetensors")
    expected = merged(model, pairs, 2.0)
    for to in ("native", "hf"):
        written = convert(folder, tmp_path / to, to=to, lora=adapter)
        check_model(load_model(written), expected)


def test_demo_with_an_adapter_says_so_and_answers_as_the_merged_folder(tmp_path, tokenizer_file):
    """The load line names the adapter; the text equals that of a folder holding the merged weights (written here)."""
    model = random_model(tiny_params(vocab_size=VOCAB), seed=3)
    pairs = adapter_for(model)
    folder = save_with_tokenizer(model, tmp_path / "base", tokenizer_file)
    merged_model = random_model(tiny_params(vocab_size=VOCAB))
    merged_model.load_state_dict({k: v.float() for k, v in merged(model, pairs, 2.0).items()})
    merged_folder = save_with_tokenizer(merged_model, tmp_path / "merged", tokenizer_file)
    adapter = write_finetune(pairs, tmp_path / "lora.safetensors")
    code, out, err = cli("demo", folder, "--lora", adapter, "--max_tokens", 8)
    assert code == 0 and f"with the LoRA adapter {adapter} merged" in err, err
    assert out == cli("demo", merged_folder, "--max_tokens", 8)[1]
