"""The terminal (mistral/terminal.py): reading lines, under torchrun too, and writing the output."""
import sys
from pathlib import Path

import pytest
from helpers import cli

from mistral import pipeline


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


@pytest.mark.parametrize("name", ["v1", "v2", "v3", "v7", "tekken"])
def test_a_streamed_completion_is_shown_as_prompt_and_completion_decode_together(name, tmp_path, capsys):
    """interactive printed the prompt, then the completion decoded alone, which drops sentencepiece's leading space:
    "Hello worldgo" for "Hello world" + "▁go". What is shown, piece by piece, must be the decode of both together, with
    each released tokenizer (mistral_common's data files)."""
    import shutil

    import mistral_common

    from mistral.terminal import Stream
    from mistral.tokenizer import Tokenizer

    files = {"v1": ("tokenizer.model.v1", "tokenizer.model"),
             "v2": ("mistral_instruct_tokenizer_240216.model.v2", "tokenizer.model.v2"),
             "v3": ("mistral_instruct_tokenizer_240323.model.v3", "tokenizer.model.v3"),
             "v7": ("mistral_instruct_tokenizer_241114.model.v7", "tokenizer.model.v7"),
             "tekken": ("tekken_240718.json", "tekken.json")}
    source, as_named = files[name]
    shutil.copyfile(Path(mistral_common.__file__).parent / "data" / source, tmp_path / as_named)
    tok = Tokenizer.from_folder(tmp_path)
    for prompt, completion in [("Hello world", " go on, and on"), ("Now is the winter of our", " discontent 日本!"),
                               ("The end", "\nNew line, then two  spaces")]:
        ids = tok.encode(prompt, bos=True)
        new = tok.encode(prompt + completion, bos=True)[len(ids):]  # the completion as the model would sample it
        stream = Stream(tok, prompt)
        for t in new:
            stream.add(t)
        stream.end()
        assert capsys.readouterr().out == tok.decode(ids + new) + "\n", (prompt, completion)
