"""The command line: demo and interactive output, one_file_ref agreement, and errors a person can act on."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import VOCAB
from helpers import ROOT, Reached, cli, inprocess, one_error, random_model, save_with_tokenizer, tiny_params

import main
from mistral import checkpoint
from mistral.cli import load as load_for_a_command
from mistral.errors import MistralError
from mistral.generate import generate, generate_ids


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tokenizer_file) -> Path:
    """A tiny random model with a real sentencepiece tokenizer, in the native layout."""
    model = random_model(tiny_params(vocab_size=VOCAB, n_layers=3))
    return save_with_tokenizer(model, tmp_path_factory.mktemp("model"), tokenizer_file)


def test_importing_main_leaves_ctrl_c_alone():
    """The quiet exit on Ctrl-C while torch loads is for `python -m main` only: a test or script that imports main
    keeps Python's KeyboardInterrupt."""
    check = "import main, signal; assert signal.getsignal(signal.SIGINT) is signal.default_int_handler"
    proc = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_demo_prints_three_completions_and_a_summary(model_folder):
    code, out, err = cli("demo", model_folder, "--max_tokens", "7")
    assert code == 0, err
    blocks = out.split("=" * 20 + "\n")
    assert len(blocks) == 4 and blocks[-1] == ""
    for block, prompt in zip(blocks, main.DEMO_PROMPTS):
        assert block.startswith(prompt)
    assert "tokens generated" in err and "tokens/s" in err and "peak memory" in err
    assert "Traceback" not in err


def test_one_file_ref_prints_exactly_what_the_demo_prints(model_folder):
    demo = subprocess.run([sys.executable, "-m", "main", "demo", str(model_folder), "--max_tokens", "12"],
                          cwd=ROOT, capture_output=True, timeout=300)
    ref = subprocess.run([sys.executable, "-m", "one_file_ref", str(model_folder), "--max_tokens", "12"],
                         cwd=ROOT, capture_output=True, timeout=300)
    assert demo.returncode == 0 and ref.returncode == 0, (demo.stderr, ref.stderr)
    assert demo.stdout == ref.stdout


@pytest.mark.skipif(not (ROOT / "mistral" / "assets" / "params.json").exists(), reason="shipped model not built")
def test_shipped_model_demo_matches_one_file_ref():
    demo = subprocess.run([sys.executable, "-m", "main", "demo"], cwd=ROOT, capture_output=True, timeout=300)
    ref = subprocess.run([sys.executable, "-m", "one_file_ref"], cwd=ROOT, capture_output=True, timeout=300)
    assert demo.returncode == 0 and ref.returncode == 0, (demo.stderr, ref.stderr)
    assert demo.stdout == ref.stdout
    assert demo.stdout.count(b"=" * 20) == 3


@pytest.mark.skipif(not (ROOT / "mistral" / "assets" / "params.json").exists(), reason="shipped model not built")
def test_shipped_model_demo_is_the_same_with_int8_and_bf16_weights():
    """Issue 6's criterion for the fast paths: greedy output on the shipped model over its demo prompts is
    identical to fp32's, with int8 weights (--quantize int8) and with bf16 weights (--dtype bf16)."""
    runs = [subprocess.run([sys.executable, "-m", "main", "demo", *extra], cwd=ROOT, capture_output=True, timeout=300)
            for extra in ([], ["--quantize", "int8"], ["--dtype", "bf16"])]
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    assert runs[1].stdout == runs[0].stdout and runs[2].stdout == runs[0].stdout


def test_interactive_answers_piped_prompts_and_exits_at_eof(model_folder, monkeypatch, capsys):
    code, out, err = inprocess(monkeypatch, capsys, "interactive", model_folder, "--max_tokens", "5",
                               stdin="To be\nThe slings\n")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("To be") and lines[1].startswith("The slings")
    # The streamed text is exactly what generate() returns.
    model, tok = load_for_a_command(str(model_folder), max_batch_size=1, num_pipeline_ranks=1, device="cpu",
                                    dtype="auto")
    texts, _ = main.generate(["To be"], model, tok, max_tokens=5, eos_id=tok.eos_id)
    assert lines[0] == texts[0]


