"""Command line: `python -m main demo|interactive|chat|explain|convert|quantize`. Run `python -m main --help`."""
import os
import signal

# Ctrl-C while torch and the rest load (a few seconds) ends quietly; main() puts Python's own handling back.
signal.signal(signal.SIGINT, lambda *_: os._exit(130))

import difflib  # noqa: E402
import errno  # noqa: E402
import functools  # noqa: E402
import inspect  # noqa: E402
import logging  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from datetime import timedelta  # noqa: E402
from pathlib import Path  # noqa: E402

import fire  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from mistral import checkpoint, pipeline  # noqa: E402
from mistral.args import QUANTIZATIONS, ModelArgs  # noqa: E402
from mistral.chat import DEFAULT_CONTEXT, Chat, Turn  # noqa: E402
from mistral.errors import MistralError  # noqa: E402
from mistral.generate import generate, generate_ids  # noqa: E402, F401  (re-exported)
from mistral.sampling import SamplingParams, check_options  # noqa: E402
from mistral.model import Transformer  # noqa: E402
from mistral.tokenizer import Tokenizer  # noqa: E402

SHIPPED_MODEL = Path(__file__).resolve().parent / "mistral" / "assets"
# A chat's answers end at EOS, or are cut off after this many tokens.
CHAT_MAX_TOKENS = 256
# What the memory check before loading assumes of a prompt it has not seen yet (interactive, chat).
TYPICAL_PROMPT = 512
DEMO_PROMPTS = ["To be, or not to be, that is", "ROMEO:\nBut soft, what light", "Now is the winter of our"]


def load(model_path: str | None, *, max_batch_size: int, num_pipeline_ranks: int, device: str, dtype: str,
         quantize: str | None = None,
         needs: Callable[[ModelArgs, Tokenizer], tuple[int, int]] | None = None) -> tuple[Transformer, Tokenizer]:
    """The model and tokenizer of a folder (the shipped model when model_path is None).

    needs(args, tokenizer): the (cache slots per row, tokens pre-filled at a time) the run will want, so that a run
    that cannot fit in memory is refused before any weight is read.

    quantize="int8" stores the linear weights in int8 (4x fewer bytes to read per token than fp32), "int4" in 4
    bits with a scale per 32 weights (7x fewer), quantized from the file as it is read. On a CPU, weights keep the checkpoint's dtype unless --dtype says otherwise,
    and the arithmetic is fp32: CPUs without bf16 arithmetic run bf16 matrix products several times slower.
    """
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise MistralError(f"unknown --quantize {quantize!r}; the choices are {' and '.join(QUANTIZATIONS)} (or leave "
                           "it out)")
    folder = Path(model_path) if model_path is not None else SHIPPED_MODEL
    if not isinstance(num_pipeline_ranks, int) or isinstance(num_pipeline_ranks, bool) or num_pipeline_ranks < 1:
        raise MistralError(f"num_pipeline_ranks must be a whole number >= 1, got {num_pipeline_ranks!r}")
    world = os.environ.get("WORLD_SIZE", "1")
    if num_pipeline_ranks == 1 and world != "1":
        raise MistralError(f"torchrun started {world} processes but --num_pipeline_ranks is 1, so each would run the "
                           f"whole model and print it all: add --num_pipeline_ranks {world}, or run without torchrun")
    if num_pipeline_ranks > 1:
        pipeline.init(num_pipeline_ranks, device)
    checkpoint.layout(folder)  # a folder, holding a model
    # The tokenizer and the config, checked against each other before gigabytes of weights are read.
    tokenizer, args = Tokenizer.from_folder(folder), checkpoint.read_args(folder)
    if tokenizer.n_words != args.vocab_size:
        config = "params.json" if checkpoint.layout(folder) == "native" else "config.json"
        raise MistralError(f"{tokenizer.path} has {tokenizer.n_words} tokens but {config} says "
                           f"vocab_size={args.vocab_size}: the tokenizer belongs to another model")
    slots, prefill = (0, TYPICAL_PROMPT) if needs is None else needs(args, tokenizer)
    start = time.perf_counter()
    model = checkpoint.load_model(folder, max_batch_size=max_batch_size, num_pipeline_ranks=num_pipeline_ranks,
                                  device=None if device == "auto" else device, dtype=None if dtype == "auto" else dtype,
                                  quantize=quantize, cache_slots=slots, prefill_tokens=prefill)
    n_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    _info(f"loaded {folder}: {model.args.n_layers} layers, {n_bytes / 1e6:,.1f} MB of weights on this rank, "
          f"{model.device}, {_describe(model)}, in {time.perf_counter() - start:.1f} s")
    return model, tokenizer


