"""The generation loop: chunked pre-fill of packed prompts, then decoding, one forward per step.

It is also the one place that decides what runs each step: a decode step goes to the compiled step
(mistral/compiled.py) when the caller built one and it takes the step, else to the CPU engine (mistral/cpu) where
there is one and it takes it, and everything else to the model.
"""
import math
from collections.abc import Callable

import torch

from mistral.cache import RotatingBufferCache
from mistral.memory import gb, memory_available
from mistral.compiled import CompiledDecoder
from mistral.cpu import CpuDecoder
from mistral import pipeline
from mistral.errors import MistralError
from mistral.model import Transformer
from mistral.sampling import SamplingParams, check_options, sample
from mistral.tokenizer import Tokenizer


@torch.inference_mode()
def generate_ids(prompts: list[list[int]], model: Transformer, *, max_tokens: int,
                 temperature: float = SamplingParams.temperature, top_p: float = SamplingParams.top_p,
                 top_k: int = SamplingParams.top_k, chunk_size: int | None = None, eos_id: int | None = None,
                 generator: torch.Generator | None = None, on_token: Callable[[int, int], None] | None = None,
                 cache: RotatingBufferCache | None = None, prompt_logprobs: bool = False,
                 engine: bool = True,
                 compiled: CompiledDecoder | None = None) -> tuple[list[list[int]], list[list[float]]]:
    """Complete token prompts; returns (generated ids, logprobs) per prompt.

    logprobs[b] scores every generated token; with prompt_logprobs, first every prompt token after the first
    too (which costs the output head at every prompt position, where sampling needs it at the last). Each step
    feeds every unfinished row either its next prompt chunk (at most chunk_size tokens) or its last
    sampled token, so a row that ends pre-fill early starts decoding while the others still pre-fill.
    A row that samples eos_id stops there (the EOS is its last token) and takes no further compute.
    on_token(row, token) is called for every generated token as soon as it is sampled.

    With a cache, prompt b continues the sequence in row b of it (a conversation's next turn, say); its last
    generated token is not fed, so the cache then holds each row's prompt and all of its completion but that token.
    Without one, a cache is built with as many slots as the longest row can reach, or the model's window if that is
    fewer. engine=False runs every step on the model, in torch. compiled: the decode steps every row of its cache
    takes (pass that cache too) run as its one compiled graph (mistral/compiled.py), the others as without it.
    """
    check_options(max_tokens, temperature, top_p, top_k, chunk_size)
    if not isinstance(prompts, list) or not all(isinstance(p, list) for p in prompts):
        raise MistralError(f"prompts must be a list of lists of token ids, got {type(prompts).__name__}")
    if not prompts:
        return [], []
    if any(len(p) == 0 for p in prompts):
        raise MistralError("empty prompt: every prompt needs at least one token")
    if len(prompts) > model.max_batch_size:
        raise MistralError(f"{len(prompts)} prompts but the model was loaded with max_batch_size="
                           f"{model.max_batch_size}; pass a larger max_batch_size")

    B, args = len(prompts), model.args
    # The positions each row will have fed: its prompt and every generated token but the last.
    reach = [len(p) + max(max_tokens - 1, 0) for p in prompts]
    if cache is None:
        slots = min(max(reach), args.sliding_window or max(reach))  # past the window the buffer rolls
        size = 2 * model.n_local_layers * B * slots * args.n_kv_heads * args.head_dim * model.dtype.itemsize
        if size > memory_available(model.device):
            raise MistralError(f"{B} rows of up to {max(reach):,} positions need a cache of {gb(size)}, more than the "
                               f"{gb(memory_available(model.device))} available: ask for fewer tokens or rows")
        cache = RotatingBufferCache(model.n_local_layers, B, slots, args.n_kv_heads, args.head_dim,
                                    device=model.device, dtype=model.dtype)
    else:
        if B > cache.max_batch_size:
            raise MistralError(f"{B} prompts but the cache has {cache.max_batch_size} rows")
        for b, n in enumerate(reach):
            cache.check_room(b, cache.seq_pos[b] + n, args.sliding_window)
    fed = [0] * B  # prompt tokens fed so far, per row
    generated: list[list[int]] = [[] for _ in range(B)]
    logprobs: list[list[float]] = [[] for _ in range(B)]
    finished = [max_tokens == 0] * B

    # Built for this generation: it gathers the weights once, so a weight replaced later needs a new one.
    decoder = CpuDecoder.of(model) if engine else None
    while True:
        inputs, seqlens = [], []
        # Each packed token's logits predict one known token (the next prompt token) or a new sample
        # (-1); the last token of a prompt when max_tokens == 0 predicts nothing and is not scored.
        scored, owners, targets = [], [], []
        for b, prompt in enumerate(prompts):
            if fed[b] < len(prompt):
                chunk = prompt[fed[b] : fed[b] + (chunk_size or len(prompt))]
                nexts = prompt[fed[b] + 1 : fed[b] + len(chunk) + 1]
                if fed[b] + len(chunk) == len(prompt) and not finished[b]:
                    nexts = nexts + [-1]
                fed[b] += len(chunk)
            elif not finished[b]:
                chunk, nexts = generated[b][-1:], [-1]
            else:
                chunk, nexts = [], []
            scored.extend(range(len(inputs), len(inputs) + len(nexts)))
            owners.extend([b] * len(nexts))
            targets.extend(nexts)
            inputs.extend(chunk)
            seqlens.append(len(chunk))
        if not inputs:
            break
        if not prompt_logprobs:  # only the positions that sample
            scored, owners, targets = ([x for x, t in zip(xs, targets) if t < 0] for xs in (scored, owners, targets))

        rows = None if len(scored) == len(inputs) else scored
        ids = torch.tensor(inputs, device=model.device)
        logits = compiled.step(ids, seqlens, cache, rows) if compiled is not None else None
        if logits is None and decoder is not None:
            logits = decoder.step(ids, seqlens, cache, rows)
        failure = None
        if logits is None:
            try:
                logits = model(ids, seqlens, cache, rows=rows)  # (N, V); None on a pipeline rank without the head
            except Exception as e:
                if model.num_pipeline_ranks == 1:
                    raise
                failure = e  # told to every rank below, before any raises
        to_sample = [t < 0 for t in targets]

        def pick() -> tuple[torch.Tensor, torch.Tensor]:
            """(N,) tokens, the sampled ones and the known targets, and (N,) their log-probabilities."""
            # A greedy decode step on a CPU: the engine picks each row's argmax and its log-softmax in one call.
            picked = decoder.greedy(logits) if decoder is not None and temperature == 0 and all(to_sample) else None
            if picked is not None:
                return picked
            if temperature > 0 and not torch.isfinite(logits).all():  # sampling would fail on them, less clearly
                raise _non_finite(model)
            if all(to_sample):  # every decode step: each row samples, and no tensor of targets is needed
                tokens = sample(logits, temperature, top_p, top_k, generator)  # (N,)
            else:
                tokens = torch.tensor(targets, device=logits.device)  # (N,)
                if any(to_sample):
                    new = torch.tensor(to_sample, device=logits.device)
                    tokens[new] = sample(logits[new], temperature, top_p, top_k, generator)
            return tokens, torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)  # (N,)

        if model.num_pipeline_ranks > 1:  # every step, scored or not: it is where a failure on any rank is told
            tokens, lps = pipeline.last_rank_pick(model, pick, len(targets), failure)
        else:
            tokens, lps = (t.tolist() for t in pick()) if scored else ([], [])

        for b, tok, lp, new in zip(owners, tokens, lps, to_sample):
            if math.isnan(lp):  # NaN or inf among the logits: the model's numbers are broken, not its choices
                raise _non_finite(model)
            logprobs[b].append(lp)
            if new:
                generated[b].append(tok)
                if on_token is not None:
                    on_token(b, tok)
                finished[b] = tok == eos_id or len(generated[b]) == max_tokens
    return generated, logprobs


