"""The command line: demo and interactive output, one_file_ref agreement, and errors a person can act on."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import VOCAB
from helpers import random_model, save_folder, tiny_params

import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tokenizer_file) -> Path:
    """A tiny random model with a real sentencepiece tokenizer, in the native layout."""
    folder = save_folder(random_model(tiny_params(vocab_size=VOCAB, n_layers=3)), tmp_path_factory.mktemp("model"))
    shutil.copy(tokenizer_file, folder / "tokenizer.model")
    return folder


def run_cli(args, stdin=""):
    proc = subprocess.run([sys.executable, "-m", "main", *args], cwd=ROOT, input=stdin, capture_output=True,
                          text=True, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def run_inprocess(monkeypatch, capsys, args, stdin=""):
    import io

    monkeypatch.setattr(sys, "argv", ["main", *args])
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = 0
    try:
        main.main()
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_importing_main_leaves_ctrl_c_alone():
    """The quiet exit on Ctrl-C while torch loads is for `python -m main` only: a test or script that imports main
    keeps Python's KeyboardInterrupt."""
    check = "import main, signal; assert signal.getsignal(signal.SIGINT) is signal.default_int_handler"
    proc = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_demo_prints_three_completions_and_a_summary(model_folder):
    code, out, err = run_cli(["demo", str(model_folder), "--max_tokens", "7"])
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
    code, out, err = run_inprocess(monkeypatch, capsys,
                                   ["interactive", str(model_folder), "--max_tokens", "5"], "To be\nThe slings\n")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("To be") and lines[1].startswith("The slings")
    # The streamed text is exactly what generate() returns.
    model, tok = main.load(str(model_folder), max_batch_size=1, num_pipeline_ranks=1, device="cpu", dtype="auto")
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
    monkeypatch.setattr(main, "generate_ids", lambda prompts, *a, **k: (sent.append(prompts[0]), real(prompts, *a, **k))[1])
    code, out, err = run_inprocess(monkeypatch, capsys,
                                   ["interactive", str(model_folder), "--max_tokens", "3", "--instruct"], " To be \n")
    assert code == 0 and len(out.splitlines()) == 1, err
    reference = MistralTokenizer.from_file(str(model_folder / "tokenizer.model"))
    want = reference.encode_chat_completion(ChatCompletionRequest(messages=[UserMessage(content=" To be ")])).tokens
    assert sent == [want]


def test_interactive_prints_a_stats_line_after_each_answer(model_folder, monkeypatch, capsys):
    code, out, err = run_inprocess(monkeypatch, capsys, ["interactive", str(model_folder), "--max_tokens", "4"],
                                   "To be\nThe slings\n")
    stats = [line for line in err.splitlines() if line.startswith("prefill ")]
    assert code == 0 and len(stats) == 2, err
    assert __import__("re").fullmatch(r"prefill \d+ tokens in [\d.]+ s \([\d,.]+ tokens/s\), decode 3 tokens in [\d.]+ s "
                                      r"\([\d,.]+ tokens/s\), context \d+ tokens", stats[0]), stats[0]


def test_interactive_rejects_an_empty_prompt_and_carries_on(model_folder, monkeypatch, capsys):
    code, out, err = run_inprocess(monkeypatch, capsys, ["interactive", str(model_folder), "--max_tokens", "2"],
                                   "\nTo be\n")
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
    "vocab mismatch": (_edit_params(vocab_size=128), "tokenizer.model has 320 tokens but params.json says vocab_size=128"),
}


@pytest.mark.parametrize("case", FOLDER_ERRORS)
def test_broken_model_folder(case, model_folder, tmp_path, monkeypatch, capsys):
    change, message = FOLDER_ERRORS[case]
    folder = _broken(tmp_path, model_folder, change)
    code, out, err = run_inprocess(monkeypatch, capsys, ["demo", str(folder), "--max_tokens", "2"])
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert __import__("re").search(message, err), err


def test_tokenizer_for_another_model(model_folder, tmp_path, monkeypatch, capsys):
    """Weights and params agree, but the tokenizer has a different vocabulary."""
    from conftest import train_tokenizer

    other = train_tokenizer(300)
    folder = _broken(tmp_path, model_folder, lambda f: (f / "tokenizer.model").write_bytes(other))
    code, _, err = run_inprocess(monkeypatch, capsys, ["demo", str(folder)])
    assert code == 2 and f"has 300 tokens but params.json says vocab_size={VOCAB}" in err


OPTION_ERRORS = {
    "negative max_tokens": (["--max_tokens", "-1"], "max_tokens must be"),
    "fractional max_tokens": (["--max_tokens", "2.5"], "max_tokens must be"),
    "negative temperature": (["--temperature", "-0.1"], "temperature must be a finite number >= 0"),
    "temperature not a number": (["--temperature", "hot"], r"temperature must be a finite number >= 0 \(0 is greedy\), got 'hot'"),
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
    code, out, err = run_inprocess(monkeypatch, capsys, ["demo", str(model_folder), *flags])
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert __import__("re").search(message, err), err


def test_user_errors_print_no_traceback_end_to_end(model_folder):
    for args in (["demo", "/no/such/folder"], ["demo", str(model_folder), "--top_p", "2"],
                 ["interactive", str(model_folder), "--device", "quantum"]):
        code, out, err = run_cli(args)
        assert code == 2 and "Traceback" not in err and err.startswith("error: "), (args, err)
