"""Command line: `python -m main demo|interactive|chat|fim|serve|explain|convert|quantize`. Run `python -m main
--help`."""
import collections
import logging
import os
import signal

if __name__ == "__main__":
    # Ctrl-C while torch and the rest load (a few seconds) ends quietly; cli.run puts Python's own handling back.
    # Only when run as a program: a test or a script that imports main keeps its own Ctrl-C.
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))

import sys
import time

import torch
import torch.distributed as dist

from mistral import checkpoint, cli, terminal
from mistral.args import ModelArgs
from mistral.cache import slots_for
from mistral.chat import Chat, Turn, conversation_limit, drafts_kept
from mistral.errors import MistralError
from mistral.generate import (PREFILL_CHUNK, check_speculate, generate, generate_ids,  # noqa: F401  (re-exported)
                              speculating_slots)
from mistral.sampling import SamplingParams, check_options
from mistral.tokenizer import Tokenizer

# A chat's answers end at EOS, or are cut off after this many tokens.
CHAT_MAX_TOKENS = 256
# A request's max_tokens, at most, unless serve --max_tokens says otherwise; and the positions a request may hold on a
# model without a sliding window, unless serve --context says otherwise.
SERVE_MAX_TOKENS = 4096
SERVE_CONTEXT = 8192
# What the memory check before loading assumes of a prompt it has not seen yet (interactive, chat).
TYPICAL_PROMPT = PREFILL_CHUNK
DEMO_PROMPTS = ["To be, or not to be, that is", "ROMEO:\nBut soft, what light", "Now is the winter of our"]


def _generator(seed: int, device: torch.device) -> torch.Generator:
    """Sampling draws on the logits' device, so the generator lives there too."""
    return torch.Generator(device=device).manual_seed(seed)


def _streamed(ids: list[int], model, stream: terminal.Stream, **generation) -> Turn:
    """Generate after ids (generation: generate_ids' options), each token into stream as it comes; what it took.
    Ending the stream is the caller's."""
    times = []

    def on_token(row: int, token: int) -> None:
        times.append(time.perf_counter())
        stream.add(token)

    start = time.perf_counter()
    drafts = collections.Counter() if generation.get("speculate") else None
    generate_ids([ids], model, on_token=on_token, counts=drafts, **generation)
    end = time.perf_counter()
    first = times[0] if times else end
    return Turn(stream.tokens, len(ids), first - start, max(len(times) - 1, 0), end - first, len(ids) + len(times),
                drafts=drafts)


def demo(model_path: str | None = None, max_tokens: int = 35, temperature: float = SamplingParams.temperature,
         top_p: float = SamplingParams.top_p, top_k: int = SamplingParams.top_k, seed: int = 0,
         chunk_size: int | None = PREFILL_CHUNK, num_pipeline_ranks: int = 1, device: str = "auto", dtype: str = "auto",
         quantize: str | None = None, sliding_window: int | None = None, lora: str | None = None,
         speculate: int = 0) -> None:
    """Complete three fixed prompts as one packed batch and print each, followed by a line of '='.

    Without model_path, uses the small Shakespeare model that ships with the package. --speculate K drafts up to K
    tokens per step from each row's own text and verifies them in one forward: the same text, greedy, sooner where
    it repeats itself.
    """
    check_options(max_tokens, temperature, top_p, top_k, chunk_size)
    check_speculate(speculate)
    cli.check_seed(seed)
    cli.check_stdout()

    def needs(args: ModelArgs, tokenizer: Tokenizer) -> tuple[int, int]:
        longest = max(len(tokenizer.encode(p)) for p in DEMO_PROMPTS)
        return speculating_slots(longest + max_tokens, args, speculate)[0], min(chunk_size or longest, longest)

    model, tokenizer = cli.load(model_path, max_batch_size=len(DEMO_PROMPTS), num_pipeline_ranks=num_pipeline_ranks,
                                device=device, dtype=dtype, quantize=quantize, needs=needs,
                                shrinks_cache="a smaller --max_tokens", sliding_window=sliding_window, lora=lora)
    encoded = [tokenizer.encode(p, bos=True) for p in DEMO_PROMPTS]
    first_token_at = {}

    def on_token(row: int, token: int) -> None:
        first_token_at.setdefault(row, time.perf_counter())

    start, drafts = time.perf_counter(), collections.Counter()
    generated, _ = generate_ids(encoded, model, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k, chunk_size=chunk_size, eos_id=tokenizer.eos_id,
                                generator=_generator(seed, model.device), on_token=on_token, speculate=speculate,
                                counts=drafts)
    end = time.perf_counter()
    if terminal.is_printing_rank():
        for p, g in zip(encoded, generated):
            print(tokenizer.decode(p + g))
            print("=" * 20)
        # Pre-fill ends when the last row has its first token; every token after that was decoded.
        prefill_end = max(first_token_at.values(), default=end)
        n_prompt, n_new = sum(map(len, encoded)), sum(map(len, generated))
        n_decoded = n_new - len(first_token_at)
        print(f"{n_new} tokens generated; pre-fill {n_prompt / (prefill_end - start):,.0f} tokens/s, decode "
              f"{n_decoded / max(end - prefill_end, 1e-9):,.1f} tokens/s; "
              + (f"{drafts_kept(drafts)}; " if speculate else "")
              + f"peak memory {terminal.peak_memory_mb(model.device):,.0f} MB", file=sys.stderr)


