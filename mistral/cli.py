"""The command line run as a program: sys.argv is parsed against the commands' signatures and every value converted by
its parameter's type before any command runs, and what goes wrong ends in one line on stderr and an exit status.

Exit status: 0 done, every line of a session answered (also when a reader such as `head` stopped reading early); 1 a
session went on past a line it refused or could not answer, or the output could not be written (stdout closed or on a
full disk: one line on stderr); 2 a mistake in the command line, the options or the model folder, said before anything
runs, or one that stopped a run (`demo` on damaged weights); 3 a lost pipeline rank; 130 Ctrl-C (at a session's
prompt, or while loading).
"""
import difflib
import errno
import inspect
import json
import logging
import os
import signal
import sys
import time
import types
import typing
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from mistral import checkpoint, pipeline, terminal
from mistral.args import QUANTIZATIONS, ModelArgs
from mistral.cpu import kernels
from mistral.errors import MistralError
from mistral.generate import PREFILL_CHUNK
from mistral.model import Transformer
from mistral.tokenizer import Tokenizer

HELP = ("--help", "-h")
# What an option takes, said when its value is not of its type; the commands check the ranges of values that are.
TAKES = {"seed": "a whole number from 0 to 2**64 - 1", "max_tokens": "a whole number >= 0",
         "temperature": "a finite number >= 0 (0 is greedy)", "top_p": "a number in (0, 1]",
         "top_k": "a whole number >= 0 (0 turns it off)", "chunk_size": "a positive number of tokens"}


def parse(commands: dict[str, Callable], argv: list[str]) -> tuple[Callable, dict[str, object]]:
    """(the command argv names, its arguments by name), each converted by its parameter's type: a str parameter (a
    folder, a choice) is the text as typed, whatever it looks like (2407, None, [v3]); int, float and bool ones are
    refused in one line unless the text is one. Options are --name value, --name=value, or a bare --name of a bool
    parameter (true; --noname: false), with - or _ in names; the other words fill the parameters not named, in
    order; after `--` every word is a positional one."""
    name, args = argv[0], argv[1:]
    if name not in commands:
        near = difflib.get_close_matches(name, commands, n=1)
        raise MistralError(f"unknown command {name!r}" + (f"; did you mean {near[0]}?" if near else "")
                           + f" The commands are {', '.join(commands)}")
    params = inspect.signature(commands[name]).parameters
    options = ", ".join("--" + p for p in params)
    named, positional, i, rest = {}, [], 0, False
    while i < len(args):
        arg = args[i]
        i += 1
        if rest or not arg.startswith("-") or arg == "-" or _is_number(arg):
            positional.append(arg)
            continue
        if arg == "--":
            rest = True
            continue
        if not arg.startswith("--"):
            raise MistralError(f"{name} has no option {arg}: options are written in full after two dashes ({options}; "
                               "-h for help)")
        option, has_value, value = arg[2:].partition("=")
        option = option.replace("-", "_")
        negated = option not in params and option.startswith("no") and option[2:] in params
        key = option[2:] if negated else option
        if key not in params:
            near = difflib.get_close_matches(option, params, n=1)
            raise MistralError(f"{name} has no option --{option}" + (f"; did you mean --{near[0]}?" if near else "")
                               + f" Its options: {options}")
        flag = _kinds(params[key]) == {bool}
        if negated and not flag:
            raise MistralError(f"--{option}: --{key} is not an on/off option; give it a value (--{key} VALUE)")
        if key in named:
            raise MistralError(f"--{key} is given twice ({named[key]!r} and {value if has_value else '...'!r}); "
                               "give it once")
        if negated or (flag and not has_value):
            if negated and has_value:
                raise MistralError(f"--{option} takes no value, got {value!r}")
            value = "False" if negated else "True"
        elif not has_value:
            # The next word is the value, unless it is an option itself (a negative number is a value).
            if i == len(args) or (args[i].startswith("--") and not _is_number(args[i])):
                raise MistralError(f"--{key} needs a value: --{key} VALUE or --{key}=VALUE")
            value, i = args[i], i + 1
        named[key] = value
    free = [p for p in params if p not in named]
    if len(positional) > len(free):
        raise MistralError(f"{name} takes at most {len(free)} arguments in order ({', '.join(free)}), got "
                           f"{len(positional)}: {' '.join(positional)}")
    named.update(zip(free, positional))
    missing = [p for p in params if p not in named and params[p].default is inspect.Parameter.empty]
    if missing:
        usage = " ".join(p.upper() for p in params if params[p].default is inspect.Parameter.empty)
        raise MistralError(f"{name} needs {' and '.join(p.upper() for p in missing)}: python -m main {name} {usage} "
                           "[options] (-h for help)")
    return commands[name], {p: _convert(params[p], text) for p, text in named.items()}