def test_interactive_instruct_sends_the_chat_encoding(model_folder, monkeypatch, capsys):
    """--instruct: each line is a one-message chat, encoded by mistral_common as the tokenizer's version says (here v1:
    `<s>[INST] To be [/INST]`, the tags as text), with nothing stripped from what was typed."""
    from mistral_common.protocol.instruct.messages import UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    sent = []
    real = main.generate_ids
    monkeypatch.setattr(main, "generate_ids",
                        lambda prompts, *a, **k: (sent.append(prompts[0]), real(prompts, *a, **k))[1])
    code, out, err = inprocess(monkeypatch, capsys, "interactive", model_folder, "--max_tokens", "3", "--instruct",
                               stdin=" To be \n")
    assert code == 0 and len(out.splitlines()) == 1, err
    reference = MistralTokenizer.from_file(str(model_folder / "tokenizer.model"))
    want = reference.encode_chat_completion(ChatCompletionRequest(messages=[UserMessage(content=" To be ")])).tokens
    assert sent == [want]


def test_interactive_prints_a_stats_line_after_each_answer(model_folder, monkeypatch, capsys):
    code, out, err = inprocess(monkeypatch, capsys, "interactive", model_folder, "--max_tokens", "4",
                               stdin="To be\nThe slings\n")
    stats = [line for line in err.splitlines() if line.startswith("prefill ")]
    assert code == 0 and len(stats) == 2, err
    assert __import__("re").fullmatch(r"prefill \d+ tokens in [\d.]+ s \([\d,.]+ tokens/s\), "
                                      r"decode 3 tokens in [\d.]+ s \([\d,.]+ tokens/s\), context \d+ tokens",
                                      stats[0]), stats[0]


def test_interactive_rejects_an_empty_prompt_and_carries_on(model_folder, monkeypatch, capsys):
    code, out, err = inprocess(monkeypatch, capsys, "interactive", model_folder, "--max_tokens", "2", stdin="\nTo be\n")
    assert code == 1
    assert "error: empty prompt" in err
    assert out.startswith("To be")


def _broken(tmp_path, model_folder, change):
    folder = tmp_path / "broken"
    shutil.copytree(model_folder, folder)
    change(folder)
    return folder


def _edit_params(**changes):
    def change(folder):
        params = json.loads((folder / "params.json").read_text())
        for k, v in changes.items():
            if v is None:
                params.pop(k)
            else:
                params[k] = v
        (folder / "params.json").write_text(json.dumps(params))
    return change


def _reweight(extra: bool):
    def change(folder):
        from safetensors.torch import load_file, save_file
        state = load_file(folder / "consolidated.safetensors")
        if extra:
            state["layers.0.attention.wz.weight"] = torch.zeros(1)
        else:
            state["layers.1.attention.wk.weight"] = torch.zeros(8, 32)
        save_file(state, folder / "consolidated.safetensors")
    return change


FOLDER_ERRORS = {
    "no folder": (lambda f: shutil.rmtree(f), "does not exist"),
    "no params.json": (lambda f: (f / "params.json").unlink(), "no params.json"),
    "no weights": (lambda f: (f / "consolidated.safetensors").unlink(), "has no weights"),
    "no tokenizer": (lambda f: (f / "tokenizer.model").unlink(), "tokenizer.model"),
    "params not json": (lambda f: (f / "params.json").write_text("{dim: 4"), "not valid JSON"),
    "params incomplete": (_edit_params(n_heads=None), "missing 'n_heads'"),
    "params bad value": (_edit_params(n_layers=-2), "'n_layers' must be a whole number from 1"),
    "params unknown key": (_edit_params(use_biases=True), "use_biases"),
    "shape mismatch": (_reweight(extra=False), r"'layers.1.attention.wk.weight' .* shape \[8, 32\] .* \[16, 32\]"),
    "extra key": (_reweight(extra=True), "layers.0.attention.wz.weight"),
    "vocab mismatch": (_edit_params(vocab_size=128),
                       "tokenizer.model has 320 tokens but params.json says vocab_size=128"),
}


