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
