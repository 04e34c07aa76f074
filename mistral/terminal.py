"""What the commands say to the terminal and read from it, under one process or several pipeline ranks.

Under torchrun every rank runs the same command, but only rank 0 (the printing rank) prints, and only it reads stdin:
it hands each line it reads to the other ranks, so all of them feed the model the same prompt.
"""
import functools
import json
import resource
import sys
from collections.abc import Iterator
from datetime import timedelta

import torch
import torch.distributed as dist

from mistral.chat import Chat
from mistral.model import Transformer
from mistral.quantize import INT8_ROWS
from mistral.tokenizer import Tokenizer

CHAT_COMMANDS = {"/reset": "start the conversation over (the system prompt stays)",
                 "/system TEXT": "set the system prompt (/system alone: none)",
                 "/result JSON": "the result of the model's next tool call waiting for one (with --tools)",
                 "/help": "this list",
                 "//TEXT": "send /TEXT as a message (a line starting with / is a command)"}


def is_printing_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def info(msg: str) -> None:
    """A message on stderr, from the printing rank only: stdout is kept for the output."""
    if is_printing_rank():
        print(msg, file=sys.stderr, flush=True)


@functools.cache
def _waiting_group():
    """The process group over which rank 0 hands every rank the next line. The ranks wait for it as long as a person
    takes to type it, which is no failure, so the group is one of its own, without the 5-minute timeout of the
    others. Made at the first line, which every rank reads at once."""
    return dist.new_group(backend="gloo", timeout=timedelta(days=365))


def lines(empty: str) -> Iterator[tuple[str, str | None]]:
    """Each line typed or piped in, with what is wrong with it (None: nothing; `empty` for a blank line), until end of
    input. Ctrl-C at the prompt ends the line and raises KeyboardInterrupt (exit status 130)."""
    tty = sys.stdin is not None and sys.stdin.isatty()
    while True:
        try:
            line, problem = _read_line("> " if tty else "")
        except KeyboardInterrupt:
            print(file=sys.stderr)
            raise
        if line is None:
            return
        yield line, (empty if problem is None and not line.strip() else problem)


def _read_line(marker: str) -> tuple[str | None, str | None]:
    """(the next line, what is wrong with it), read on the printing rank and broadcast to the others; the line is
    None at end of input. A line that is not UTF-8 is not guessed at: it comes with its problem instead."""
    got = (None, None)
    if is_printing_rank():
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


def chat_command(talk: Chat, line: str) -> str | None:
    """Carry out a chat's /command; returns what is wrong with it, or None."""
    name, text = (line.split(None, 1) + [""])[:2]
    if name in ("/reset", "/help") and text.strip():
        return f"{name} takes no text, got {text.strip()!r}; nothing was done (//TEXT sends /TEXT as a message)"
    if name == "/reset":
        talk.reset()
        info("[a new conversation]")
    elif name == "/system":
        talk.system = text.strip() or None
        info(f"[system prompt: {talk.system!r}]" if talk.system else "[no system prompt]")
    elif name == "/help":
        info("\n".join(f"{cmd:14} {what}" for cmd, what in CHAT_COMMANDS.items()))
    else:
        commands = ", ".join(c.split()[0] for c in CHAT_COMMANDS if not c.startswith("//"))
        return (f"unknown command {line.split()[0]!r}; the commands are {commands}, and //TEXT sends /TEXT as a "
                "message")
    return None


def tool_result(talk: Chat, line: str) -> tuple[str | None, str | None]:
    """(the result of `/result JSON`, or what is wrong with it)."""
    text = line.split(None, 1)[1].strip() if len(line.split(None, 1)) > 1 else ""
    if not talk.pending:
        return None, "there is no tool call waiting for a result; nothing was sent"
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"/result takes the call's result as JSON ({e}), got {text!r}; nothing was sent"
    return text, None


def calls_waiting(talk: Chat) -> str:
    pending = talk.pending
    if not pending:
        return "every call has its result"
    return (f"{len(pending)} call{'s' * (len(pending) > 1)} waiting: /result JSON answers "
            f"{pending[0]['function']['name']} ({pending[0]['id']})")