@pytest.mark.parametrize("case", FOLDER_ERRORS)
def test_broken_model_folder(case, model_folder, tmp_path, monkeypatch, capsys):
    change, message = FOLDER_ERRORS[case]
    folder = _broken(tmp_path, model_folder, change)
    code, out, err = inprocess(monkeypatch, capsys, "demo", folder, "--max_tokens", "2")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert __import__("re").search(message, err), err


def test_tokenizer_for_another_model(model_folder, tmp_path, monkeypatch, capsys):
    """Weights and params agree, but the tokenizer has a different vocabulary."""
    from conftest import train_tokenizer

    other = train_tokenizer(300)
    folder = _broken(tmp_path, model_folder, lambda f: (f / "tokenizer.model").write_bytes(other))
    code, _, err = inprocess(monkeypatch, capsys, "demo", folder)
    assert code == 2 and f"has 300 tokens but params.json says vocab_size={VOCAB}" in err


OPTION_ERRORS = {
    "negative max_tokens": (["--max_tokens", "-1"], "max_tokens must be"),
    "fractional max_tokens": (["--max_tokens", "2.5"], "max_tokens must be"),
    "negative temperature": (["--temperature", "-0.1"], "temperature must be a finite number >= 0"),
    "temperature not a number": (["--temperature", "hot"],
                                 r"temperature must be a finite number >= 0 \(0 is greedy\), got 'hot'"),
    "top_p zero": (["--top_p", "0"], r"top_p must be in \(0, 1\]"),
    "top_p above one": (["--top_p", "1.5"], r"top_p must be in \(0, 1\]"),
    "unknown device": (["--device", "tpu"], "unknown device 'tpu'|device 'tpu'"),
    "cuda without cuda": (["--device", "cuda"], "CUDA is not available"),
    "fp16 on cpu": (["--device", "cpu", "--dtype", "fp16"], "fp16 on CPU"),
    "unknown dtype": (["--dtype", "fp8"], "unknown dtype 'fp8'"),
    "pipeline without torchrun": (["--num_pipeline_ranks", "2"], "torchrun --nproc-per-node 2"),
    "bad chunk size": (["--chunk_size", "0"], "chunk_size must be"),
    "bad seed": (["--seed", "abc"], "seed must be a whole number"),
    "unknown quantization": (["--quantize", "int3"], "unknown --quantize 'int3'; the choices are int8 and int4"),
}


@pytest.mark.parametrize("case", OPTION_ERRORS)
def test_bad_option(case, model_folder, monkeypatch, capsys):
    flags, message = OPTION_ERRORS[case]
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code, out, err = inprocess(monkeypatch, capsys, "demo", model_folder, *flags)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert __import__("re").search(message, err), err


def test_user_errors_print_no_traceback_end_to_end(model_folder):
    for args in (["demo", "/no/such/folder"], ["demo", str(model_folder), "--top_p", "2"],
                 ["interactive", str(model_folder), "--device", "quantum"]):
        code, out, err = cli(*args)
        assert code == 2 and "Traceback" not in err and err.startswith("error: "), (args, err)


FLAGS = {
    "two misspelled options": (["demo", "{m}", "--max_token", "5", "--temprature", "0.7"],
                               r"demo has no option --max_token; did you mean --max_tokens\?"),
    "convert --too": (["convert", "{m}", "{tmp}/out", "--too", "hf"],
                      r"convert has no option --too; did you mean --to\?"),
    "a command misspelled": (["dmeo"], r"unknown command 'dmeo'; did you mean demo\?"),
    "chat --temp": (["chat", "{m}", "--temp", "0.5"], r"chat has no option --temp; did you mean --temperature|--top_p"),
    "interactive --instrct": (["interactive", "{m}", "--instrct"], r"did you mean --instruct\?"),
    "explain --seqlen": (["explain", "--seqlen", "3,4"], r"did you mean --seqlens\?"),
    "quantize --to8": (["quantize", "{m}", "{tmp}/q", "--to8"], r"quantize has no option --to8"),
    "too many positional arguments": (["convert", "a", "b", "c", "d", "e"],
                                      r"convert takes at most 4 arguments in order"),
}