def usage(commands: dict[str, Callable], name: str | None = None) -> str:
    """The help of command `name` (its docstring and its options), or of the program: what -h and --help print."""
    if name not in commands:
        width = max(map(len, commands))
        return "\n".join(["usage: python -m main COMMAND [ARGUMENTS] [--OPTION VALUE ...]", "", "commands:",
                          *(f"  {n:{width}}  {_summary(c)}" for n, c in commands.items()), "",
                          "python -m main COMMAND -h lists a command's options."])
    params = inspect.signature(commands[name]).parameters.values()
    required = " ".join(p.name.upper() for p in params if p.default is inspect.Parameter.empty)
    lines = [f"usage: python -m main {name} {required + ' ' if required else ''}[options]", "",
             inspect.getdoc(commands[name]), "",
             "options, as --name VALUE or --name=VALUE (- or _ in names); the first ones may also be given in",
             "order, without their names:"]
    for p in params:
        kinds = _kinds(p)
        what = (f"on/off: --{p.name}, --no{p.name}" if kinds == {bool} else "a whole number" if int in kinds
                else "a number" if float in kinds else "text")
        said = ("required" if p.default is inspect.Parameter.empty else "default: none" if p.default is None
                else f"default: {p.default}")
        lines.append(f"  --{p.name:20} {what}; {said}")
    return "\n".join(lines)


def _summary(command: Callable) -> str:
    """The first sentence of a command's docstring, up to its colon if it is long."""
    sentence = " ".join(inspect.getdoc(command).split("\n\n")[0].split()).split(". ")[0]
    return sentence.split(": ")[0] if len(sentence) > 100 else sentence


def _kinds(param: inspect.Parameter) -> set[type]:
    """The types a parameter takes, None left out: int | None -> {int}."""
    ann = param.annotation
    union = typing.get_origin(ann) in (typing.Union, types.UnionType)
    return {a for a in (typing.get_args(ann) if union else (ann,)) if a is not type(None)}


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _convert(param: inspect.Parameter, text: str) -> object:
    kinds = _kinds(param)
    if bool in kinds:
        if text not in ("True", "False"):
            raise MistralError(f"--{param.name} takes no value, got {text!r}: write --{param.name} to turn it on "
                               f"(--no{param.name} to turn it off)")
        return text == "True"
    for kind, what in ((int, "a whole number"), (float, "a number")):
        if kind in kinds:
            try:
                return kind(text)
            except ValueError:
                raise MistralError(f"{param.name} must be {TAKES.get(param.name, what)}, got {text!r}") from None
    return text


def text_option(name: str, text: str | None, path: str | None) -> str:
    """The text of a pair of options --NAME TEXT / --NAME_file PATH (UTF-8): at most one of them, "" for neither."""
    if text is not None and path is not None:
        raise MistralError(f"give --{name} or --{name}_file, not both")
    if path is None:
        return text or ""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MistralError(f"--{name}_file {path}: cannot read it as UTF-8 text ({e.__class__.__name__}: "
                           f"{getattr(e, 'strerror', None) or e})") from None


def check_seed(seed: int) -> None:
    # torch takes 64 bits, and a negative seed would wrap around to another number, silently.
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
        raise MistralError(f"seed must be a whole number from 0 to 2**64 - 1, got {seed!r}")