def _describe(model: Transformer) -> str:
    """The weights' and the activations' dtypes: "int8 weights, fp32 arithmetic", say."""
    def name(dtype: torch.dtype) -> str:
        return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int8: "int8",
                torch.uint8: "int4"}[dtype]

    weights = name(model.layers[str(model.layer_ids[0])].attention.wq.weight.dtype)
    said = f"{weights} weights, {name(model.dtype)} arithmetic"
    if weights in ("int8", "int4") and model.device.type == "cpu":  # the CPU engine's integer products
        said += " (activations rounded to int8 per group of 32 in the products)"
    return said


def _slots(args: ModelArgs, reach: int) -> int:
    """Cache slots per row for sequences of up to `reach` positions: past the window the buffer rolls."""
    return min(reach, args.sliding_window or reach)


@functools.cache
def _waiting_group():
    """The process group over which rank 0 hands every rank the next line. The ranks wait for it as long as a person
    takes to type it, which is no failure, so the group is one of its own, without the 5-minute timeout of the
    others. Made at the first line, which every rank reads at once."""
    return dist.new_group(backend="gloo", timeout=timedelta(days=365))


def _is_printing_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _info(msg: str) -> None:
    if _is_printing_rank():
        print(msg, file=sys.stderr, flush=True)


def _check_seed(seed: int) -> None:
    # torch takes 64 bits, and a negative seed would wrap around to another number, silently.
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
        raise MistralError(f"seed must be a whole number from 0 to 2**64 - 1, got {seed!r}")


def _generator(seed: int, device: torch.device) -> torch.Generator:
    """Sampling draws on the logits' device, so the generator lives there too."""
    return torch.Generator(device=device).manual_seed(seed)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e6
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # Linux reports KiB


def demo(model_path: str | None = None, max_tokens: int = 35, temperature: float = SamplingParams.temperature,
         top_p: float = SamplingParams.top_p, top_k: int = SamplingParams.top_k, seed: int = 0, chunk_size: int | None = None, num_pipeline_ranks: int = 1,
         device: str = "auto", dtype: str = "auto", quantize: str | None = None) -> None:
    """Complete three fixed prompts as one packed batch and print each, followed by a line of '='.

    Without model_path, uses the small Shakespeare model that ships with the package.
    """
    check_options(max_tokens, temperature, top_p, top_k, chunk_size)
    _check_seed(seed)

    def needs(args: ModelArgs, tokenizer: Tokenizer) -> tuple[int, int]:
        longest = max(len(tokenizer.encode(p)) for p in DEMO_PROMPTS)
        return _slots(args, longest + max_tokens), min(chunk_size or longest, longest)

    model, tokenizer = load(model_path, max_batch_size=len(DEMO_PROMPTS), num_pipeline_ranks=num_pipeline_ranks,
                            device=device, dtype=dtype, quantize=quantize, needs=needs)
    encoded = [tokenizer.encode(p, bos=True) for p in DEMO_PROMPTS]
    first_token_at = {}

    def on_token(row: int, token: int) -> None:
        first_token_at.setdefault(row, time.perf_counter())

    start = time.perf_counter()
    generated, _ = generate_ids(encoded, model, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k, chunk_size=chunk_size, eos_id=tokenizer.eos_id,
                                generator=_generator(seed, model.device), on_token=on_token)
    end = time.perf_counter()
    if _is_printing_rank():
        for p, g in zip(encoded, generated):
            print(tokenizer.decode(p + g))
            print("=" * 20)
        # Pre-fill ends when the last row has its first token; every token after that was decoded.
        prefill_end = max(first_token_at.values(), default=end)
        n_prompt, n_new = sum(map(len, encoded)), sum(map(len, generated))
        n_decoded = n_new - len(first_token_at)
        print(f"{n_new} tokens generated; pre-fill {n_prompt / (prefill_end - start):,.0f} tokens/s, decode "
              f"{n_decoded / max(end - prefill_end, 1e-9):,.1f} tokens/s; peak memory "
              f"{_peak_memory_mb(model.device):,.0f} MB", file=sys.stderr)


