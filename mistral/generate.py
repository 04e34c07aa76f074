"""The generation loop: chunked pre-fill of packed prompts, then decoding, one forward per step.

The state of a generation is one small object per row of the cache, Row: what its sequence has fed and generated,
and so what it feeds next. Each step is built from the rows (plan_step), run by whatever mistral/runners.py picks
for it, and then each row takes the tokens picked for it. Rows can join and leave between steps: a row that is done
feeds nothing, and a new Row can take its place in the cache (after cache.rewind(b, 0)); a server is this loop with
a queue in front.
"""
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mistral import pipeline
from mistral.cache import RotatingBufferCache, slots_for
from mistral.compiled import CompiledDecoder
from mistral.errors import MistralError
from mistral.memory import gb, memory_available
from mistral.model import Transformer
from mistral.runners import Runner
from mistral.sampling import SamplingParams, check_options, sample
from mistral.tokenizer import Tokenizer

NEW = -1  # the target of a position whose logits sample a new token, rather than score a known one
# Tokens a session (demo, interactive, chat) pre-fills at a time unless told otherwise (--chunk_size). A step's largest
# intermediate, the FFN's (S, hidden_dim), grows with its S tokens: a 100k-token paste pre-filled in one step needs
# about 6 GB for it alone on a 7B. In chunks of this many its memory is bounded, and what the check before loading
# assumes of a prompt (main.py's TYPICAL_PROMPT) holds whatever the prompt's length. A library caller of
# generate_ids chooses for itself: chunk_size=None pre-fills each prompt in one step.
PREFILL_CHUNK = 512


class Row:
    """One sequence of a generation: its prompt, what it has fed of it, and what it has generated.

    It feeds its prompt a chunk a step, then its last generated token each step, until it generates eos_id or
    max_tokens tokens; it then feeds nothing. prompt [5, 6, 7, 8, 9], chunk_size 2, max_tokens 3:

        step        1       2       3           4      5
        feeds       [5 6]   [7 8]   [9]         [g1]   [g2]
        predicts    [6 7]   [8 9]   [NEW] -> g1 [g2]   [g3]     (g3 is not fed: the row is done)
    """

    def __init__(self, prompt: list[int], max_tokens: int, eos_id: int | None = None):
        self.prompt, self.max_tokens, self.eos_id = prompt, max_tokens, eos_id
        self.fed = 0  # prompt tokens fed so far
        self.generated: list[int] = []
        self.logprobs: list[float] = []  # of each scored position, in order
        self.finished = max_tokens == 0

    def feed(self, chunk_size: int | None) -> tuple[list[int], list[int]]:
        """(the tokens this row feeds in the next step, what the logits of each predict: the next prompt token, or
        NEW); its last prompt token predicts nothing when max_tokens is 0."""
        prompt = self.prompt
        if self.fed < len(prompt):
            chunk = prompt[self.fed : self.fed + (chunk_size or len(prompt))]
            nexts = prompt[self.fed + 1 : self.fed + len(chunk) + 1]
            if self.fed + len(chunk) == len(prompt) and not self.finished:
                nexts = nexts + [NEW]
            self.fed += len(chunk)
            return chunk, nexts
        if not self.finished:
            return self.generated[-1:], [NEW]
        return [], []

    def take(self, token: int, logprob: float, new: bool) -> None:
        """Record a scored position: a known prompt token (new=False) or a sampled one, which may end the row."""
        self.logprobs.append(logprob)
        if new:
            self.generated.append(token)
            self.finished = token == self.eos_id or len(self.generated) == self.max_tokens


@dataclass
class Plan:
    """One step, built from the rows by plan_step. Letters: S packed tokens, B cache rows, R scored positions."""

    inputs: list[int]  # (S,) the tokens every row feeds, packed
    seqlens: list[int]  # (B,) how many of them each row feeds (0: it sits the step out)
    scored: list[int]  # (R,) packed positions whose logits are needed
    owners: list[int]  # (R,) the row of each
    targets: list[int]  # (R,) what each predicts: a known token, or NEW

    @property
    def rows(self) -> list[int] | None:
        """The packed positions the model returns logits for: None for all of them."""
        return None if len(self.scored) == len(self.inputs) else self.scored


def plan_step(rows: list[Row | None], chunk_size: int | None, prompt_logprobs: bool = False) -> Plan:
    """What every row feeds next, packed: a row that ends pre-fill early starts decoding while the others still
    pre-fill. rows[b] is cache row b (None: a free row). Without prompt_logprobs only the positions that sample are
    scored."""
    plan = Plan([], [], [], [], [])
    for b, row in enumerate(rows):
        chunk, nexts = row.feed(chunk_size) if row is not None else ([], [])
        if not prompt_logprobs:
            nexts = [NEW] if nexts and nexts[-1] == NEW else []
            first = len(plan.inputs) + len(chunk) - len(nexts)
        else:
            first = len(plan.inputs)
        plan.scored.extend(range(first, first + len(nexts)))
        plan.owners.extend([b] * len(nexts))
        plan.targets.extend(nexts)
        plan.inputs.extend(chunk)
        plan.seqlens.append(len(chunk))
    return plan


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

    A step that raises (in its forward, on whatever runs it, or on non-finite logits; Ctrl-C included) is not counted:
    the exception propagates, and each row's cache.seq_pos is what it was before that step, so it counts exactly the
    positions of the steps that completed, whose tokens were taken. The slots the failed step may have written are
    zeroed (a masked slot that held NaN would still poison the decode attention that reads it). A row whose failed
    step stayed within its slots (seq_pos + the tokens it fed <= N) holds every position it counts, and can be rewound
    to any of them. A row that wrapped, before or in the failed step, may no longer hold some positions it counts: the
    failed step's slots held the N positions before its own. After one token (decode) that is one position that no
    query reads again when N is the window; after a chunk, positions still in the window: the caller must not trust
    that row, and should reset it (cache.rewind(b, 0) needs it unwrapped: cache.reset() forgets every row) and
    pre-fill it again. Rows that fed nothing in the failed step are untouched.
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
    # The positions each row will have fed: its prompt and every generated token but the last.
    reach = [len(p) + max(max_tokens - 1, 0) for p in prompts]
    cache = _cache_for(model, reach) if cache is None else _checked(cache, model, reach)
    rows = [Row(p, max_tokens, eos_id) for p in prompts]
    runner = Runner(model, engine, compiled)
    while (plan := plan_step(rows, chunk_size, prompt_logprobs)).inputs:
        seen = list(cache.seq_pos)  # (B,) to go back to if the step raises
        try:
            with runner.threads(plan.seqlens):
                tokens, lps = _run_step(plan, runner, model, cache, temperature, top_p, top_k, generator)
        except BaseException:
            _forget(cache, seen, plan.seqlens)
            raise
        for b, tok, lp, new in zip(plan.owners, tokens, lps, (t == NEW for t in plan.targets)):
            rows[b].take(tok, lp, new)
            if new and on_token is not None:
                on_token(b, tok)
    return [row.generated for row in rows], [row.logprobs for row in rows]