@pytest.mark.parametrize("case", FLAGS)
def test_arguments_are_checked_before_anything_runs(case, folder, tmp_path, monkeypatch, capsys):
    args = [a.format(m=folder, tmp=tmp_path) for a in FLAGS[case][0]]
    code, out, err = inprocess(monkeypatch, capsys, *args)
    one_error(code, err, FLAGS[case][1])
    assert out == "" and not list(tmp_path.iterdir())  # nothing generated, nothing written


def test_options_may_be_spelled_with_dashes_and_negated(folder, monkeypatch, capsys):
    code, out, err = inprocess(monkeypatch, capsys, "interactive", folder, "--max-tokens", "2", "--noinstruct",
                               stdin="To be\n")
    assert code == 0 and out.startswith("To be"), err


def test_a_broken_config_stops_the_cli_in_one_line(folder, tmp_path, monkeypatch, capsys):
    broken = shutil.copytree(folder, tmp_path / "m")
    params = json.loads((broken / "params.json").read_text())
    (broken / "params.json").write_text(json.dumps({**params, "norm_eps": float("nan")}))  # json writes NaN
    code, out, err = inprocess(monkeypatch, capsys, "demo", broken, "--max_tokens", "2")
    one_error(code, err, r"params.json: 'norm_eps' must be a finite number above 0, got nan")


@pytest.mark.parametrize("seed, ok", [(-1, False), (2**64, False), (10**30, False), (1.5, False), (0, True),
                                      (2**64 - 1, True)])
def test_seeds_out_of_range_get_one_line(seed, ok, folder, monkeypatch, capsys):
    code, out, err = inprocess(monkeypatch, capsys, "demo", folder, "--max_tokens", "1", "--seed", str(seed))
    if ok:
        assert code == 0, err
    else:
        one_error(code, err, r"seed must be a whole number from 0 to 2\*\*64 - 1")


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_temperatures_that_are_not_finite_are_refused(value, folder, monkeypatch, capsys):
    code, out, err = inprocess(monkeypatch, capsys, "demo", folder, "--temperature", value)
    one_error(code, err, r"temperature must be a finite number >= 0")


def test_a_cache_for_a_billion_positions_is_refused_before_allocating(folder, monkeypatch, capsys):
    code, out, err = inprocess(monkeypatch, capsys, "demo", folder, "--max_tokens", "1000000000")
    one_error(code, err, r"this run needs about [\d,.]+ GB .* cache")
    with pytest.raises(MistralError, match="need a cache of .* more than the .* available"):
        generate_ids([[1, 2]], random_model(tiny_params(sliding_window=None)), max_tokens=10**12)


@pytest.mark.parametrize("args, message", [
    (["--seqlens", "99999999999999999999"], r"seqlens must be 1 to 10 prompt lengths from 1 to 256"),
    (["--seqlens", "5,100000"], r"seqlens must be 1 to 10 prompt lengths"),
    (["--decode_steps", "100000000"], r"decode_steps must be a whole number from 0 to 256"),
    (["--sliding_window", "10000000"], r"sliding_window must be a whole number from 1 to 256"),
    (["--chunk_size", "10000000"], r"chunk_size must be a whole number from 1 to 256"),
])
def test_explain_refuses_walks_too_long_to_read(args, message, monkeypatch, capsys):
    code, out, err = inprocess(monkeypatch, capsys, "explain", *args)
    one_error(code, err, message)


def test_explain_out_places_that_take_no_files(tmp_path, monkeypatch, capsys):
    (tmp_path / "a-file").write_text("")
    cases = [(str(tmp_path / "a-file"), r"is a file; name a folder"),
             (str(tmp_path / "a-file" / "under"), r"cannot write the pictures in .*Not a directory"),
             ("", r"--out must name a folder"), ("   ", r"--out must name a folder")]
    for out, message in cases:
        code, _, err = inprocess(monkeypatch, capsys, "explain", "--out", out)
        one_error(code, err, message)


