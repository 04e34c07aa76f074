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