def _run_step(plan: Plan, runner: Runner, model: Transformer, cache: RotatingBufferCache, temperature: float,
              top_p: float, top_k: int, generator: torch.Generator | None) -> tuple[list[int], list[float]]:
    """Run one step and pick its tokens: (R,) tokens and (R,) their log-probabilities."""
    ids = torch.tensor(plan.inputs, device=model.device)
    logits, failure = runner.step(ids, plan.seqlens, cache, plan.rows)  # (R, V); None on a rank without the head

    def pick() -> tuple[torch.Tensor, torch.Tensor]:
        return _pick(logits, plan.targets, runner, model, temperature, top_p, top_k, generator)

    if model.num_pipeline_ranks > 1:  # every step, scored or not: it is where a failure on any rank is told
        tokens, lps = pipeline.last_rank_pick(model, pick, len(plan.targets), failure)
    else:
        tokens, lps = (t.tolist() for t in pick()) if plan.scored else ([], [])
    if any(math.isnan(lp) for lp in lps):  # NaN or inf among the logits: the model's numbers are broken
        raise _non_finite(model)
    return tokens, lps


def _forget(cache: RotatingBufferCache, seen: list[int], seqlens: list[int]) -> None:
    """Undo a step that raised: row b is back at seen[b] positions, and the slots where the step would have written
    its seqlens[b] new positions (the last N of them, at most) are zeroed, whether or not it got that far.

    seen [2, 9], seqlens [3, 1], N=4: row 0 forgets positions 2, 3, 4: slots 2, 3 and 0, which held position 0, still
    counted but lost (the row wrapped in the step). Row 1 forgets position 9: slot 1, which held position 5, the one
    that a query at position 9 no longer sees with a window of 4."""
    N = cache.slots
    for b, n in enumerate(seqlens):
        if n:
            slots = sorted({p % N for p in range(seen[b] + max(n - N, 0), seen[b] + n)})
            cache.cache_k[:, b, :, slots] = 0  # (L, Hkv, n, D)
            cache.cache_v[:, b, :, slots] = 0
    cache.seq_pos[:] = seen


def _cache_for(model: Transformer, reach: list[int]) -> RotatingBufferCache:
    """A cache for rows that will reach these many positions, after checking that it fits in memory."""
    args, B = model.args, len(reach)
    slots = slots_for(max(reach), args.sliding_window)
    size = 2 * model.n_local_layers * B * slots * args.n_kv_heads * args.head_dim * model.dtype.itemsize
    free = memory_available(model.device)
    if size > free:
        raise MistralError(f"{B} rows of up to {max(reach):,} positions need a cache of {gb(size)}, more than the "
                           f"{gb(free)} available: ask for fewer tokens or rows")
    return RotatingBufferCache(model.n_local_layers, B, slots, args.n_kv_heads, args.head_dim, device=model.device,
                               dtype=model.dtype)


def _checked(cache: RotatingBufferCache, model: Transformer, reach: list[int]) -> RotatingBufferCache:
    """The caller's cache, after checking that each row can go on for `reach` more positions."""
    if len(reach) > cache.max_batch_size:
        raise MistralError(f"{len(reach)} prompts but the cache has {cache.max_batch_size} rows")
    for b, n in enumerate(reach):
        cache.check_room(b, cache.seq_pos[b] + n, model.args.sliding_window)
    return cache


def _pick(logits: torch.Tensor, targets: list[int], runner: Runner, model: Transformer, temperature: float,
          top_p: float, top_k: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(R,) tokens, the sampled ones and the known targets, and (R,) their log-probabilities."""
    to_sample = [t == NEW for t in targets]
    # A greedy decode step on a CPU: the engine picks each row's argmax and its log-softmax in one call.
    picked = runner.greedy(logits) if temperature == 0 and all(to_sample) else None
    if picked is not None:
        return picked
    if temperature > 0 and not torch.isfinite(logits).all():  # sampling would fail on them, less clearly
        raise _non_finite(model)
    if all(to_sample):  # every decode step: each row samples, and no tensor of targets is needed
        tokens = sample(logits, temperature, top_p, top_k, generator)  # (R,)
    else:
        tokens = torch.tensor(targets, device=logits.device)  # (R,)
        if any(to_sample):
            new = torch.tensor(to_sample, device=logits.device)
            tokens[new] = sample(logits[new], temperature, top_p, top_k, generator)
    return tokens, torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)  # (R,)


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