def test_explain_out_on_a_full_disk(tmp_path, monkeypatch, capsys):
    plt = pytest.importorskip("matplotlib.pyplot")
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(plt.Figure, "savefig", full)
    code, _, err = inprocess(monkeypatch, capsys, "explain", "--out", tmp_path / "pics")
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: writing the pictures in") and \
        "No space left on device" in err


def test_convert_places_that_take_no_folder(folder, tmp_path, monkeypatch, capsys):
    (tmp_path / "a-file").write_text("")
    cases = [(tmp_path / "a-file", r"already exists and is not an empty folder"),
             (tmp_path / "a-file" / "under", r"is not a folder, so under cannot be made in it"),
             ("", r"DST must name a folder")]
    for dst, message in cases:
        code, _, err = inprocess(monkeypatch, capsys, "convert", folder, dst, "--to", "hf")
        one_error(code, err, message)
    import tempfile

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)  # as in a folder this user may not write (root may anyway)
    code, _, err = inprocess(monkeypatch, capsys, "convert", folder, tmp_path / "new", "--to", "hf")
    one_error(code, err, r"cannot write in .*Permission denied")
    assert not (tmp_path / "new").exists()


def test_ctrl_c_while_torch_loads_ends_quietly():
    proc = subprocess.Popen([sys.executable, "-m", "main", "demo"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    time.sleep(0.4)  # importing torch and the rest takes a few seconds
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and b"Traceback" not in err, err


def test_what_would_have_been_changed_silently_gets_one_line(folder, tokenizer_file, monkeypatch, capsys):
    for value in ("no", "0", "yes"):  # --instruct=False and =True are what they say
        code, _, err = inprocess(monkeypatch, capsys, "interactive", folder, f"--instruct={value}")
        one_error(code, err, r"--instruct takes no value")
    for device in ("cpu:7", "cpu:1"):
        code, _, err = inprocess(monkeypatch, capsys, "demo", folder, "--device", device)
        one_error(code, err, r"a CPU has no numbered devices")
    from mistral.tokenizer import Tokenizer

    model = random_model(tiny_params(vocab_size=VOCAB))
    with pytest.raises(MistralError, match=r"prompts must be a list of strings, got str; for one prompt: \[prompt\]"):
        generate("some text", model, Tokenizer(tokenizer_file), max_tokens=2)
    with pytest.raises(MistralError, match="prompts must be a list of lists of token ids"):
        generate_ids([1, 2, 3], model, max_tokens=2)
    for bad in (-3, 0, 2.0, True):
        with pytest.raises(MistralError, match="max_batch_size must be a whole number >= 1"):
            random_model(tiny_params(), max_batch_size=bad)


def test_non_finite_logits_are_said_not_printed(folder, tmp_path, monkeypatch, capsys):
    """NaN weights gave ⁇ output with exit status 0."""
    from safetensors.torch import load_file, save_file

    broken = shutil.copytree(folder, tmp_path / "nan")
    state = load_file(broken / "consolidated.safetensors")
    state["layers.1.feed_forward.w2.weight"][0, 0] = float("nan")
    save_file(state, str(broken / "consolidated.safetensors"))
    for extra in ([], ["--temperature", "0.7"]):
        code, out, err = inprocess(monkeypatch, capsys, "demo", broken, *extra)
        one_error(code, err, r"the model gave non-finite logits \(NaN or inf\): its weights are damaged")
        assert out == ""


def test_messages_name_the_real_problem(folder, tmp_path, monkeypatch, capsys):
    code, _, err = inprocess(monkeypatch, capsys, "demo", folder / "params.json")
    one_error(code, err, r"params.json' is a file; give the model folder that holds it")
    hf = checkpoint.convert(folder, tmp_path / "hf", to="hf")
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "vocab_size": 100}))
    code, _, err = inprocess(monkeypatch, capsys, "demo", hf)
    one_error(code, err, r"has \d+ tokens but config.json says vocab_size=100")
    pth = tmp_path / "pth"
    pth.mkdir()
    shutil.copy(folder / "params.json", pth / "params.json")
    shutil.copy(folder / "tokenizer.model", pth / "tokenizer.model")
    for damage in (b"hello world" * 10, b"PK\x03\x04" + bytes(100)):
        (pth / "consolidated.00.pth").write_bytes(damage)
        code, _, err = inprocess(monkeypatch, capsys, "demo", pth)
        one_error(code, err, r"cannot read .*consolidated.00.pth: it is not a complete torch.save file")