def interactive(model_path: str | None = None, max_tokens: int = 35, temperature: float = SamplingParams.temperature,
                top_p: float = SamplingParams.top_p, top_k: int = SamplingParams.top_k, seed: int = 0, chunk_size: int | None = None, num_pipeline_ranks: int = 1,
                device: str = "auto", dtype: str = "auto", quantize: str | None = None,
                instruct: bool = False) -> None:
    """Read prompts, one per line, until end of input (Ctrl-D), streaming each completion.

    Each line stands alone: it is completed as text, or with --instruct answered as a one-message chat in the
    format of the model's tokenizer (`chat` keeps the conversation). A stats line follows each answer on stderr.
    Ctrl-C stops the generation under way; a second Ctrl-C, at the prompt, exits. Under pipeline ranks Ctrl-C
    ends every rank at once, since the ranks would stop at different points of the loop.
    """
    check_options(max_tokens, temperature, top_p, top_k, chunk_size)
    _check_seed(seed)
    if not isinstance(instruct, bool):  # fire reads --instruct=no, or --instruct FOLDER, as a value
        raise MistralError(f"--instruct takes no value, got {instruct!r}: write --instruct to turn it on (--noinstruct "
                           "to turn it off), after the model folder")
    model, tokenizer = load(model_path, max_batch_size=1, num_pipeline_ranks=num_pipeline_ranks, device=device,
                            dtype=dtype, quantize=quantize,
                            needs=lambda args, _: (_slots(args, TYPICAL_PROMPT + max_tokens), chunk_size or TYPICAL_PROMPT))
    generator = _generator(seed, model.device)
    rejected = 0
    for prompt, problem in _lines("empty prompt; type some text (Ctrl-D to quit)"):
        if problem is not None:
            _info(f"error: {problem}")
            rejected += 1
            continue
        ids = tokenizer.encode_chat([{"role": "user", "content": prompt}]) if instruct else tokenizer.encode(prompt)
        stream = _Stream(tokenizer, prompt_text="" if instruct else prompt)
        times = []

        def on_token(row: int, token: int) -> None:
            times.append(time.perf_counter())
            stream.add(token)

        start = time.perf_counter()
        try:
            generate_ids([ids], model, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                         chunk_size=chunk_size, eos_id=tokenizer.eos_id, generator=generator, on_token=on_token)
        except KeyboardInterrupt:
            if dist.is_initialized():
                raise
            stream.end()
            _info("[stopped]")
            continue
        stream.end()
        end = time.perf_counter()
        first = times[0] if times else end
        _info(Turn(stream.tokens, len(ids), first - start, max(len(times) - 1, 0), end - first,
                   len(ids) + len(times)).stats())
    if rejected:
        sys.exit(1)


CHAT_COMMANDS = {"/reset": "start the conversation over (the system prompt stays)",
                 "/system TEXT": "set the system prompt (/system alone: none)",
                 "/help": "this list"}