def interactive(model_path: str | None = None, max_tokens: int = 35, temperature: float = SamplingParams.temperature,
                top_p: float = SamplingParams.top_p, top_k: int = SamplingParams.top_k, seed: int = 0,
                chunk_size: int | None = PREFILL_CHUNK, num_pipeline_ranks: int = 1, device: str = "auto",
                dtype: str = "auto", quantize: str | None = None, instruct: bool = False,
                sliding_window: int | None = None, lora: str | None = None, speculate: int = 0) -> None:
    """Read prompts, one per line, until end of input (Ctrl-D), streaming each completion.

    Each line stands alone: it is completed as text, or with --instruct answered as a one-message chat in the
    format of the model's tokenizer (`chat` keeps the conversation). A stats line follows each answer on stderr.
    Ctrl-C stops the generation under way; a second Ctrl-C, at the prompt, exits. Under pipeline ranks Ctrl-C
    ends every rank at once, since the ranks would stop at different points of the loop. --speculate K as in demo.
    """
    check_options(max_tokens, temperature, top_p, top_k, chunk_size)
    check_speculate(speculate)
    cli.check_seed(seed)
    cli.check_stdout()
    model, tokenizer = cli.load(model_path, max_batch_size=1, num_pipeline_ranks=num_pipeline_ranks, device=device,
                                dtype=dtype, quantize=quantize, sliding_window=sliding_window, lora=lora,
                                needs=lambda args, _: (speculating_slots(TYPICAL_PROMPT + max_tokens, args,
                                                                         speculate)[0], chunk_size or TYPICAL_PROMPT),
                                shrinks_cache="a smaller --max_tokens")
    generator = _generator(seed, model.device)
    refused = 0  # lines refused or not answered: the exit status says so
    for prompt, problem in terminal.lines("empty prompt; type some text (Ctrl-D to quit)"):
        if problem is not None:
            terminal.info(f"error: {problem}")
            refused += 1
            continue
        ids = tokenizer.encode_chat([{"role": "user", "content": prompt}]) if instruct else tokenizer.encode(prompt)
        stream = terminal.Stream(tokenizer, prompt_text="" if instruct else prompt)
        try:
            turn = _streamed(ids, model, stream, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                             top_k=top_k, chunk_size=chunk_size, eos_id=tokenizer.eos_id, generator=generator,
                             speculate=speculate)
        except KeyboardInterrupt:
            if dist.is_initialized():
                raise
            stream.end()
            terminal.info("[stopped]")
            continue
        except MistralError as e:  # this prompt cannot be answered (non-finite logits, say); the session goes on
            if dist.is_initialized():
                raise
            stream.end()
            terminal.info(f"error: {e}")
            refused += 1
            continue
        stream.end()
        terminal.info(turn.stats())
    if refused:
        sys.exit(1)


