"""What several test files share: tiny random models and their folders, and running the command line."""
import dataclasses
import http.client
import io
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import main
from mistral.model import ModelArgs, Transformer

ROOT = Path(__file__).resolve().parent.parent

TINY = dict(dim=32, n_layers=2, head_dim=8, hidden_dim=48, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
            vocab_size=64, sliding_window=5, rope_theta=1e4)
MOE = {"num_experts": 4, "num_experts_per_tok": 2}  # params.json's "moe" block: 4 experts, 2 a token
SIX_EXPERTS = dict(moe={"num_experts": 6, "num_experts_per_tok": 2})  # overrides for tiny_params: 6 experts, 2 a token
# Three prompts around a window of 5: one longer than two windows, one shorter than a window, one in between.
PROMPTS = [[1, 9, 27, 17, 51, 25, 11, 33, 3, 9, 60, 4, 2, 13], [1, 6, 7], [1, *range(40, 52)]]


def tiny_params(**overrides) -> dict:
    return {**TINY, **overrides}


def random_model(params: dict, seed: int = 0, max_batch_size: int = 4) -> Transformer:
    """A model with random weights of a useful scale: logits differ clearly between tokens."""
    torch.manual_seed(seed)
    model = Transformer(ModelArgs.from_dict(dict(params)), max_batch_size=max_batch_size)
    return randomized(model, "tok_embeddings")


def randomized(model: torch.nn.Module, embedding: str) -> torch.nn.Module:
    """model with random weights of a useful scale, drawn from torch's global generator: norm weights near 1, the
    embedding (the parameter whose name holds `embedding`) of unit variance, every other matrix scaled by its
    fan-in. In eval mode."""
    with torch.no_grad():
        for name, t in model.named_parameters():
            if name.endswith("norm.weight"):
                t.copy_(1 + 0.1 * torch.randn_like(t))
            elif embedding in name:
                t.normal_()
            else:
                t.normal_(std=t.shape[-1] ** -0.5)
    return model.eval()


def params_json(args: ModelArgs) -> dict:
    d = dataclasses.asdict(args)
    return {k: v for k, v in d.items() if v is not None}


def save_folder(model: Transformer, folder: Path, fmt: str = "safetensors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(params_json(model.args)))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if fmt == "safetensors":
        save_file(state, str(folder / "consolidated.safetensors"))
    else:
        torch.save(state, folder / "consolidated.00.pth")
    return folder


def save_with_tokenizer(model: Transformer, folder: Path, tokenizer_file: Path) -> Path:
    """save_folder, with tokenizer_file beside the weights as tokenizer.model."""
    save_folder(model, folder)
    shutil.copy(tokenizer_file, folder / "tokenizer.model")
    return folder


class Reached(Exception):
    """Raised where loading would first touch the GPU: everything before it ran."""


def cli(*args, stdin: bytes | str | None = b"", shell: str | None = None, timeout: int = 300):
    """`python -m main *args` (or the shell command `shell`) in a process of its own: (exit status, stdout, stderr)."""
    cmd = shell if shell is not None else [sys.executable, "-m", "main", *map(str, args)]
    stdin = stdin.encode() if isinstance(stdin, str) else stdin
    proc = subprocess.run(cmd, cwd=ROOT, input=stdin, capture_output=True, timeout=timeout, shell=shell is not None)
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


def wait_healthy(port: int, proc: subprocess.Popen, seconds: float = 120) -> None:
    """Until `serve`, started as proc on port, answers /health with 200; fails with its stderr if it ends first, or
    after `seconds`."""
    deadline = time.time() + seconds
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
        time.sleep(0.2)


def inprocess(monkeypatch, capsys, *args, stdin: str = ""):
    """main.main() with argv `main *args` and stdin `stdin`, in this process: (exit status, stdout, stderr)."""
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
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("loaded ")]
    assert code == status, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(pattern, lines[0]), err


def engine_first(model):
    """What generate runs each step: a decode step on mistral.cpu's engine where it takes it, anything else on the
    model. Skips the test where the engine does not apply (a model not on a CPU) or cannot be built (no C compiler)."""
    from mistral.cpu import CpuDecoder

    decoder = CpuDecoder.of(model)
    if decoder is None:
        pytest.skip("the engine runs on a CPU only" if model.device.type != "cpu"
                    else "no C compiler: the engine cannot be built here")

    def forward(ids, seqlens, cache=None, rows=None):
        logits = decoder.step(ids, seqlens, cache, rows)
        return model(ids, seqlens, cache, rows=rows) if logits is None else logits

    return forward


def scaled_per_group(x, group=32):
    """x (M, K) as the int8 and 4-bit kernels scale it before rounding (kernels.c, 1b), with the same fp32 operations:
    (t, top), top (M, G, 1) the max|x| of each group of 32 (or `group`: 256 for the K-quants, 1c) along a row (zero
    past K) and t (M, G, group) = x * inv, inv = 127 / top.

    inv is one fp32 division, as the C code's. Not torch's `127 / top`: that is Tensor.__rtruediv__, which computes
    top.reciprocal() * 127, two roundings, and differs from the division by an ulp for about a quarter of all maxima;
    an x whose t lies within an ulp of a boundary k + 1/2 then rounds to the other integer
    (tests/test_kernels.py::test_quantized_weights_round_x_as_rounded_per_group)."""
    x = x.float()
    M, K = x.shape
    G = -(-K // group)
    xp = torch.zeros(M, G * group)
    xp[:, :K] = x
    xg = xp.view(M, G, group)
    top = xg.abs().amax(2, keepdim=True)
    inv = torch.where(top > 0, torch.full_like(top, 127).div(top), 0)
    return xg * inv, top


def rounded_per_group(x, rounding=None, group=32):
    """x (M, K) as the kernel rounds it (kernels.c, 1b), in float64: each group of 32 (or `group`) along a row is
    e * an integer in -127 .. 127, e = max|x| / 127, with the same fp32 operations as the C code (scaled_per_group) so
    that every integer agrees. The integers are torch.round's, to the nearest and ties to even, as lrintf's in the
    default rounding mode; or rounding(t, top)'s, given scaled_per_group's (t, top)."""
    M, K = x.shape
    t, top = scaled_per_group(x, group)
    q = t.round() if rounding is None else rounding(t, top)
    return (q * (top / 127)).double().view(M, -1)[:, :K]
