import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py, tests/oracle.py
torch.set_num_threads(2)

import io  # noqa: E402

import pytest  # noqa: E402

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
