"""Every input gets a clear answer before any work is done (issue #13): one line, the right exit status, no traceback,
nothing silently changed. One test function per family of the probe; each covers the probe's examples and the cases of
the same family found beside them."""
import json
import math
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
from helpers import random_model, save_folder, tiny_params

import main
from mistral import checkpoint, pipeline
from mistral.args import ModelArgs
from mistral.errors import MistralError
from mistral.generate import generate, generate_ids
from mistral.sampling import sample

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer_file) -> Path:
    out = save_folder(random_model(tiny_params(vocab_size=VOCAB, sliding_window=None)), tmp_path_factory.mktemp("m"))
    shutil.copy(tokenizer_file, out / "tokenizer.model")
    return out


def cli(*args, stdin: bytes | None = b"", shell: str | None = None, timeout: int = 300):
    cmd = shell if shell is not None else [sys.executable, "-m", "main", *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, input=stdin, capture_output=True, timeout=timeout, shell=shell is not None)
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


def inprocess(monkeypatch, capsys, *args, stdin: str = ""):
    import io

    monkeypatch.setattr(sys, "argv", ["main", *map(str, args)])
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    with pytest.raises(SystemExit) as e:
        main.main()
        sys.exit(0)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def one_error(code, err, pattern, status=2):
    """Exactly one line, 'error: ...', matching pattern (beside the 'loaded ...' line of a failure after loading); no
    traceback."""
    import re

    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("loaded ")]
    assert code == status, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(pattern, lines[0]), err


# 1. A misspelled flag ran the whole job first ------------------------------------------------------------------

FLAGS = {
    "two misspelled options": (["demo", "{m}", "--max_token", "5", "--temprature", "0.7"],
                               r"demo has no option --max_token; did you mean --max_tokens\?"),
    "convert --too": (["convert", "{m}", "{tmp}/out", "--too", "hf"], r"convert has no option --too; did you mean --to\?"),
    "a command misspelled": (["dmeo"], r"unknown command 'dmeo'; did you mean demo\?"),
    "chat --temp": (["chat", "{m}", "--temp", "0.5"], r"chat has no option --temp; did you mean --temperature|--top_p"),
    "interactive --instrct": (["interactive", "{m}", "--instrct"], r"did you mean --instruct\?"),
    "explain --seqlen": (["explain", "--seqlen", "3,4"], r"did you mean --seqlens\?"),
    "quantize --to8": (["quantize", "{m}", "{tmp}/q", "--to8"], r"quantize has no option --to8"),
    "too many positional arguments": (["convert", "a", "b", "c", "d"], r"convert takes at most 3 arguments in order"),
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


# 2. Config values were barely checked ---------------------------------------------------------------------------

BASE = tiny_params()
CONFIGS = {
    "norm_eps a string": ({"norm_eps": "abc"}, r"'norm_eps' must be a finite number above 0, got 'abc'"),
    "rope_theta a string": ({"rope_theta": "x"}, r"'rope_theta' must be a finite number above 0"),
    "norm_eps NaN": ({"norm_eps": math.nan}, r"'norm_eps' must be a finite number above 0, got nan"),
    "norm_eps -1": ({"norm_eps": -1}, r"'norm_eps' must be a finite number above 0"),
    "norm_eps infinite": ({"norm_eps": math.inf}, r"'norm_eps' must be a finite number above 0"),
    "rope_theta 0": ({"rope_theta": 0}, r"'rope_theta' must be a finite number above 0, got 0"),
    "rope_theta negative": ({"rope_theta": -1e4}, r"'rope_theta' must be a finite number above 0"),
    "moe of strings": ({"moe": {"num_experts": "8", "num_experts_per_tok": "2"}}, r"'moe.num_experts' must be a whole"),
    "moe a list": ({"moe": [8, 2]}, r"'moe' must be an object"),
    "moe of lists": ({"moe": {"num_experts": [8], "num_experts_per_tok": 2}}, r"'moe.num_experts' must be a whole"),
    "moe with an unknown key": ({"moe": {"num_experts": 4, "num_experts_per_tok": 2, "shared": 1}}, r"shared"),
    "sliding_window 1e15": ({"sliding_window": 1e15}, r"'sliding_window' must be a whole number from 1 to"),
    "sliding_window fractional": ({"sliding_window": 2.5}, r"'sliding_window' must be a whole number"),
    "dim a string": ({"dim": "32"}, r"'dim' must be a whole number"),
    "n_layers huge": ({"n_layers": 10**12}, r"'n_layers' must be a whole number from 1 to"),
    "head_dim odd": ({"head_dim": 7, "n_heads": 4, "n_kv_heads": 2}, r"'head_dim' must be even"),
    "vocab_size boolean": ({"vocab_size": True}, r"'vocab_size' must be a whole number"),
}


@pytest.mark.parametrize("case", CONFIGS)
def test_config_values_are_checked_when_read(case):
    change, message = CONFIGS[case]
    with pytest.raises(MistralError, match=message) as e:
        ModelArgs.from_dict({**BASE, **change})
    assert "\n" not in str(e.value) and str(e.value).startswith("params.json")


def test_config_values_get_their_types():
    args = ModelArgs.from_dict({**BASE, "dim": 32.0, "norm_eps": 1, "rope_theta": 10000, "sliding_window": 5.0})
    assert (type(args.dim), type(args.norm_eps), type(args.rope_theta), type(args.sliding_window)) == (int, float,
                                                                                                      float, int)


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


def test_a_broken_config_stops_the_cli_in_one_line(folder, tmp_path, monkeypatch, capsys):
    broken = shutil.copytree(folder, tmp_path / "m")
    params = json.loads((broken / "params.json").read_text())
    (broken / "params.json").write_text(json.dumps({**params, "norm_eps": float("nan")}))  # json writes NaN
    code, out, err = inprocess(monkeypatch, capsys, "demo", broken, "--max_tokens", "2")
    one_error(code, err, r"params.json: 'norm_eps' must be a finite number above 0, got nan")


# 3. Sampling numbers at the edges -------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature, top_p, top_k", [(1e-40, 0.8, 0), (1e-45, 1.0, 0), (1e-320, 0.9, 0),
                                                       (1.0, 1e-300, 0), (5.0, 1e-45, 0), (1e-38, 1e-45, 3),
                                                       (0.7, 1e-30, 1)])