def chat(model_path: str | None = None, max_tokens: int = CHAT_MAX_TOKENS,
         temperature: float = SamplingParams.temperature, top_p: float = SamplingParams.top_p,
         top_k: int = SamplingParams.top_k, seed: int = 0, chunk_size: int | None = PREFILL_CHUNK,
         num_pipeline_ranks: int = 1, device: str = "auto", dtype: str = "auto", quantize: str | None = None,
         context: int | None = None, sliding_window: int | None = None, lora: str | None = None,
         tools: str | None = None, speculate: int = 0) -> None:
    """Talk with an instruction-tuned model: each line is a user message, the answer streams, and the
    conversation is kept in the cache, so a turn pre-fills only its new tokens. A stats line follows each answer
    on stderr.

    --tools FILE.json offers the model the tools of an OpenAI tool list. Its calls are shown as JSON, one per line
    ({"id", "name", "arguments"}); answer each with /result JSON, in order, and the model goes on.

    /reset starts over, /system TEXT sets the system prompt, /help lists them; a line starting with // is sent as a
    message starting with / (one slash removed). Ctrl-C stops an answer and keeps what it had said; a second Ctrl-C,
    at the prompt, exits, as does end of input (Ctrl-D). --context N bounds a conversation of a model without a
    sliding window (default 32768 tokens; the oldest turns are dropped to fit).
    """
    check_options(max_tokens, temperature, top_p, top_k, chunk_size)
    cli.check_seed(seed)
    cli.check_stdout()
    offered = cli.tools_file(tools) if tools is not None else None

    def needs(args: ModelArgs, tokenizer: Tokenizer) -> tuple[int, int]:
        """What Chat would refuse once loaded, refused from the config before any weight is read; then the cache: a
        conversation may fill the window, or the context of a model without one."""
        if offered and tokenizer.tools_refusal:
            raise MistralError(f"--tools: {tokenizer.tools_refusal}")
        limit = conversation_limit(args.window, max_tokens, context)
        # A conversation rolls past the window: with drafts, as many spare slots.
        return (args.window + speculate) if args.window else limit, chunk_size or TYPICAL_PROMPT

    model, tokenizer = cli.load(model_path, max_batch_size=1, num_pipeline_ranks=num_pipeline_ranks, device=device,
                                dtype=dtype, quantize=quantize, sliding_window=sliding_window, lora=lora, needs=needs,
                                shrinks_cache="a smaller --context")
    talk = Chat(model, tokenizer, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                chunk_size=chunk_size, generator=_generator(seed, model.device), context=context, tools=offered,
                speculate=speculate)
    refused = 0  # lines refused or not answered: the exit status says so
    for line, problem in terminal.lines("empty message; type some text (/help lists the commands, Ctrl-D quits)"):
        result = None
        if problem is None and line.startswith("//"):  # a message that starts with /: one slash is the escape
            line = line[1:]
        elif problem is None and line.split(None, 1)[0] == "/result":
            result, problem = terminal.tool_result(talk, line)
        elif problem is None and line.startswith("/"):
            problem = terminal.chat_command(talk, line)
            if problem is None:
                continue
        if problem is not None:
            terminal.info(f"error: {problem}")
            refused += 1
            continue
        stream = terminal.Stream(tokenizer, prompt_text="", hold=tokenizer.tool_calls_id if offered else None)
        try:
            turn = talk.say(line, on_token=stream.add) if result is None else talk.result(result, stream.add)
        except MistralError as e:  # this message cannot be sent (too long for the context); the session goes on
            terminal.info(f"error: {e}")
            refused += 1
            continue
        if turn is None:  # a result, and more calls wait for theirs
            terminal.info(f"[result taken; {terminal.calls_waiting(talk)}]")
            continue
        stream.end(instead="\n".join(terminal.call_json(c) for c in turn.calls or []) or None)
        if turn.calls:
            terminal.info(f"[{terminal.calls_waiting(talk)}]")
        if turn.stopped:
            if dist.is_initialized():
                raise KeyboardInterrupt
            terminal.info("[stopped: the answer so far is kept]" if turn.answer
                          else "[stopped: this message is forgotten]")
        terminal.info(turn.stats())
    if refused:
        sys.exit(1)


