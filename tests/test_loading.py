"""How weights get from the file into memory: mapped when kept as stored, quantized to int8 as they are read, saved as
int8 folders that load again as they are, and the dtype a CPU picks on its own."""
import errno
import re
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import MOE, ROOT, random_model, save_folder, tiny_params

from mistral import checkpoint, quantize
from mistral.checkpoint import load as loader, read as reader, write as writer
from mistral.errors import MistralError

SEQ = torch.tensor([3, 9, 27, 17, 51, 25, 11, 33, 3, 9, 60, 1])


def folder_of(tmp_path, dtype=torch.bfloat16, layout="native", **params):
    model = random_model(tiny_params(**params)).to(dtype)
    folder = save_folder(model, tmp_path / "native")
    return checkpoint.convert(folder, tmp_path / "hf", to="hf") if layout == "hf" else folder


def logits(model):
    with torch.no_grad():
        return model(SEQ, [len(SEQ)])


def mapped_files() -> list[tuple[int, int, str]]:
    """(start, end, path) of every file mapping of this process."""
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            out.append((start, end, fields[5]))
    return out


def test_weights_kept_as_stored_are_mapped_from_the_file(tmp_path):
    """A bf16 folder on a CPU keeps its matrices and embeddings in bf16, and they are the file's pages, not a copy;
    writing to one does not reach the file (copy-on-write)."""
    folder = folder_of(tmp_path)
    model = checkpoint.load_model(folder, device="cpu")
    weights = [model.tok_embeddings.weight, model.layers["0"].attention.wq.weight, model.output.weight]
    maps = mapped_files()
    for w in weights:
        assert w.dtype == torch.bfloat16
        assert any(a <= w.data_ptr() < b and path.endswith("consolidated.safetensors") for a, b, path in maps), w.shape
    before = (folder / "consolidated.safetensors").read_bytes()
    with torch.no_grad():
        weights[1].zero_()
    assert (folder / "consolidated.safetensors").read_bytes() == before


@pytest.mark.parametrize("stored, weights, table", [(torch.bfloat16, torch.bfloat16, torch.bfloat16),
                                                     (torch.float32, torch.float32, torch.float32),
                                                     (torch.float16, torch.float32, torch.float32)])
def test_auto_on_a_cpu_never_expands_a_checkpoint(stored, weights, table, tmp_path):
    """auto keeps the stored dtype (fp16, which a CPU runs hundreds of times slower, becomes fp32); the norms and the
    arithmetic are fp32 whatever the weights."""
    model = checkpoint.load_model(folder_of(tmp_path, stored), device="cpu")
    assert model.layers["1"].feed_forward.w2.weight.dtype == weights and model.tok_embeddings.weight.dtype == table
    assert model.layers["1"].ffn_norm.weight.dtype == torch.float32 and model.dtype == torch.float32
    assert logits(model).dtype == torch.float32


QUANTIZE_WHOLE = {"int8": quantize.quantize_int8, "int4": quantize.quantize_int4}


@pytest.mark.parametrize("to", QUANTIZE_WHOLE)
@pytest.mark.parametrize("layout, params", [("native", {}), ("hf", {}), ("native", {"moe": MOE}),
                                            ("hf", {"moe": MOE})])
def test_quantizing_from_the_file_is_quantizing_the_loaded_model(to, layout, params, tmp_path, monkeypatch):
    """Quantized a block of rows at a time as it is read (blocks far smaller than a matrix here), every int8 or int4
    weight and scale is exactly what quantizing the whole loaded model gives, and so are the logits; in the native
    layout no matrix is ever read whole in float (HF's wq and wk are, to put their rows in RoPE order first)."""
    folder = folder_of(tmp_path, torch.float32, layout, **params)
    whole = QUANTIZE_WHOLE[to](checkpoint.load_model(folder, device="cpu"))
    monkeypatch.setattr(reader, "_CHUNK_BYTES", 300)
    read = []
    real = reader._read
    for module in (loader, reader):  # the loader reads floats whole, and so does _quantized for HF's wq and wk
        monkeypatch.setattr(module, "_read", lambda source, *a: read.append(source.key) or real(source, *a))
    streamed = checkpoint.load_model(folder, device="cpu", quantize=to)
    assert streamed.state_dict().keys() == whole.state_dict().keys()
    for name, t in whole.state_dict().items():
        torch.testing.assert_close(streamed.state_dict()[name], t, atol=0, rtol=0, msg=name)
    torch.testing.assert_close(logits(streamed), logits(whole), atol=0, rtol=0)
    floats_read_whole = [k for k in read if k.endswith("weight") and "norm" not in k and "embed" not in k]
    assert all(("q_proj" in k or "k_proj" in k) for k in floats_read_whole) if layout == "hf" else not floats_read_whole


