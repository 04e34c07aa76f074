"""Pipeline sharding with real processes: torchrun, gloo, 2 and 3 ranks over 5 layers."""
import ast
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import VOCAB
from helpers import PROMPTS, ROOT, Reached, inprocess, one_error, random_model, save_with_tokenizer, tiny_params

import main
from mistral import checkpoint

from mistral.cache import RotatingBufferCache
from mistral.checkpoint import load_model
from mistral.errors import MistralError
from mistral.generate import generate_ids
from mistral.model import Transformer, pipeline_layers

N_LAYERS = 5  # divides by neither 2 nor 3


def torchrun(nproc: int, *args, stdin: str = "", timeout: int = 240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, input=stdin, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer_file):
    out = {}
    for name, extra in [("dense", {}), ("moe", {"moe": {"num_experts": 4, "num_experts_per_tok": 2}})]:
        model = random_model(tiny_params(n_layers=N_LAYERS, vocab_size=VOCAB, **extra))
        out[name] = save_with_tokenizer(model, tmp_path_factory.mktemp(name), tokenizer_file)
    return out


def test_layer_split():
    assert [list(pipeline_layers(5, 2, r)) for r in range(2)] == [[0, 1, 2], [3, 4]]
    assert [list(pipeline_layers(5, 3, r)) for r in range(3)] == [[0, 1], [2, 3], [4]]
    assert [list(pipeline_layers(4, 4, r)) for r in range(4)] == [[0], [1], [2], [3]]


def test_splits_that_leave_a_rank_empty_are_refused():
    with pytest.raises(MistralError, match="between 1 and n_layers"):
        Transformer(random_model(tiny_params(n_layers=2)).args, 0, 3)
    with pytest.raises(MistralError, match="without layers"):
        Transformer(random_model(tiny_params(n_layers=5)).args, 0, 4)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_match_one_process(world, folders, tmp_path):
    proc = torchrun(world, str(ROOT / "tests" / "pipeline_worker.py"), str(tmp_path), *map(str, folders.values()))
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for name, folder in folders.items():
        model = load_model(folder, max_batch_size=3, device="cpu")
        with torch.no_grad():
            packed = model(torch.tensor(sum(PROMPTS, [])), [len(p) for p in PROMPTS])
            cache = RotatingBufferCache(N_LAYERS, 3, model.args.sliding_window, model.args.n_kv_heads,
                                        model.args.head_dim)
            chunked = torch.cat([model(torch.tensor(PROMPTS[0][i : i + 4]), [len(PROMPTS[0][i : i + 4])], cache)
                                 for i in range(0, len(PROMPTS[0]), 4)])
        greedy = generate_ids(PROMPTS, model, max_tokens=12, chunk_size=5)
        sampled = generate_ids(PROMPTS, model, max_tokens=12, temperature=1.0, top_p=0.9,
                               generator=torch.Generator().manual_seed(7))
        scored = generate_ids(PROMPTS, model, max_tokens=3, chunk_size=5, prompt_logprobs=True)
        longer = generate_ids(PROMPTS, model, max_tokens=24)
        all_params = sorted(model.state_dict())
        owned = []
        for rank, report in enumerate(reports):
            got = report[str(folder)]
            if rank == world - 1:  # the rank with the head has the logits
                torch.testing.assert_close(got["packed"], packed)
                torch.testing.assert_close(got["chunked"], chunked)
            else:  # the others have nothing of V numbers a position: the logits never travel
                assert got["packed"] is None and got["chunked"] is None
            assert got["greedy"][0] == greedy[0], (name, rank)
            torch.testing.assert_close(torch.tensor(sum(got["greedy"][1], [])), torch.tensor(sum(greedy[1], [])))
            # The worker seeded every rank but the last differently: every rank has the last rank's samples.
            assert got["sampled"][0] == sampled[0], (name, rank)
            torch.testing.assert_close(torch.tensor(sum(got["sampled"][1], [])), torch.tensor(sum(sampled[1], [])))
            assert got["speculated"][0] == longer[0], (name, rank)  # speculative decoding: plain decoding's ids
            assert got["scored"][0] == scored[0], (name, rank)
            torch.testing.assert_close(torch.tensor(sum(got["scored"][1], [])), torch.tensor(sum(scored[1], [])))
            # Per step, tokens and log-probabilities of the rows scored (and a flag a rank), never (N, V) logits.
            most = sum(map(len, PROMPTS)) + world
            assert got["exchanged"] and all(shape[0] == 2 and world < shape[1] <= most and dtype == torch.float64
                                            for shape, dtype in got["exchanged"]), got["exchanged"]
            layers = pipeline_layers(N_LAYERS, world, rank)
            expected = [k for k in all_params if (k.startswith("layers.") and int(k.split(".")[1]) in layers)
                        or (k.startswith("tok_embeddings") and rank == 0)
                        or (k.startswith(("norm.", "output.")) and rank == world - 1)]
            assert got["params"] == expected, (name, rank)
            owned += got["params"]
        assert sorted(owned) == all_params  # together the ranks hold every tensor exactly once