def chat(model_path: str | None = None, max_tokens: int = CHAT_MAX_TOKENS,
         temperature: float = SamplingParams.temperature, top_p: float = SamplingParams.top_p,
         top_k: int = SamplingParams.top_k, seed: int = 0, chunk_size: int | None = None, num_pipeline_ranks: int = 1,
         device: str = "auto", dtype: str = "auto", quantize: str | None = None, context: int | None = None) -> None:
    """Talk with an instruction-tuned model: each line is a user message, the answer streams, and the
    conversation is kept in the cache, so a turn pre-fills only its new tokens. A stats line follows each answer
    on stderr.

    /reset starts over, /system TEXT sets the system prompt, /help lists them. Ctrl-C stops an answer and keeps
    what it had said; a second Ctrl-C, at the prompt, exits, as does end of input (Ctrl-D). --context N bounds a
    conversation of a model without a sliding window (default 32768 tokens; the oldest turns are dropped to fit).
    """
    check_options(max_tokens, temperature, top_p, top_k, chunk_size)
    _check_seed(seed)
    # A conversation may fill the window, or the context of a model without one.
    model, tokenizer = load(model_path, max_batch_size=1, num_pipeline_ranks=num_pipeline_ranks, device=device,
                            dtype=dtype, quantize=quantize,
                            needs=lambda args, _: (args.sliding_window or context or DEFAULT_CONTEXT,
                                                   chunk_size or TYPICAL_PROMPT))
    talk = Chat(model, tokenizer, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                chunk_size=chunk_size, generator=_generator(seed, model.device), context=context)
    for line, problem in _lines("empty message; type some text (/help lists the commands, Ctrl-D quits)"):
        if problem is None and line.startswith("/"):
            problem = _chat_command(talk, line)
            if problem is None:
                continue
        if problem is not None:
            _info(f"error: {problem}")
            continue
        stream = _Stream(tokenizer, prompt_text="")
        try:
            turn = talk.say(line, on_token=stream.add)
        except MistralError as e:  # this message cannot be sent (too long for the context); the session goes on
            _info(f"error: {e}")
            continue
        stream.end()
        if turn.stopped:
            if dist.is_initialized():
                raise KeyboardInterrupt
            _info("[stopped: the answer so far is kept]" if turn.answer else "[stopped: this message is forgotten]")
        _info(turn.stats())


def _chat_command(talk: Chat, line: str) -> str | None:
    """Carry out a /command; returns what is wrong with it, or None."""
    name, _, text = line.partition(" ")
    if name == "/reset" and not text.strip():
        talk.reset()
        _info("[a new conversation]")
    elif name == "/system":
        talk.system = text.strip() or None
        _info(f"[system prompt: {talk.system!r}]" if talk.system else "[no system prompt]")
    elif name == "/help" and not text.strip():
        _info("\n".join(f"{cmd:14} {what}" for cmd, what in CHAT_COMMANDS.items()))
    else:
        return f"unknown command {line.split()[0]!r}; the commands are {', '.join(c.split()[0] for c in CHAT_COMMANDS)}"
    return None


def _lines(empty: str):
    """Each line typed or piped in, with what is wrong with it (None: nothing; `empty` for a blank line), until end of
    input, or Ctrl-C at the prompt."""
    tty = sys.stdin is not None and sys.stdin.isatty()
    while True:
        try:
            line, problem = _read_line("> " if tty else "")
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return
        if line is None:
            return
        yield line, (empty if problem is None and not line.strip() else problem)