def tools_file(value) -> list[dict]:
    """The tools of --tools FILE.json: an OpenAI tool list (or {"tools": [...]}), checked."""
    from mistral.tools import check_tools

    if not isinstance(value, str) or not value.strip():
        raise MistralError(f"--tools must name a JSON file of tools, got {value!r}")
    try:
        tools = json.loads(Path(value).read_text())
    except OSError as e:
        raise MistralError(f"--tools {value}: cannot read it ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MistralError(f"--tools {value} is not JSON ({e})") from None
    if isinstance(tools, dict) and set(tools) == {"tools"}:
        tools = tools["tools"]
    if not tools:
        raise MistralError(f"--tools {value} holds no tools: it takes a list of {{\"type\": \"function\", ...}}")
    try:
        return check_tools(tools)
    except MistralError as e:
        raise MistralError(f"--tools {value}: {e}") from None


def folder(value, what: str) -> Path:
    """A folder the user named; an empty name would be '.', silently."""
    if not isinstance(value, str) or not value.strip():
        raise MistralError(f"{what} must name a folder, got {value!r}")
    return Path(value)


def check_port(host: str, port: int) -> None:
    """Refuse, before loading, a port that cannot be listened on (taken, or privileged)."""
    import socket

    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise MistralError(f"cannot listen on {host}:{port} ({e.strerror or e}): pick another --port, or --host") \
            from None
    except UnicodeError:
        raise MistralError(f"--host {host!r} is not a host name or address") from None


def check_stdout() -> None:
    """Refuse to start a command whose output would vanish: Python runs with stdout closed (`>&-`) as if it were
    /dev/null."""
    if sys.stdout is None:
        raise OSError(errno.EBADF, "stdout is closed")


def run(commands: dict[str, Callable]) -> None:
    """Run the command that sys.argv names; what goes wrong ends the program with the status the module docstring
    lists."""
    # Back to Python's own Ctrl-C (a KeyboardInterrupt) from main.py's quiet exit while torch was loading.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    argv = sys.argv[1:]
    try:
        if not argv or any(a in HELP for a in argv[: argv.index("--") if "--" in argv else len(argv)]):
            print(usage(commands, argv[0] if argv else None))
            return
        command, kwargs = parse(commands, argv)
        command(**kwargs)
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
        if e.errno not in (errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EBADF):
            raise
        # The output cannot be written (stdout on a full disk, say): say so where it can still be read.
        if sys.stdout is not None:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"error: cannot write the output ({e.strerror})", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# Loading a model for a command.

SHIPPED_MODEL = Path(__file__).resolve().parent / "assets"


def load(model_path: str | None, *, max_batch_size: int, num_pipeline_ranks: int, device: str, dtype: str,
         quantize: str | None = None, needs: Callable[[ModelArgs, Tokenizer], tuple[int, int]] | None = None,
         shrinks_cache: str = "fewer rows or a shorter run", sliding_window: int | None = None,
         lora: str | None = None) -> tuple[Transformer, Tokenizer]:
    """The model and tokenizer of a folder (the shipped model when model_path is None).

    needs(args, tokenizer): the (cache slots per row, tokens pre-filled at a time) the run will want, so that a run
    that cannot fit in memory is refused before any weight is read; shrinks_cache: what that refusal names as
    shrinking the cache, when the cache is a large part of the need (a command's own option: it has no rows to
    choose).

    quantize="int8" stores the linear weights in int8 (4x fewer bytes to read per token than fp32), "int4" in 4
    bits with a scale per 32 weights (7x fewer), quantized from the file as it is read. On a CPU, weights keep the
    checkpoint's dtype unless --dtype says otherwise, and the arithmetic is fp32: CPUs without bf16 arithmetic run bf16
    matrix products several times slower. lora: a LoRA adapter merged into the weights as they are read
    (mistral/checkpoint/lora.py).
    """
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise MistralError(f"unknown --quantize {quantize!r}; the choices are {' and '.join(QUANTIZATIONS)} (or leave "
                           "it out)")
    folder = Path(model_path) if model_path is not None else SHIPPED_MODEL
    pipeline.init(num_pipeline_ranks, device)
    kind = checkpoint.layout(folder)  # a folder holding a model, or a GGUF file
    # The tokenizer and the config, checked against each other before gigabytes of weights are read.
    tokenizer, args = Tokenizer.from_folder(folder), checkpoint.read_args(folder, sliding_window)
    if tokenizer.n_words != args.vocab_size:
        config = {"native": "params.json", "hf": "config.json", "gguf": "its metadata"}[kind]
        raise MistralError(f"{tokenizer.path} has {tokenizer.n_words} tokens but {config} says "
                           f"vocab_size={args.vocab_size}: the tokenizer belongs to another model")
    slots, prefill = (0, PREFILL_CHUNK) if needs is None else needs(args, tokenizer)
    start = time.perf_counter()
    model = checkpoint.load_model(folder, max_batch_size=max_batch_size, num_pipeline_ranks=num_pipeline_ranks,
                                  device=None if device == "auto" else device, dtype=None if dtype == "auto" else dtype,
                                  quantize=quantize, cache_slots=slots, prefill_tokens=prefill,
                                  shrinks_cache=shrinks_cache, sliding_window=sliding_window, lora_path=lora)
    n_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    merged = f" with the LoRA adapter {lora} merged" if lora is not None else ""
    terminal.info(f"loaded {folder}{merged}: {model.args.n_layers} layers, {n_bytes / 1e6:,.1f} MB of weights on "
                  f"this rank, {model.device}, {terminal.describe(model)}, in {time.perf_counter() - start:.1f} s")
    if kind == "gguf":
        checkpoint.gguf.forget()  # the model and the tokenizer are built: what was read of the file goes
        window = (f"a sliding window of {args.sliding_window} (--sliding_window)" if args.sliding_window else
                  "full attention (the file holds no sliding window, and llama.cpp runs it so; --sliding_window N "
                  "gives one)")
        terminal.info(f"{folder.name}: tokenizer {tokenizer.version} "
                      f"{'from the file' if tokenizer.path == folder else f'from {tokenizer.path.name} beside it'}, "
                      f"{window}")
    if model.device.type == "cpu":  # the engine's kernels, built now if need be: not in the first step's time
        start = time.perf_counter()
        if kernels.available() and time.perf_counter() - start > 0.1:
            terminal.info(f"built the CPU kernels ({kernels.SOURCE.name}) in {time.perf_counter() - start:.1f} s")
    return model, tokenizer