@pytest.mark.parametrize("to, dtype", [("int8", torch.int8), ("int4", torch.uint8)])
def test_a_quantized_folder_loads_again_as_it_is(to, dtype, tmp_path, monkeypatch):
    src = folder_of(tmp_path, torch.bfloat16, moe=MOE)
    dst = checkpoint.quantize(src, tmp_path / to, to=to)
    params = json.loads((dst / "params.json").read_text())
    assert params["quantization"] == to and not list(tmp_path.glob(".*partial"))
    monkeypatch.setattr(loader, "_quantized", lambda *a: pytest.fail(f"a saved {to} folder was quantized again"))
    again = checkpoint.load_model(dst, device="cpu")
    monkeypatch.undo()
    direct = checkpoint.load_model(src, device="cpu", quantize=to)
    for name, t in direct.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], t, atol=0, rtol=0, msg=name)
    w = again.layers["0"].attention.wk.weight
    assert w.dtype == dtype and any(a <= w.data_ptr() < b and p.endswith(f"{to}/consolidated.safetensors")
                                    for a, b, p in mapped_files())
    assert checkpoint.load_model(dst, device="cpu", quantize=to).state_dict().keys() == direct.state_dict().keys()
    with pytest.raises(MistralError, match=f"holds {to} weights already"):
        checkpoint.quantize(dst, tmp_path / "twice")
    with pytest.raises(MistralError, match=f"holds {to} weights already; leave out --quantize"):
        checkpoint.load_model(dst, device="cpu", quantize="int8" if to == "int4" else "int4")
    with pytest.raises(MistralError, match="which transformers' Mistral models do not read"):
        checkpoint.convert(dst, tmp_path / f"hf-of-{to}", to="hf")
    native = checkpoint.convert(dst, tmp_path / "copy")  # a quantized folder copies as it is
    torch.testing.assert_close(logits(checkpoint.load_model(native, device="cpu")), logits(again), atol=0, rtol=0)


def test_an_int8_folder_whose_weights_are_not_int8_is_refused(tmp_path):
    src = folder_of(tmp_path)
    params = json.loads((src / "params.json").read_text())
    (src / "params.json").write_text(json.dumps({**params, "quantization": "int8"}))
    with pytest.raises(MistralError, match="lack 'layers.0.attention.wq.scales'"):
        checkpoint.load_model(src, device="cpu")


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    src = folder_of(tmp_path)

    def full_disk(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "_write_safetensors", full_disk)
    for write in (lambda dst: checkpoint.quantize(src, dst), lambda dst: checkpoint.convert(src, dst, to="hf")):
        with pytest.raises(MistralError, match="No space left on device.*nothing was left behind"):
            write(tmp_path / "out")
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("to", ["int8", "int4"])
def test_the_quantize_command_writes_what_demo_quantize_runs(to, tmp_path):
    src = folder_of(tmp_path, torch.bfloat16, vocab_size=320)
    from conftest import train_tokenizer

    (src / "tokenizer.model").write_bytes(train_tokenizer(320))
    made = subprocess.run([sys.executable, "-m", "main", "quantize", str(src), str(tmp_path / "q"), "--to", to],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    runs = [subprocess.run([sys.executable, "-m", "main", "demo", *args, "--max_tokens", "6"], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
            for args in ([str(tmp_path / "q")], [str(src), "--quantize", to])]
    assert runs[0].returncode == 0 and runs[0].stdout == runs[1].stdout, (runs[0].stderr, runs[1].stderr)
    assert f"{to} weights, fp32 arithmetic (activations rounded to int8 per group of 32" in runs[0].stderr


def test_a_run_that_cannot_fit_is_refused_before_any_weight_is_read(tmp_path, monkeypatch, capsys):
    """The estimate covers the weights as they will be kept, the cache and the work space; the one line says what
    each needs, what is free, and which flag would fit."""
    folder = folder_of(tmp_path, torch.float32, sliding_window=None, rope_theta=None, dim=256, hidden_dim=512,
                       n_heads=8, n_kv_heads=2, head_dim=32, vocab_size=320)
    from conftest import train_tokenizer

    (folder / "tokenizer.model").write_bytes(train_tokenizer(320))
    monkeypatch.setattr(loader, "_read", lambda *a: pytest.fail("a weight was read"))
    monkeypatch.setattr(loader, "_mapped", lambda *a: pytest.fail("a weight was mapped"))
    import main

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["main", "demo", str(folder), *args])
        with pytest.raises(SystemExit) as e:
            main.main()
        return e.value.code, capsys.readouterr().err

    # A batch whose cache cannot fit: three rows of a billion positions each, without a window.
    code, err = run("--max_tokens", str(10**9))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(r"this run needs about [\d,.]+ GB \(weights 0\.0 GB, cache [\d,]+\.\d GB, work space [\d.]+ GB\) "
                     r"but [\d,.]+ GB is available on cpu: .*a smaller --max_tokens would shrink the cache", err)
    # Weights that fit only as int8: the line says so.
    fp32 = 4 * sum(t.numel() for t in random_model(tiny_params(dim=256, hidden_dim=512, n_heads=8, n_kv_heads=2,
                                                               head_dim=32, vocab_size=320)).state_dict().values())
    monkeypatch.setattr(loader, "memory_available", lambda device: fp32 // 2 + (20 << 20))
    code, err = run("--max_tokens", "4")
    assert code == 2 and "--quantize int8 needs" in err and "--dtype bf16 needs" in err, err


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantize_on_cuda_is_refused_in_one_line(two_gpus, tiny_folder, quantize):
    """int8 and int4 are CPU formats here: refused before anything is read or reaches the GPU."""
    with pytest.raises(MistralError) as e:
        checkpoint.load_model(tiny_folder, device="cuda", quantize=quantize)
    assert str(e.value).startswith(f"--quantize {quantize} is a CPU format: on CUDA every product would widen")
    assert "\n" not in str(e.value) and two_gpus["memory"] == []


def test_a_quantized_folder_on_cuda_is_refused_in_one_line(two_gpus, tmp_path):
    """A folder `quantize` wrote holds a CPU format: refused before anything is read or reaches the GPU."""
    folder = checkpoint.quantize(save_folder(random_model(tiny_params()), tmp_path / "f"), tmp_path / "q", "int8")
    with pytest.raises(MistralError) as e:
        checkpoint.load_model(folder, device="cuda")
    assert str(e.value) == (f"{folder} holds int8 weights, a CPU format: on CUDA every product would widen them back "
                            "to float, slower than bf16; load the folder it was made from, or run this one with "
                            "--device cpu")
    assert two_gpus["memory"] == []
