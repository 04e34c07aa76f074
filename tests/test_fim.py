"""Fill-in-the-middle: prompts encoded as mistral_common encodes them, for the tokenizers that have FIM tokens, and
refused in one line for those that do not; the `fim` command's middle against greedy decoding computed here. The
server's side is in test_server.py."""
from pathlib import Path

import mistral_common
import pytest
import torch
from helpers import cli, one_error, random_model, save_with_tokenizer, tiny_params
from mistral_common.protocol.fim.request import FIMRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mistral.errors import MistralError
from mistral.tokenizer import Tokenizer

DATA = Path(mistral_common.__file__).parent / "data"
WITH_FIM = {"v3": "mistral_instruct_tokenizer_240323.model.v3", "v7": "mistral_instruct_tokenizer_241114.model.v7",
            "tekken": "tekken_240911.json"}
CASES = [("def f(x):\n    return", "\n\nprint(f(2))"), ("", "    return x\n"), ("naïve = '日本語'", " # é"),
         ("a = 1\n", "")]


@pytest.mark.parametrize("version", list(WITH_FIM))
def test_fim_prompts_are_mistral_commons(version):
    """Ours equal mistral_common's encode_fim on the released file, and read as BOS, [SUFFIX], the suffix, [PREFIX],
    then the prefix's own encoding."""
    ours, theirs = Tokenizer(DATA / WITH_FIM[version]), MistralTokenizer.from_file(str(DATA / WITH_FIM[version]))
    inner = theirs.instruct_tokenizer.tokenizer
    prefix_id, suffix_id = (inner.get_special_token(t) for t in ("[PREFIX]", "[SUFFIX]"))
    assert ours.fim
    for prefix, suffix in CASES:
        ids = ours.encode_fim(prefix, suffix)
        assert ids == theirs.encode_fim(FIMRequest(prompt=prefix, suffix=suffix)).tokens
        assert ids[:2] == [ours.bos_id, suffix_id] and ids.count(prefix_id) == 1
        after = ids[ids.index(prefix_id) + 1 :]
        assert ours.decode(after) == prefix.lstrip(" ") or after == ours.encode(prefix, bos=False)


@pytest.mark.parametrize("name", ["tokenizer.model.v1", "mistral_instruct_tokenizer_240216.model.v2"])
def test_tokenizers_without_fim_tokens_refuse_in_one_line(name):
    """v1 has no [PREFIX] or [SUFFIX]; v2 names them, but mistral_common would encode them as the unknown piece."""
    tokenizer = Tokenizer(DATA / name)
    assert not tokenizer.fim
    with pytest.raises(MistralError, match=r"needs a tokenizer with \[PREFIX\] and \[SUFFIX\] tokens.*this one is v"):
        tokenizer.encode_fim("def f(x):", "print(f(2))")


@pytest.fixture(scope="module")
def v3_folder(tmp_path_factory) -> Path:
    model = random_model(tiny_params(vocab_size=32768, sliding_window=None), seed=7)
    return save_with_tokenizer(model, tmp_path_factory.mktemp("fim"), DATA / WITH_FIM["v3"])


def greedy_middle(folder: Path, ids: list[int], n: int) -> list[int]:
    """n greedy tokens after ids (fewer if EOS comes), each from a full forward of the folder's model, no cache."""
    from mistral.checkpoint import load_model
    model, eos = load_model(folder, max_batch_size=1), Tokenizer.from_folder(folder).eos_id
    out = []
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor(ids + out), [len(ids) + len(out)])
        out.append(int(logits[-1].argmax()))
        if out[-1] == eos:
            return out[:-1]
    return out


def test_the_fim_command_prints_the_greedy_middle(v3_folder, tmp_path):
    """--prefix/--suffix and their _file forms: stdout is the middle alone, decoded after the prefix."""
    prefix, suffix = "def add(a, b):\n    return", "\n\nprint(add(1, 2))\n"
    tokenizer = Tokenizer.from_folder(v3_folder)
    middle = greedy_middle(v3_folder, tokenizer.encode_fim(prefix, suffix), 12)
    expected = tokenizer.decode(tokenizer.encode(prefix) + middle)[len(tokenizer.decode(tokenizer.encode(prefix))):]
    code, out, err = cli("fim", v3_folder, "--prefix", prefix, "--suffix", suffix, "--max_tokens", 12)
    assert code == 0 and out == expected + "\n" and "prefill" in err, err
    (tmp_path / "before.py").write_text(prefix, encoding="utf-8")
    (tmp_path / "after.py").write_text(suffix, encoding="utf-8")
    code, out_files, err = cli("fim", v3_folder, "--prefix_file", tmp_path / "before.py", "--suffix_file",
                               tmp_path / "after.py", "--max_tokens", 12)
    assert code == 0 and out_files == out, err


@pytest.mark.parametrize("args, pattern", [
    ((), r"fill-in-the-middle needs a tokenizer with \[PREFIX\] and \[SUFFIX\] tokens .* this one is v1"),
    (("--prefix", "a", "--prefix_file", "x.py"), r"give --prefix or --prefix_file, not both"),
    (("--suffix_file", "/no/such/file.py"), r"--suffix_file /no/such/file\.py: cannot read it as UTF-8 text"),
])
def test_the_fim_command_refuses_in_one_line(args, pattern):
    """The shipped model's tokenizer is v1: refused before any weight is read."""
    code, out, err = cli("fim", "--prefix", "def f(x):", *args) if "--prefix" not in args else cli("fim", *args)
    one_error(code, err, pattern)
    assert out == ""