def _non_finite(model: Transformer) -> MistralError:
    return MistralError("the model gave non-finite logits (NaN or inf): its weights are damaged, or too large for its "
                        f"dtype ({str(model.dtype).removeprefix('torch.')})")


def generate(prompts: list[str], model: Transformer, tokenizer: Tokenizer, *, max_tokens: int,
             temperature: float = SamplingParams.temperature, top_p: float = SamplingParams.top_p,
             top_k: int = SamplingParams.top_k, chunk_size: int | None = None,
             eos_id: int | None = None, generator: torch.Generator | None = None,
             prompt_logprobs: bool = False) -> tuple[list[str], list[list[float]]]:
    """Complete text prompts. Returns (texts, logprobs): texts[i] is prompt plus completion, decoded
    together; logprobs[i] scores every generated token (with prompt_logprobs, every prompt token after the
    first before them)."""
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        # a string is a sequence too: each of its characters would be taken for a prompt
        raise MistralError(f"prompts must be a list of strings, got {type(prompts).__name__}; for one prompt: [prompt]")
    if any(not p for p in prompts):
        raise MistralError("empty prompt: every prompt needs some text")
    encoded = [tokenizer.encode(p, bos=True) for p in prompts]
    generated, logprobs = generate_ids(encoded, model, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                       top_k=top_k, chunk_size=chunk_size, eos_id=eos_id, generator=generator,
                                       prompt_logprobs=prompt_logprobs)
    return [tokenizer.decode(p + g) for p, g in zip(encoded, generated)], logprobs