# Issue: every option is checked before anything loads, and sessions say what happened.

@pytest.mark.parametrize("name", ["2407", "1e3", "True", "a,b", "[v3]", "None", "-2407", "--odd"])
def test_a_folder_name_is_the_text_as_typed(name, folder, tmp_path, monkeypatch, capsys):
    """Release folders are named by date (2407): fire read them as numbers, lists or None (the shipped model)."""
    shutil.copytree(folder, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    typed = ["--max_tokens", "1", "--", name] if name.startswith("--") else [name, "--max_tokens", "1"]
    code, out, err = inprocess(monkeypatch, capsys, "demo", *typed)
    assert code == 0 and f"loaded {name}:" in err, err


def test_convert_takes_folders_named_as_numbers(folder, tmp_path, monkeypatch, capsys):
    shutil.copytree(folder, tmp_path / "2407")
    monkeypatch.chdir(tmp_path)
    code, out, err = inprocess(monkeypatch, capsys, "convert", "2407", "2408", "--to", "hf")
    assert code == 0 and (tmp_path / "2408" / "config.json").exists(), err


@pytest.mark.parametrize("args, message", [
    (["chat", "--context", "abc"], r"context must be a whole number, got 'abc'"),
    (["chat", "--context", "2.5"], r"context must be a whole number, got '2.5'"),
    (["chat", "--context", "True"], r"context must be a whole number, got 'True'"),
    (["demo", "--max_tokens", "1e3"], r"max_tokens must be a whole number >= 0, got '1e3'"),
    (["demo", "--top_k", "x"], r"top_k must be a whole number >= 0 \(0 turns it off\), got 'x'"),
    (["explain", "--decode_steps", "many"], r"decode_steps must be a whole number, got 'many'"),
    (["demo", "--max_tokens"], r"--max_tokens needs a value"),
    (["demo", "--max_tokens", "3", "--max-tokens=4"], r"--max_tokens is given twice"),
    (["demo", "--nomax_tokens"], r"--max_tokens is not an on/off option"),
    (["interactive", "--noinstruct=1"], r"--noinstruct takes no value"),
])
def test_a_value_not_of_the_option_type_gets_one_line(args, message, monkeypatch, capsys):
    code, out, err = inprocess(monkeypatch, capsys, *args)
    one_error(code, err, message)
    assert out == ""


def test_options_and_positional_arguments_in_any_order(folder, monkeypatch, capsys):
    """A bool option takes no value, so the folder after --instruct is the folder; options before it too."""
    code, out, err = inprocess(monkeypatch, capsys, "interactive", "--max-tokens=2", "--instruct", folder,
                               stdin="To be\n")
    assert code == 0 and len(out.splitlines()) == 1 and f"loaded {folder}" in err, err


@pytest.fixture
def no_loading(monkeypatch):
    """Loading a model's weights raises Reached: a refusal must come before it."""
    def load_model(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(checkpoint, "load_model", load_model)


@pytest.mark.parametrize("args, message", [
    (["--context", "-5"], r"context must be a positive number of tokens, got -5"),
    (["--context", "0"], r"context must be a positive number of tokens, got 0"),
    (["--max_tokens", "0"], r"a chat answers: max_tokens must be at least 1, got 0"),
    (["--max_tokens", "100", "--context", "100"], r"--max_tokens 100 leaves no room for a message .* 100 tokens"),
    (["--max_tokens", "40000"], r"--max_tokens 40000 leaves no room for a message .* 32768 tokens"),
])
def test_chat_options_are_refused_before_loading(args, message, folder, no_loading, monkeypatch, capsys):
    code, out, err = inprocess(monkeypatch, capsys, "chat", folder, *args, stdin="Hello\n")
    one_error(code, err, message)


def test_chat_context_on_a_model_with_a_sliding_window_is_refused_before_loading(model_folder, no_loading,
                                                                                  monkeypatch, capsys):
    code, out, err = inprocess(monkeypatch, capsys, "chat", model_folder, "--context", "100", stdin="Hello\n")
    one_error(code, err, r"sliding window of 5 tokens, so its conversations have no length limit: leave out --context")


@pytest.mark.parametrize("args, message", [
    (["chat", "{m}", "-verbose"], r"chat has no option -verbose: options are written in full after two dashes"),
    (["chat", "{m}", "-m", "3"], r"chat has no option -m"),
    (["chat", "-t", "0.5", "{m}"], r"chat has no option -t"),
    (["chat", "{m}", "-c", "100"], r"chat has no option -c"),
    (["convert", "{m}"], r"convert needs DST: python -m main convert SRC DST"),
    (["convert"], r"convert needs SRC and DST"),
    (["quantize", "{m}"], r"quantize needs DST"),
])
def test_single_dash_options_and_missing_arguments_get_one_line_before_anything_runs(args, message, folder,
                                                                                      monkeypatch, capsys):
    code, out, err = inprocess(monkeypatch, capsys, *[a.format(m=folder) for a in args], stdin="Hello\n")
    one_error(code, err, message)
    assert out == ""


def test_dash_h_is_still_help():
    """-h and --help print the options this parser takes: fire's help offered -c and -s, which are refused."""
    for args in (["demo", "-h"], ["chat", "FOLDER", "--help"], ["-h"]):
        code, out, err = cli(*args)
        assert code == 0 and out.startswith("usage: python -m main") and err == "", (args, err)
        assert "-c," not in out and "-s," not in out
    assert "--max_tokens" in cli("demo", "-h")[1] and "convert SRC DST [options]" in cli("convert", "-h")[1]


def _one_file_ref(*args):
    proc = subprocess.run([sys.executable, "-m", "one_file_ref", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def test_one_file_ref_refuses_what_it_cannot_read_in_one_line(folder, tmp_path):
    hf = checkpoint.convert(folder, tmp_path / "hf", to="hf")
    quantized = checkpoint.quantize(folder, tmp_path / "q", to="int8")
    for args, message in [([tmp_path / "missing"], r"does not exist"),
                          ([hf], r"has no params.json: it is a Hugging Face folder .* convert"),
                          ([quantized], r"holds int8 weights; one_file_ref reads full-precision ones"),
                          ([folder, "--max_tokens", "-3"], r"max_tokens must be a whole number >= 0, got -3"),
                          ([folder, "--max_tokens", "abc"], r"--max_tokens: invalid int value: 'abc'")]:
        code, out, err = _one_file_ref(*args)
        one_error(code, err, message)
        assert out == "", args


def test_interactive_cache_refusal_names_max_tokens(folder, monkeypatch, capsys):
    """interactive has no rows to choose: the refusal names the option that would shrink the cache."""
    code, out, err = inprocess(monkeypatch, capsys, "interactive", folder, "--max_tokens", "100000000")
    one_error(code, err, r"a smaller --max_tokens would shrink the cache")
    assert "rows" not in err


def test_reset_and_help_take_no_text(folder, monkeypatch, capsys):
    code, out, err = inprocess(monkeypatch, capsys, "chat", folder, "--max_tokens", "2",
                               stdin="/reset extra\n/help me\n/frob\n")
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 1 and len(errors) == 3, err
    assert errors[0].startswith("error: /reset takes no text, got 'extra'; nothing was done")
    assert errors[1].startswith("error: /help takes no text, got 'me'")
    assert "//TEXT sends /TEXT as a message" in errors[2] and "[a new conversation]" not in err


def test_a_chat_message_starting_with_a_slash_is_sent_after_a_double_slash(folder, monkeypatch, capsys):
    said = []
    real = main.Chat.say
    monkeypatch.setattr(main.Chat, "say", lambda self, user, **kw: (said.append(user), real(self, user, **kw))[1])
    code, out, err = inprocess(monkeypatch, capsys, "chat", folder, "--max_tokens", "2",
                               stdin="//usr/bin is a folder\n/help\n")
    assert code == 0 and said == ["/usr/bin is a folder"], err
    assert "//TEXT" in err  # /help lists the escape
    assert "//TEXT" in (ROOT / "README.md").read_text()


def _nan_folder(folder, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = shutil.copytree(folder, tmp_path / "nan")
    state = load_file(broken / "consolidated.safetensors")
    state["layers.1.feed_forward.w2.weight"][0, 0] = float("nan")
    save_file(state, str(broken / "consolidated.safetensors"))
    return broken


@pytest.mark.parametrize("command", ["chat", "interactive"])
def test_sessions_exit_1_after_a_line_refused_or_not_answered(command, folder, tmp_path, monkeypatch, capsys):
    code, out, err = inprocess(monkeypatch, capsys, command, folder, "--max_tokens", "2", stdin="\nTo be\n")
    assert code == 1 and "error: empty" in err and out.strip(), err
    code, out, err = inprocess(monkeypatch, capsys, command, _nan_folder(folder, tmp_path), "--max_tokens", "2",
                               stdin="To be\nThe slings\n")
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 1 and len(errors) == 2 and "non-finite logits" in errors[0], err


@pytest.mark.parametrize("command", ["chat", "interactive"])
def test_ctrl_c_at_the_prompt_exits_130(command, folder, monkeypatch, capsys):
    from mistral import terminal

    def interrupted(marker):
        raise KeyboardInterrupt

    monkeypatch.setattr(terminal, "_read_line", interrupted)
    code, out, err = inprocess(monkeypatch, capsys, command, folder)
    assert code == 130 and "Traceback" not in err, err


@pytest.mark.parametrize("command", ["demo", "chat", "interactive"])
def test_a_closed_stdout_is_said_before_running(command, folder):
    code, out, err = cli(shell=f"{sys.executable} -m main {command} {folder} --max_tokens 2 >&-", stdin=b"To be\n")
    assert code == 1 and err.strip().splitlines() == ["error: cannot write the output (stdout is closed)"], err


def test_readme_exit_statuses_are_the_code_s():
    """README's exit-status list is the one mistral/cli.py's docstring gives, word for word."""
    import re

    from mistral import cli as cli_module

    def said(text):
        return " ".join(re.search(r"Exit status: (.*?)(\n\n|$)", text, re.S)[1].split())

    assert said((ROOT / "README.md").read_text()) == said(cli_module.__doc__)


def test_building_the_kernels_is_timed_apart_from_the_first_step(tmp_path, monkeypatch):
    """With no kernels built yet (a fresh XDG_CACHE_HOME), the second it takes to compile them landed in demo's
    pre-fill figure (6-8 tokens/s instead of about 1,000): it is done and said at load, and the build is kept there."""
    if shutil.which("cc") is None and not os.environ.get("CC"):
        pytest.skip("no C compiler")
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    code, _, err = cli("demo", "--max_tokens", "3")
    assert code == 0, err
    lines = err.splitlines()
    built = [i for i, line in enumerate(lines) if line.startswith("built the CPU kernels (kernels.c) in ")]
    loaded = [i for i, line in enumerate(lines) if line.startswith("loaded ")]
    assert len(built) == 1 and loaded and loaded[0] < built[0] < len(lines) - 1, err  # before the figures
    assert list((cache / "mistral").glob("kernels-*.so"))
    code, _, err = cli("demo", "--max_tokens", "3")
    assert code == 0 and "built the CPU kernels" not in err, err