def _read_line(marker: str) -> tuple[str | None, str | None]:
    """(the next line, what is wrong with it), read on the printing rank and broadcast to the others; the line is
    None at end of input. A line that is not UTF-8 is not guessed at: it comes with its problem instead."""
    got = (None, None)
    if _is_printing_rank():
        if marker:
            print(marker, end="", file=sys.stderr, flush=True)
        stdin = getattr(sys.stdin, "buffer", None)
        if sys.stdin is None:  # started with stdin closed: nothing will ever come
            raw = b""
        else:
            raw = stdin.readline() if stdin is not None else sys.stdin.readline().encode()
        if raw:
            raw = raw.removesuffix(b"\n").removesuffix(b"\r")
            try:
                got = (raw.decode("utf-8"), None)
            except UnicodeDecodeError as e:
                got = ("", f"that line is not valid UTF-8 (byte {raw[e.start]:#04x} at offset {e.start}); "
                           "nothing was sent")
    if dist.is_initialized():
        box = [got]
        dist.broadcast_object_list(box, src=0, group=_waiting_group())
        got = box[0]
    return got


class _Stream:
    """Prints a completion as it grows. Decoding the whole completion each time keeps sentencepiece's
    spacing right; a trailing U+FFFD means a multi-byte character is still incomplete, so it waits."""

    def __init__(self, tokenizer: Tokenizer, prompt_text: str):
        self.tokenizer, self.tokens, self.shown = tokenizer, [], ""
        if _is_printing_rank():
            print(prompt_text, end="", flush=True)

    def add(self, token: int) -> None:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if _is_printing_rank() and not text.endswith("\ufffd") and text.startswith(self.shown):
            print(text[len(self.shown) :], end="", flush=True)
            self.shown = text

    def end(self) -> None:
        if _is_printing_rank():
            text = self.tokenizer.decode(self.tokens)
            print(text[len(self.shown) :] if text.startswith(self.shown) else "", flush=True)


def explain(seqlens: str | tuple = "5,7,2", sliding_window: int = 3, chunk_size: int | None = 4,
            decode_steps: int = 3, out: str | None = None) -> None:
    """Walk through a generation step by step: each mask, each cache slot, each unrotated view."""
    from mistral.explain import explain as run

    run(seqlens=seqlens, sliding_window=sliding_window, chunk_size=chunk_size, decode_steps=decode_steps, out=out)


def convert(src: str, dst: str, to: str = "native") -> None:
    """Write the model folder SRC as a native (params.json + consolidated.safetensors) or HF folder DST."""
    from mistral.checkpoint import convert as run

    run(_path(src, "SRC"), _path(dst, "DST"), to=to)


def quantize(src: str, dst: str, to: str = "int8") -> None:
    """Write the model folder SRC to the new folder DST with int8 (or --to int4) weights, which every command loads
    as they are."""
    checkpoint.quantize(_path(src, "SRC"), _path(dst, "DST"), to=to)


def _path(value, what: str) -> Path:
    """A folder the user named; an empty name would be '.', silently."""
    if not isinstance(value, str) or not value.strip():
        raise MistralError(f"{what} must name a folder, got {value!r}")
    return Path(value)


COMMANDS = {"demo": demo, "interactive": interactive, "chat": chat, "explain": explain, "convert": convert,
            "quantize": quantize}
HELP = ("--help", "-h")


def check_arguments(argv: list[str]) -> None:
    """Refuse, before anything runs, a command line that fire would only complain about after running the command:
    an unknown command or option (with the closest valid one), or more positional arguments than the command takes.
    Options are --name value, --name=value, or a bare --name (true; --noname: false), with - or _ in names."""
    if not argv or argv[0] in HELP or any(a in HELP for a in argv):
        return
    name, args = argv[0], argv[1:]
    if name not in COMMANDS:
        near = difflib.get_close_matches(name, COMMANDS, n=1)
        raise MistralError(f"unknown command {name!r}" + (f"; did you mean {near[0]}?" if near else "")
                           + f" The commands are {', '.join(COMMANDS)}")
    params = inspect.signature(COMMANDS[name]).parameters
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


def main() -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    try:
        check_arguments(sys.argv[1:])
        fire.Fire(COMMANDS)
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


if __name__ == "__main__":
    main()