def fim(model_path: str | None = None, prefix: str | None = None, suffix: str | None = None,
        prefix_file: str | None = None, suffix_file: str | None = None, max_tokens: int = CHAT_MAX_TOKENS,
        temperature: float = 0.0, top_p: float = SamplingParams.top_p, top_k: int = SamplingParams.top_k,
        seed: int = 0, chunk_size: int | None = PREFILL_CHUNK, num_pipeline_ranks: int = 1, device: str = "auto",
        dtype: str = "auto", quantize: str | None = None, sliding_window: int | None = None,
        lora: str | None = None) -> None:
    """Print the text that goes between --prefix and --suffix (fill-in-the-middle, as Codestral completes code).

    --prefix_file and --suffix_file read them from files. The model's tokenizer needs FIM tokens (v3 and later, or
    tekken). Greedy unless --temperature says otherwise; the middle ends at EOS or after --max_tokens. A stats line
    follows on stderr.
    """
    check_options(max_tokens, temperature, top_p, top_k, chunk_size)
    cli.check_seed(seed)
    cli.check_stdout()
    before, after = cli.text_option("prefix", prefix, prefix_file), cli.text_option("suffix", suffix, suffix_file)

    def needs(args: ModelArgs, tokenizer: Tokenizer) -> tuple[int, int]:
        ids = tokenizer.encode_fim(before, after)  # a tokenizer without FIM tokens is refused before any weight
        return slots_for(len(ids) + max_tokens, args.window), min(chunk_size or len(ids), len(ids))

    model, tokenizer = cli.load(model_path, max_batch_size=1, num_pipeline_ranks=num_pipeline_ranks, device=device,
                                dtype=dtype, quantize=quantize, needs=needs, shrinks_cache="a smaller --max_tokens",
                                sliding_window=sliding_window, lora=lora)
    ids = tokenizer.encode_fim(before, after)
    stream = terminal.Stream(tokenizer, prompt_text=before, show_prompt=False)  # the middle, read after the prefix
    turn = _streamed(ids, model, stream, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                     chunk_size=chunk_size, eos_id=tokenizer.eos_id, generator=_generator(seed, model.device))
    stream.end()
    terminal.info(turn.stats())


def explain(seqlens: str = "5,7,2", sliding_window: int = 3, chunk_size: int | None = 4,
            decode_steps: int = 3, out: str | None = None) -> None:
    """Walk through a generation step by step: each mask, each cache slot, each unrotated view."""
    from mistral.explain import explain as run

    cli.check_stdout()
    run(seqlens=seqlens, sliding_window=sliding_window, chunk_size=chunk_size, decode_steps=decode_steps, out=out)


def convert(src: str, dst: str, to: str = "native", lora: str | None = None) -> None:
    """Write the model folder SRC as a native (params.json + consolidated.safetensors) or HF folder DST. --lora PATH
    merges a LoRA adapter into the weights."""
    from mistral.checkpoint import convert as run

    run(cli.folder(src, "SRC"), cli.folder(dst, "DST"), to=to, lora=lora)


def quantize(src: str, dst: str, to: str = "int8", lora: str | None = None) -> None:
    """Write the model folder SRC to the new folder DST with int8 (or --to int4) weights, which every command loads
    as they are. --lora PATH merges a LoRA adapter into the weights first."""
    checkpoint.quantize(cli.folder(src, "SRC"), cli.folder(dst, "DST"), to=to, lora=lora)


