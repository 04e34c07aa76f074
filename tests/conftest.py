import io
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py, tests/oracle.py
torch.set_num_threads(2)

# After the two lines above: helpers is found on that path, and importing mistral runs with those threads.
from helpers import Reached, random_model, save_folder, save_with_tokenizer, tiny_params  # noqa: E402

from mistral import pipeline  # noqa: E402
from mistral.checkpoint import load as loader  # noqa: E402

VOCAB = 320
TEXT = """To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles
And by opposing end them. To die, to sleep,
No more; and by a sleep to say we end
The heart-ache and the thousand natural shocks
That flesh is heir to."""


def train_tokenizer(vocab_size: int) -> bytes:
    """A sentencepiece model (BOS 1, EOS 2, byte fallback) trained on a few lines of verse, as bytes."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT.splitlines() * 20), model_writer=buf,
                                   vocab_size=vocab_size, model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, minloglevel=2)
    return buf.getvalue()


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory) -> Path:
    """A VOCAB-piece tokenizer.model."""
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    path.write_bytes(train_tokenizer(VOCAB))
    return path


def pytest_addoption(parser):
    parser.addoption("--device", default=os.environ.get("MISTRAL_TEST_DEVICE", "cpu"),
                     help="where the tests that take a `device` run their models: cpu (the default) or cuda[:N]; "
                          "also the environment variable MISTRAL_TEST_DEVICE. python -m bench.gpu passes cuda.")


def pytest_generate_tests(metafunc):
    """A test that takes `device` runs there, and its id says where: test_x[cuda]."""
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", [metafunc.config.getoption("--device")], indirect=True)


@pytest.fixture
def device(request) -> torch.device:
    device = torch.device(request.param)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"--device {device} but CUDA is not available here")
    return device


@pytest.fixture(scope="session")
def folder(tmp_path_factory, tokenizer_file) -> Path:
    """A tiny random model without a sliding window, of VOCAB tokens, with tokenizer_file, in the native layout."""
    model = random_model(tiny_params(vocab_size=VOCAB, sliding_window=None))
    return save_with_tokenizer(model, tmp_path_factory.mktemp("m"), tokenizer_file)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """helpers.TINY's model, in the native layout, without a tokenizer."""
    return save_folder(random_model(tiny_params()), tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine with two H100s, as torch would describe it; cuda:0 is current, as it is in a fresh process. Returns
    the devices the loader asked about memory for, and those it made current."""
    seen = {"memory": [], "current": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: seen["current"].append(torch.device(device)))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))

    def memory_available(device):
        seen["memory"].append(device)
        raise Reached

    monkeypatch.setattr(loader, "memory_available", memory_available)
    monkeypatch.setattr(pipeline, "pipeline_rank", lambda n: 1)  # this process is rank 1 of 2
    return seen


@pytest.fixture(scope="session")
def c_compiler():
    """Skips the test where mistral.cpu's kernels cannot be built: no C compiler, cc or gcc, on the PATH."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler: the kernel cannot be built here")