def test_every_accepted_sampling_value_works_as_its_limit(temperature, top_p, top_k):
    """Where the arithmetic underflows (a temperature or top_p that rounds to 0), the sampler is its limit: greedy."""
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(1)) * 4
    got = sample(logits, temperature, top_p, top_k, torch.Generator().manual_seed(0))
    assert torch.equal(got, logits.argmax(-1))


def test_sampling_at_tiny_temperatures_through_generate():
    model = random_model(tiny_params())
    greedy = generate_ids([[1, 2, 3]], model, max_tokens=6)[0]
    for temperature in (1e-40, 1e-320):
        assert generate_ids([[1, 2, 3]], model, max_tokens=6, temperature=temperature,
                            generator=torch.Generator().manual_seed(0))[0] == greedy


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


# 4. Requests too large to run ---------------------------------------------------------------------------------

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


# 5. Output folders ----------------------------------------------------------------------------------------------

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


@pytest.mark.parametrize("to", ["native", "hf"])
def test_convert_writes_configs_the_loader_takes(folder, tmp_path, to):
    dst = checkpoint.convert(folder, tmp_path / to, to=to)
    assert checkpoint.read_args(dst) == checkpoint.read_args(folder)


# 6. Pipeline set-ups and failures -------------------------------------------------------------------------------

def torchrun(nproc, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "main",
           *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize("flags, message", [([], "torchrun started 2 processes but --num_pipeline_ranks is 1"),
                                            (["--num_pipeline_ranks", "3"],
                                             "--num_pipeline_ranks 3 but torchrun started 2 processes")])
def test_a_pipeline_set_up_that_does_not_add_up_is_said_once(flags, message, folder):
    code, out = torchrun(2, "demo", folder, "--max_tokens", "2", *flags)
    assert code != 0 and out.count(message) == 1, out[-3000:]
    assert "==========" not in out.split("error:")[0]  # nothing was generated before it


def test_a_lost_rank_ends_the_others_in_one_line(folder, monkeypatch, capsys):
    import torch.distributed as dist

    def lost(*args, **kwargs):
        raise dist.DistBackendError("Connection closed by peer [127.0.0.1]:29500")

    monkeypatch.setattr(main, "generate_ids", lost)
    code, out, err = inprocess(monkeypatch, capsys, "demo", folder)
    one_error(code, err, r"pipeline rank .* lost another rank and stops \(Connection closed by peer", status=3)


def test_prompts_are_handed_to_the_ranks_without_the_failure_timeout():
    """interactive under torchrun waited for the next line in a broadcast with the 5-minute timeout of a dead peer,
    so an idle person ended the run: the lines go over a group of their own, with no such timeout."""
    import inspect
    from datetime import timedelta

    from mistral import terminal

    source = inspect.getsource(terminal._read_line)
    assert "group=_waiting_group()" in source
    assert timedelta(days=365) > pipeline.TIMEOUT and "timeout=timedelta(days=365)" in inspect.getsource(
        terminal._waiting_group.__wrapped__)


# 7. Interrupts and the terminal ---------------------------------------------------------------------------------

def test_ctrl_c_while_torch_loads_ends_quietly():
    proc = subprocess.Popen([sys.executable, "-m", "main", "demo"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    time.sleep(0.4)  # importing torch and the rest takes a few seconds
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and b"Traceback" not in err, err


def test_ctrl_c_while_the_kernels_compile_leaves_them_on(monkeypatch):
    from mistral.cpu import kernels

    kernels.load.cache_clear()
    real = kernels._build

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(kernels, "_build", interrupted)
    monkeypatch.setenv("XDG_CACHE_HOME", str(Path(os.environ.get("TMPDIR", "/tmp")) / f"fresh-{os.getpid()}"))
    with pytest.raises(KeyboardInterrupt):
        kernels.load()
    monkeypatch.setattr(kernels, "_build", real)
    assert kernels.available()  # the next use builds them: nothing was kept of the interrupted attempt
    monkeypatch.undo()
    kernels.load.cache_clear()


def test_a_closed_stdin_is_the_end_of_input(folder):
    for command in ("interactive", "chat"):
        code, out, err = cli(shell=f"{sys.executable} -m main {command} {folder} <&-", stdin=None)
        assert code == 0 and "Traceback" not in err, err


def test_output_to_a_full_device_gets_one_line(folder):
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    code, out, err = cli(shell=f"{sys.executable} -m main demo {folder} --max_tokens 2 > /dev/full", stdin=None)
    assert code == 1 and "Traceback" not in err and err.strip().splitlines()[-1] == \
        "error: cannot write the output (No space left on device)", err


# 8. Silent changes ------------------------------------------------------------------------------------------

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


# 9. Messages that named the wrong problem --------------------------------------------------------------------

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
