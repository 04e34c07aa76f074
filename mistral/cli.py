"""Fire commands run as a program: the command line is checked against the commands' signatures before any runs (a
seed's or a folder name's value when the command reads it), and what goes wrong ends in one line on stderr and an exit
status.

Exit status: 0 done, 1 the output could not be written (a command may also exit 1 itself), 2 a mistake in the input
(a MistralError), 3 a lost pipeline rank, 130 Ctrl-C.
"""
import difflib
import errno
import inspect
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import fire
import torch
import torch.distributed as dist

from mistral.errors import MistralError

HELP = ("--help", "-h")


def check_arguments(commands: dict[str, Callable], argv: list[str]) -> None:
    """Refuse, before anything runs, a command line that fire would only complain about after running the command:
    an unknown command or option (with the closest valid one), or more positional arguments than the command takes.
    Options are --name value, --name=value, or a bare --name (true; --noname: false), with - or _ in names."""
    if not argv or argv[0] in HELP or any(a in HELP for a in argv):
        return
    name, args = argv[0], argv[1:]
    if name not in commands:
        near = difflib.get_close_matches(name, commands, n=1)
        raise MistralError(f"unknown command {name!r}" + (f"; did you mean {near[0]}?" if near else "")
                           + f" The commands are {', '.join(commands)}")
    params = inspect.signature(commands[name]).parameters
    positional, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg == "--":  # what follows is for fire itself
            break
        if arg.startswith("--") and len(arg) > 2:
            option = arg[2:].split("=", 1)[0].replace("-", "_")
            if option not in params and not (option.startswith("no") and option[2:] in params):
                near = difflib.get_close_matches(option, params, n=1)
                raise MistralError(f"{name} has no option --{option}" + (f"; did you mean --{near[0]}?" if near else "")
                                   + f" Its options: {', '.join('--' + p for p in params)}")
            # fire gives a bare option the next argument as its value, unless that is an option too.
            if "=" not in arg and i + 1 < len(args) and not args[i + 1].startswith("--"):
                i += 1
        else:
            positional.append(arg)
        i += 1
    if len(positional) > len(params):
        raise MistralError(f"{name} takes at most {len(params)} arguments in order ({', '.join(params)}), got "
                           f"{len(positional)}: {' '.join(positional)}")


def check_seed(seed: int) -> None:
    # torch takes 64 bits, and a negative seed would wrap around to another number, silently.
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
        raise MistralError(f"seed must be a whole number from 0 to 2**64 - 1, got {seed!r}")


def folder(value, what: str) -> Path:
    """A folder the user named; an empty name would be '.', silently."""
    if not isinstance(value, str) or not value.strip():
        raise MistralError(f"{what} must name a folder, got {value!r}")
    return Path(value)


def run(commands: dict[str, Callable]) -> None:
    """Run the command that sys.argv names, with fire; what goes wrong ends the program with the status the module
    docstring lists."""
    # Back to Python's own Ctrl-C (a KeyboardInterrupt) from main.py's quiet exit while torch was loading.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    try:
        check_arguments(commands, sys.argv[1:])
        fire.Fire(commands)
        if dist.is_initialized():
            # Every rank done before any tears its connections down: a gloo rank whose peer closes first
            # can abort ("terminate called without an active exception").
            dist.barrier()
    except MistralError as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank finds the same mistake: say it once
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except dist.DistError as e:  # another rank died (killed, out of memory): this one can only stop
        print(f"error: pipeline rank {os.environ.get('RANK', '?')} lost another rank and stops "
              f"({(str(e).strip().splitlines() or [type(e).__name__])[0][:200]})", file=sys.stderr, flush=True)
        if dist.is_initialized():
            os._exit(3)  # the process group cannot be torn down politely without its peer
        sys.exit(3)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:  # the output went to a reader that stopped early (head, less): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EIO, errno.EDQUOT):
            raise
        # The output cannot be written (stdout on a full disk, say): say so where it can still be read.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"error: cannot write the output ({e.strerror})", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