def serve(model_path: str | None = None, host: str = "127.0.0.1", port: int = 8000, max_batch_size: int = 8,
          max_queue: int = 64, max_tokens: int = SERVE_MAX_TOKENS, api_key: str | None = None,
          context: int | None = None, chunk_size: int = PREFILL_CHUNK, num_pipeline_ranks: int = 1,
          device: str = "auto", dtype: str = "auto", quantize: str | None = None,
          sliding_window: int | None = None, lora: str | None = None, speculate: int = 0) -> None:
    """Serve the model over HTTP with OpenAI's API (/v1/chat/completions, /v1/completions, /v1/models), answering up
    to --max_batch_size requests at once, --max_queue more waiting (past that: 429).

    --api_key KEY (or the MISTRAL_API_KEY environment variable): every route but /health wants `Authorization:
    Bearer KEY`. --max_tokens caps what a request may ask for. --context N: the most positions a request may hold, for
    a model without a sliding window (default 8192; with a window, requests have no length limit). The whole cache
    is allocated at start. --speculate K: each answer drafts up to K tokens a step from its own text (as demo's).
    Ctrl-C or SIGTERM ends what runs and exits.
    """
    from mistral import server
    from mistral.engine import Engine

    for name, value, least in (("port", port, 1), ("max_batch_size", max_batch_size, 1), ("max_queue", max_queue, 0),
                               ("max_tokens", max_tokens, 1), ("chunk_size", chunk_size, 1)):
        if value < least:
            raise MistralError(f"--{name} must be at least {least}, got {value}")
    if port > 65535:
        raise MistralError(f"--port must be at most 65535, got {port}")
    check_speculate(speculate)
    if num_pipeline_ranks != 1:
        raise MistralError("serve runs in one process: --num_pipeline_ranks is not supported by it yet (run one "
                           "process per machine, with --quantize int4 to fit a larger model)")
    api_key = api_key if api_key is not None else os.environ.get("MISTRAL_API_KEY") or None
    if api_key is not None and not api_key.strip():
        raise MistralError("--api_key is empty: give a key, or leave it out to serve without one")

    def needs(args: ModelArgs, tokenizer: Tokenizer) -> tuple[int, int]:
        if context is not None and args.window is not None:
            raise MistralError(f"this model has a sliding window of {args.window} tokens, so requests have "
                               "no length limit: leave out --context")
        if context is not None and context < 2:
            raise MistralError(f"--context must be at least 2, got {context}")
        if args.window:  # rows roll: with drafts, spare slots
            return args.window + speculate, chunk_size
        return context or SERVE_CONTEXT, chunk_size

    folder = cli.SHIPPED_MODEL if model_path is None else cli.folder(model_path, "model_path")
    checkpoint.layout(folder)
    needs(checkpoint.read_args(folder, sliding_window), None)  # before the server starts: a mistake is said in one line
    cli.check_port(host, port)
    front = server.Server(folder.resolve().name, api_key=api_key, max_tokens=max_tokens)

    def load():
        model, tokenizer = cli.load(model_path, max_batch_size=max_batch_size, num_pipeline_ranks=1, device=device,
                                    dtype=dtype, quantize=quantize, needs=needs, sliding_window=sliding_window,
                                    lora=lora,
                                    shrinks_cache="a smaller --max_batch_size or --context")
        slots, _ = needs(model.args, tokenizer)
        if model.device.type == "cuda":
            terminal.info("serve runs its steps eagerly: the compiled decode step takes only steps in which every row "
                          "of its cache decodes, and a server's rows come and go")
        return Engine(model, tokenizer.eos_id, rows=max_batch_size, slots=slots, max_queue=max_queue,
                      chunk_size=chunk_size, speculate=speculate), tokenizer

    logging.getLogger("mistral").setLevel(logging.INFO)
    server.run(front, host, port, load)


COMMANDS = {"demo": demo, "interactive": interactive, "chat": chat, "fim": fim, "serve": serve,
            "explain": explain, "convert": convert, "quantize": quantize}


def main() -> None:
    cli.run(COMMANDS)


if __name__ == "__main__":
    main()