def test_torchrun_demo_prints_what_one_process_prints(folders):
    args = ["demo", str(folders["dense"]), "--max_tokens", "10", "--chunk_size", "4"]
    single = subprocess.run([sys.executable, "-m", "main", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=240)
    piped = torchrun(2, "-m", "main", *args, "--num_pipeline_ranks", "2")
    assert single.returncode == 0 and piped.returncode == 0, piped.stderr[-3000:]
    assert piped.stdout == single.stdout  # printed once, by rank 0


@pytest.fixture(scope="module")
def shipped_int8(tmp_path_factory) -> Path:
    """The shipped model, written with int8 weights by `quantize --to int8`."""
    out = tmp_path_factory.mktemp("int8") / "model"
    checkpoint.quantize(ROOT / "mistral" / "assets", out, to="int8")
    return out


@pytest.mark.parametrize("model, flags, world", [
    ("shipped", ["--quantize", "int8"], 2), ("shipped", ["--quantize", "int4"], 3), ("int8 folder", [], 2),
    ("moe", ["--quantize", "int4"], 2), ("moe", ["--quantize", "int8"], 3)])
def test_torchrun_demo_of_int8_and_int4_weights_prints_what_one_process_prints(model, flags, world, folders,
                                                                               shipped_int8):
    """Pipeline ranks compute the int8 and int4 products as one process does (x rounded per group of 32, in C on
    every rank: mistral/cpu/linears.py), so greedy decoding gives the same tokens, on the shipped model (with
    --quantize, or a folder `quantize` wrote) and a mixture of experts."""
    path = {"shipped": [], "int8 folder": [str(shipped_int8)], "moe": [str(folders["moe"])]}[model]
    args = ["demo", *path, "--max_tokens", "24", *flags]
    single = subprocess.run([sys.executable, "-m", "main", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=240)
    piped = torchrun(world, "-m", "main", *args, "--num_pipeline_ranks", str(world))
    assert single.returncode == 0 and piped.returncode == 0, (single.stderr + piped.stderr)[-3000:]
    assert piped.stdout == single.stdout


def test_torchrun_interactive_reads_on_rank_zero_and_stops_at_eof(folders):
    args = ["interactive", str(folders["moe"]), "--max_tokens", "6", "--num_pipeline_ranks", "3"]
    single = subprocess.run([sys.executable, "-m", "main", *args[:-2]], cwd=ROOT, input="To be\nThe slings\n",
                            capture_output=True, text=True, timeout=240)
    piped = torchrun(3, "-m", "main", *args, stdin="To be\nThe slings\n")
    assert single.returncode == 0 and piped.returncode == 0, piped.stderr[-3000:]
    assert piped.stdout == single.stdout and len(piped.stdout.splitlines()) == 2


def test_rank_count_mismatch(folders):
    proc = torchrun(2, "-m", "main", "demo", str(folders["dense"]), "--num_pipeline_ranks", "3")
    assert proc.returncode != 0
    assert "--num_pipeline_ranks 3 but torchrun started 2 processes" in proc.stderr
    # torchrun's own launcher prints a traceback when a child fails; none of it may come from our code.
    assert 'main.py"' not in proc.stderr and "/mistral/" not in proc.stderr


def test_a_dead_rank_ends_the_others(folders, tmp_path):
    """Rank 1 dies after loading; rank 0, waiting for its activations, must fail quickly, not hang."""
    script = tmp_path / "die.py"
    script.write_text(
        "import os, sys, torch, torch.distributed as dist\n"
        "from datetime import timedelta\n"
        "from mistral.checkpoint import load_model\n"
        "dist.init_process_group('gloo', timeout=timedelta(seconds=20))\n"
        f"m = load_model({str(folders['dense'])!r}, num_pipeline_ranks=2, device='cpu')\n"
        "if dist.get_rank() == 1:\n"
        "    os._exit(3)\n"
        "m(torch.tensor([1, 2, 3]), [3])\n")
    start = time.monotonic()
    proc = torchrun(2, str(script), timeout=120)
    assert proc.returncode != 0
    assert time.monotonic() - start < 90


def outcomes(folder: Path, tmp_path: Path, nproc: int, body: str) -> list:
    """Runs `body` on nproc gloo ranks, with `m` the model of `folder` split over them and `rank` this one's, and
    returns the `got` each rank left (a Python literal). The process group's timeout is 60 s (the default is 5
    minutes): every rank must end well, and all within 50 s, so none may have waited it out."""
    script = tmp_path / "ranks.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        "from datetime import timedelta\n"
        "import mistral.generate\n"
        "from mistral.errors import MistralError\n"
        "from mistral.generate import generate_ids\n"
        "from mistral.checkpoint import load_model\n"
        "dist.init_process_group('gloo', timeout=timedelta(seconds=60))\n"
        f"m = load_model({str(folder)!r}, max_batch_size=3, num_pipeline_ranks={nproc}, device='cpu')\n"
        "rank = dist.get_rank()\n"
        + textwrap.dedent(body)
        + f"open({str(tmp_path)!r} + f'/rank{{rank}}.txt', 'w').write(repr(got))\n"
        "dist.destroy_process_group()\n")
    start = time.monotonic()
    proc = torchrun(nproc, str(script), timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.monotonic() - start < 50
    return [ast.literal_eval((tmp_path / f"rank{rank}.txt").read_text()) for rank in range(nproc)]


def test_a_failure_in_any_ranks_forward_ends_every_rank_at_once(folders, tmp_path):
    """A layer raises on one of three ranks (a full GPU, say): in a pre-fill chunk no logits are taken from, in the
    next one, or in a decode step. The rank that failed raises its error, every other rank a DistError that names
    it, all at once, none waiting for the activations that will not come; the process group still works after it."""
    ranks = outcomes(folders["dense"], tmp_path, 3, """
        layer, calls = list(m.layers.values())[-1], [0]
        def run():
            return generate_ids([[1, 2, 3, 4, 5]], m, max_tokens=4, chunk_size=2)[0]
        def breaks_at(k):
            def forward(*args):
                calls[0] += 1
                if calls[0] == k:
                    raise RuntimeError('CUDA out of memory (a test)')
                return type(layer).forward(layer, *args)
            return forward
        got = [run()]
        for failing, at in [(0, 1), (1, 2), (2, 4)]:
            calls[0] = 0
            if rank == failing:
                layer.forward = breaks_at(at)
            try:
                got.append(f'finished {run()}')
            except Exception as e:
                got.append(f'{type(e).__name__}: {e}')
            layer.__dict__.pop('forward', None)
        got.append(run())
        """)
    for rank, got in enumerate(ranks):
        assert got[0] == got[-1] and len(got[0]) == 1 and len(got[0][0]) == 4, (rank, got)
        for failing, outcome in zip(range(3), got[1:4]):
            want = "RuntimeError: CUDA out of memory (a test)"
            if rank != failing:
                want = f"DistError: pipeline rank {failing} stopped on {want}"
            assert outcome == want, (rank, failing, got)


def test_a_failure_on_the_last_rank_ends_every_rank_with_its_message(folders, tmp_path):
    """Sampling fails on the last rank, the only one that samples: every rank raises the same error at once, none
    waits for a step that will not come."""
    ranks = outcomes(folders["dense"], tmp_path, 2, """
        def broken(*args, **kwargs):
            raise MistralError('sampling failed on the last rank')
        if m.is_last:
            mistral.generate.sample = broken
        try:
            mistral.generate.generate_ids([[1, 2, 3]], m, max_tokens=5, temperature=1.0)
            got = 'finished'
        except Exception as e:
            got = f'{type(e).__name__}: {e}'
        """)
    for rank, got in enumerate(ranks):
        assert got == "MistralError: sampling failed on the last rank", rank


def test_a_pipeline_rank_takes_its_gpu_from_local_rank(two_gpus, tiny_folder, monkeypatch):
    """Library users who call init_process_group themselves may never pick a GPU: the rank's is cuda:LOCAL_RANK."""
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(Reached):
        checkpoint.load_model(tiny_folder, num_pipeline_ranks=2, device="cuda")
    assert two_gpus["memory"] == [torch.device("cuda", 1)] and two_gpus["current"] == [torch.device("cuda", 1)]


def test_a_pipeline_rank_keeps_the_gpu_it_was_given(two_gpus, tiny_folder, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(Reached):
        checkpoint.load_model(tiny_folder, num_pipeline_ranks=2, device="cuda:0")
    assert two_gpus["memory"] == [torch.device("cuda", 0)]


def test_a_pipeline_rank_that_cannot_tell_its_gpu_is_one_line(two_gpus, tiny_folder, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(MistralError) as e:
        checkpoint.load_model(tiny_folder, num_pipeline_ranks=2, device="cuda")
    assert str(e.value) == ("pipeline rank 1 on CUDA needs its own GPU: set LOCAL_RANK (torchrun does) or pass "
                            "device='cuda:N'")
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(MistralError, match=r"^pipeline rank 1 was given cuda:2 but this machine has 2 GPUs"):
        checkpoint.load_model(tiny_folder, num_pipeline_ranks=2, device="cuda")
    assert two_gpus["memory"] == []


@pytest.mark.parametrize("flags, message", [([], "torchrun started 2 processes but --num_pipeline_ranks is 1"),
                                            (["--num_pipeline_ranks", "3"],
                                             "--num_pipeline_ranks 3 but torchrun started 2 processes")])
def test_a_pipeline_set_up_that_does_not_add_up_is_said_once(flags, message, folder):
    proc = torchrun(2, "-m", "main", "demo", str(folder), "--max_tokens", "2", *flags)
    code, out = proc.returncode, proc.stdout + proc.stderr
    assert code != 0 and out.count(message) == 1, out[-3000:]
    assert "==========" not in out.split("error:")[0]  # nothing was generated before it


def test_a_lost_rank_ends_the_others_in_one_line(folder, monkeypatch, capsys):
    import torch.distributed as dist

    def lost(*args, **kwargs):
        raise dist.DistBackendError("Connection closed by peer [127.0.0.1]:29500")

    monkeypatch.setattr(main, "generate_ids", lost)
    code, out, err = inprocess(monkeypatch, capsys, "demo", folder)
    one_error(code, err, r"pipeline rank .* lost another rank and stops \(Connection closed by peer", status=3)