def call_json(call: dict) -> str:
    """A call as the chat shows it: {"id", "name", "arguments"}, its arguments as JSON, not as text of JSON."""
    return json.dumps({"id": call["id"], "name": call["name"], "arguments": json.loads(call["arguments"])},
                      ensure_ascii=False)


class Stream:
    """Prints a prompt and its completion as the completion grows: what is shown is always the decode of the two
    together. Decoding the completion alone would lose what depends on what comes before it: sentencepiece drops the
    space that starts a text, so "Hello" + "▁world" would print as "Helloworld". A trailing U+FFFD means a multi-byte
    character is still incomplete, so it waits."""

    def __init__(self, tokenizer: Tokenizer, prompt_text: str, show_prompt: bool = True, hold: int | None = None):
        """prompt_text: the text that was completed, encoded as generation encoded it ("" for a chat's answer, which
        stands on its own); printed first unless show_prompt is false (fill-in-the-middle: the middle alone). hold: a
        token that, first, holds the text back until end() (an answer of tool calls, shown once read)."""
        self.tokenizer, self.tokens, self.hold, self.holding = tokenizer, [], hold, False
        self.prompt = tokenizer.encode(prompt_text, bos=True) if prompt_text else []
        self.shown = tokenizer.decode(self.prompt)  # the prompt as the model reads it
        if is_printing_rank() and show_prompt:
            print(self.shown, end="", flush=True)

    def add(self, token: int) -> None:
        self.tokens.append(token)
        self.holding = self.holding or (len(self.tokens) == 1 and token == self.hold)
        text = self.tokenizer.decode(self.prompt + self.tokens)
        if is_printing_rank() and not self.holding and not text.endswith("\ufffd") and text.startswith(self.shown):
            print(text[len(self.shown) :], end="", flush=True)
            self.shown = text

    def end(self, instead: str | None = None) -> None:
        """Print the rest of the text, or what was held back; or, for held text, `instead`."""
        if is_printing_rank() and self.holding and instead is not None:
            print(instead, flush=True)
        elif is_printing_rank():
            text = self.tokenizer.decode(self.prompt + self.tokens)
            print(text[len(self.shown) :] if text.startswith(self.shown) else "", flush=True)


# The words and numbers of the lines a run prints about itself.

def describe(model: Transformer) -> str:
    """The weights' and the activations' dtypes: "int8 weights, fp32 arithmetic", say."""
    def name(dtype: torch.dtype) -> str:
        return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int8: "int8",
                torch.uint8: "int4"}[dtype]

    from mistral.ggml import BLOCKS, GgmlLinear, rounded_rows
    from mistral.quantize import Int4Linear, int4_rounded_rows

    def up_to(rows: set[int]) -> str:  # the products that round x: all, or those of up to so many rows
        return "" if min(rows) >= 1 << 62 else f" of up to {'-'.join(map(str, sorted(rows)))} rows"

    blocks = {m.kind for m in model.modules() if isinstance(m, GgmlLinear)}
    if blocks:  # a GGUF file's block formats, kept as stored (mistral/ggml.py); its Q4_0 ones are int4 (the same)
        int4 = any(isinstance(m, Int4Linear) for m in model.modules())
        kinds = {BLOCKS[k][0] for k in blocks} | ({"Q4_0 (as int4)"} if int4 else set())
        k_quants = kinds & {"Q4_K", "Q5_K", "Q6_K"}
        per = ("super-block of 256" + (" (K-quants) or group of 32" if kinds - k_quants else "") if k_quants
               else "group of 32")
        rows = {rounded_rows(k) for k in blocks} | ({int4_rounded_rows()} if int4 else set())
        return (f"{' and '.join(sorted(kinds))} weights as stored, {name(model.dtype)} arithmetic (activations rounded "
                f"to int8 per {per} in the products{up_to(rows)})")
    weights = name(model.layers[str(model.layer_ids[0])].attention.wq.weight.dtype)
    said = f"{weights} weights, {name(model.dtype)} arithmetic"
    if weights in ("int8", "int4") and model.device.type == "cpu":  # the CPU engine's integer products
        rows = {int4_rounded_rows() if weights == "int4" else INT8_ROWS}
        said += f" (activations rounded to int8 per group of 32 in the products{up_to(rows)})"
    return said


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e6
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # Linux reports KiB
