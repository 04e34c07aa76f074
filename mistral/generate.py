"""The generation loop: chunked pre-fill of packed prompts, then decoding, one forward per step.

The state of a generation is one small object per row of the cache, Row: what its sequence has fed and generated,
and so what it feeds next. Each step is built from the rows (plan_step), run by whatever mistral/runners.py picks
for it, and then each row takes the tokens picked for it. Rows can join and leave between steps: a row that is done
feeds nothing, and a new Row can take its place in the cache (after cache.rewind(b, 0)); a server is this loop with
a queue in front.
"""
import collections
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mistral import pipeline
from mistral.args import ModelArgs
from mistral.cache import RotatingBufferCache, slots_for
from mistral.compiled import CompiledDecoder
from mistral.errors import MistralError
from mistral.memory import gb, memory_available
from mistral.model import Transformer
from mistral.runners import Runner
from mistral.sampling import SamplingParams, check_options, is_greedy, probabilities, sample
from mistral.speculate import Drafter, accept_sampled
from mistral.tokenizer import Tokenizer

NEW = -1  # the target of a position whose logits sample a new token, rather than score a known one
# Tokens a session (demo, interactive, chat) pre-fills at a time unless told otherwise (--chunk_size). A step's largest
# intermediate, the FFN's (S, hidden_dim), grows with its S tokens: a 100k-token paste pre-filled in one step needs
# about 6 GB for it alone on a 7B. In chunks of this many its memory is bounded, and what the check before loading
# assumes of a prompt (main.py's TYPICAL_PROMPT) holds whatever the prompt's length. A library caller of
# generate_ids chooses for itself: chunk_size=None pre-fills each prompt in one step.
PREFILL_CHUNK = 512
MAX_SPECULATE = 15  # draft tokens a row may verify at once: with its last token, the 16 rows the CPU kernels take


class Row:
    """One sequence of a generation: its prompt, what it has fed of it, and what it has generated.

    It feeds its prompt a chunk a step, then its last generated token each step, until it generates eos_id or
    max_tokens tokens; it then feeds nothing. prompt [5, 6, 7, 8, 9], chunk_size 2, max_tokens 3:

        step        1       2       3           4      5
        feeds       [5 6]   [7 8]   [9]         [g1]   [g2]
        predicts    [6 7]   [8 9]   [NEW] -> g1 [g2]   [g3]     (g3 is not fed: the row is done)

    Each row picks its tokens its own way (sampling, generator: rows that share both are sampled together, in one
    draw), and may ask for the top_logprobs most likely tokens at each token it samples, or (score_prompt) for the
    log-probability of each prompt token after its first.

    With speculate K, a decoding row drafts up to K tokens from its own text (mistral/speculate.py) and feeds them
    after its last token: step 4 above might feed [g1 d1 d2] and keep g2 = d1 and then g3, the model's own, where
    it disagrees with d2.
    """

    def __init__(self, prompt: list[int], max_tokens: int, eos_id: int | None = None,
                 sampling: SamplingParams = SamplingParams(), generator: torch.Generator | None = None,
                 top_logprobs: int = 0, score_prompt: bool = False, speculate: int = 0,
                 history: list[int] | None = None):
        """history: the ids before the prompt that its drafts may also be found in (a conversation's earlier turns,
        which the cache holds)."""
        self.prompt, self.max_tokens, self.eos_id = prompt, max_tokens, eos_id
        self.sampling, self.generator, self.top_logprobs, self.score_prompt = (sampling, generator, top_logprobs,
                                                                               score_prompt)
        self.fed = 0  # prompt tokens fed so far
        self.generated: list[int] = []
        self.logprobs: list[float] = []  # of each scored position, in order
        self.top: list[list[tuple[int, float]]] = []  # with top_logprobs: (token, logprob) pairs of each sampled one
        self.finished = max_tokens == 0
        self.failed: str | None = None  # why the row was stopped by its own broken numbers (Batch(strict=False))
        self.speculate = speculate
        self.drafter = Drafter((history or []) + prompt, speculate) if speculate else None
        self.draft: list[int] = []  # the tokens drafted for the step under way, fed after the last generated one
        self.drafted = self.accepted = 0  # draft tokens fed and kept, over the whole row

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt)

    def feed(self, limit: int | None, drafts: int = MAX_SPECULATE) -> tuple[list[int], list[int]]:
        """(the tokens this row feeds in the next step, at most `limit` of its prompt (None: all of it), or its last
        token and a draft of at most `drafts`; and what the logits of each predict: the next prompt token, or NEW); its
        last prompt token predicts nothing when max_tokens is 0."""
        prompt = self.prompt
        if self.prefilling:
            if limit == 0:
                return [], []
            chunk = prompt[self.fed : self.fed + (limit or len(prompt))]
            nexts = prompt[self.fed + 1 : self.fed + len(chunk) + 1]
            if self.fed + len(chunk) == len(prompt) and not self.finished:
                nexts = nexts + [NEW]
            self.fed += len(chunk)
            return chunk, nexts
        if not self.finished:
            # No draft past what the row may still generate: the last token it keeps is never fed.
            room = min(self.max_tokens - len(self.generated) - 1, drafts)
            self.draft = self.drafter.draft(room) if self.drafter else []
            return self.generated[-1:] + self.draft, [NEW] * (1 + len(self.draft))
        return [], []

    def take(self, token: int, logprob: float, new: bool, top: list[tuple[int, float]] | None = None) -> None:
        """Record a scored position: a known prompt token (new=False) or a sampled one, which may end the row."""
        self.logprobs.append(logprob)
        if new:
            self.generated.append(token)
            if self.drafter is not None:
                self.drafter.extend([token])
            if top is not None:
                self.top.append(top)
            self.finished = token == self.eos_id or len(self.generated) == self.max_tokens

    def verified(self, taken: int) -> None:
        """After a step that fed the last token and a draft, of which `taken` tokens were taken: the draft tokens the
        model agreed with are counted, and the drafter told, for the next draft."""
        accepted = min(taken - 1, len(self.draft))
        self.drafter.verified(len(self.draft), accepted)
        self.drafted, self.accepted = self.drafted + len(self.draft), self.accepted + accepted
        self.draft = []


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


def plan_step(rows: list[Row | None], chunk_size: int | None, prompt_logprobs: bool = False,
              budget: int | None = None) -> Plan:
    """What every row feeds next, packed: a row that ends pre-fill early starts decoding while the others still
    pre-fill. rows[b] is cache row b (None: a free row). Without prompt_logprobs (or the row's score_prompt) only the
    positions that sample are scored.

    budget: the most tokens the step feeds, where it can: every decoding row takes its one token, and the pre-filling
    ones share what is left, in row order, each its next chunk of chunk_size (those it does not fit sit the step out;
    the first goes whatever its size). A long prompt then comes in over several steps while the other rows keep
    decoding, one token a step, and it is cut into the same chunks as it would be alone.

    Speculating rows (mistral/speculate.py) share 1 + K tokens a step with the other decoding rows, in row order: a
    row alone drafts up to K, and 1 + K rows or more draft nothing. A step's first few tokens cost little more than
    one, while reading the weights takes longer than the arithmetic; past that each costs about as much as a step's
    tokens on average (on a 2-core CPU, 0.3-0.5 of a one-row step for a 7B in int4: bench/speculate.py). There, a
    draft token rejected even once in a while loses time, and the rows of a batch are the better use of a step."""
    plan = Plan([], [], [], [], [])
    decoding = [row for row in rows if row is not None and not row.prefilling and not row.finished]
    most = max((row.speculate for row in decoding), default=0)
    drafts = max(most + 1 - len(decoding), 0)  # the draft tokens this step's decoding rows may share
    left = None if budget is None else max(budget - len(decoding), 0)  # tokens the pre-filling rows may still feed
    for b, row in enumerate(rows):
        limit = chunk_size
        if row is not None and row.prefilling and left is not None:
            # A whole chunk or none, so that a prompt is cut into the same chunks whatever else runs; the first one
            # goes even past the budget, so that a chunk larger than it still comes in.
            whole = min(chunk_size or len(row.prompt), len(row.prompt) - row.fed)
            limit = whole if whole <= left or left == budget - len(decoding) else 0
            left = max(left - whole, 0) if limit else left
        chunk, nexts = row.feed(limit, drafts) if row is not None else ([], [])
        if row is not None and row.draft:
            drafts -= len(row.draft)
        if not (prompt_logprobs or (row is not None and row.score_prompt)):
            nexts = [t for t in nexts if t == NEW]  # the last prompt token's, or a decoding row's (with its draft)
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
                 engine: bool = True, compiled: CompiledDecoder | None = None, speculate: int = 0,
                 history: list[list[int]] | None = None,
                 counts: collections.Counter | None = None) -> tuple[list[list[int]], list[list[float]]]:
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

    speculate K > 0: each decoding row drafts up to K tokens from its own prompt and output and the model verifies
    them in the same step (mistral/speculate.py): greedy, the same ids as without; sampling, the same distribution. A
    cache given for it needs K spare slots where a row may wrap (RotatingBufferCache(spare=K)). history[b]: ids
    before prompt b that row b's drafts may be found in too (what the cache already holds of a conversation).
    counts: gains every row's draft tokens fed ("drafted") and kept ("accepted"), also when a step raises.

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
    check_speculate(speculate)
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
    cache = _cache_for(model, reach, speculate) if cache is None else _checked(cache, model, reach, speculate)
    sampling = SamplingParams(temperature, top_p, top_k)
    batch = Batch(model, cache, Runner(model, engine, compiled), chunk_size, prompt_logprobs=prompt_logprobs)
    batch.rows = [Row(p, max_tokens, eos_id, sampling, generator, speculate=speculate,
                      history=history[b] if history else None) for b, p in enumerate(prompts)]
    try:
        while batch.step(on_token):
            pass
    finally:
        if counts is not None:
            counts.update(drafted=sum(row.drafted for row in batch.rows),
                          accepted=sum(row.accepted for row in batch.rows))
    return [row.generated for row in batch.rows], [row.logprobs for row in batch.rows]


class Batch:
    """The rows of one cache, stepped together: rows[b] is row b of the cache (None: free). generate_ids fills them
    once and steps until every row is done; a server (mistral/engine.py) puts a new Row in a free row, or takes one
    out, between any two steps.

    strict: a row whose logits are not finite (damaged weights that only some inputs touch) fails the whole step, which
    raises and is forgotten, as any exception. Otherwise that row alone stops, with row.failed saying why: the others'
    numbers do not depend on it, and they go on."""

    def __init__(self, model: Transformer, cache: RotatingBufferCache, runner: Runner, chunk_size: int | None,
                 budget: int | None = None, prompt_logprobs: bool = False, strict: bool = True, split: bool = False):
        self.model, self.cache, self.runner = model, cache, runner
        self.chunk_size, self.budget, self.prompt_logprobs = chunk_size, budget, prompt_logprobs
        self.strict, self.split = strict, split
        self.failed: list[int] = []  # the rows of the forward that raised last
        self.rows: list[Row | None] = [None] * cache.max_batch_size

    @torch.inference_mode()
    def step(self, on_token: Callable[[int, int], None] | None = None) -> bool:
        """Run one step of every row that has something to feed, and give each its tokens (on_token(row, token) for
        each sampled one, as soon as it is). False, with nothing done, when no row has anything to feed.

        A step that raises (in its forward, on whatever runs it, or on non-finite logits under strict; Ctrl-C
        included) is not counted, as generate_ids says. With split, the step runs as several forwards: the rows that
        feed one token together (a decode step, which the CPU engine takes), and each pre-filling row alone, so that
        no row's numbers depend on which others run beside it; each forward is counted, or forgotten, on its own."""
        plan = plan_step(self.rows, self.chunk_size, self.prompt_logprobs, self.budget)
        if not plan.inputs:
            return False
        for part in _split(plan, self.rows) if self.split else [plan]:
            self._run(part, on_token)
        return True

    def _run(self, plan: Plan, on_token: Callable[[int, int], None] | None) -> None:
        seen = list(self.cache.seq_pos)  # (B,) to go back to if the step raises
        try:
            with self.runner.threads(plan.seqlens):
                tokens, lps, tops, broken = _run_step(plan, self.rows, self.runner, self.model, self.cache,
                                                      self.strict)
        except BaseException:
            _forget(self.cache, seen, plan.seqlens)
            self.failed = [b for b, n in enumerate(plan.seqlens) if n]
            raise
        for b in broken:
            self.rows[b].failed = str(_non_finite(self.model))
            self.rows[b].finished = True
        new = [0] * len(plan.seqlens)  # the tokens each row generated in this step
        taken = []  # (row, token), for on_token once the cache is back in order
        for b, tok, lp, top, target in zip(plan.owners, tokens, lps, tops, plan.targets):
            row = self.rows[b]
            if b in broken or target == NEW and (row.finished or new[b] and row.draft[new[b] - 1] != row.generated[-1]):
                continue  # past the first token its draft did not foresee (or past the row's end): dropped
            row.take(tok, lp, target == NEW, top)
            new[b] += target == NEW
            if target == NEW:
                taken.append((b, tok))
        for b, n in enumerate(new):
            row = self.rows[b]
            if row is not None and row.draft and b not in broken:
                # The last token and the draft went in: the positions after the n kept are taken back.
                self.cache.rewind(b, seen[b] + n)
                row.verified(n)
        if on_token is not None:
            for b, tok in taken:
                on_token(b, tok)


def _split(plan: Plan, rows: list[Row | None]) -> list[Plan]:
    """The plan as several: the decoding rows (one token, or it and a draft) together, then each row that feeds more,
    alone."""
    starts = [sum(plan.seqlens[:b]) for b in range(len(plan.seqlens))]
    decoding = [n == 1 or bool(rows[b] is not None and rows[b].draft) for b, n in enumerate(plan.seqlens)]
    groups = [[b for b, d in enumerate(decoding) if d]] + [[b] for b, n in enumerate(plan.seqlens)
                                                             if n > 1 and not decoding[b]]
    parts = []
    for group in groups:
        if not group:
            continue
        part, at = Plan([], [0] * len(plan.seqlens), [], [], []), {}
        for b in group:
            at[b] = len(part.inputs) - starts[b]  # moves row b's packed positions to the part's
            part.inputs.extend(plan.inputs[starts[b] : starts[b] + plan.seqlens[b]])
            part.seqlens[b] = plan.seqlens[b]
        for s, b, t in zip(plan.scored, plan.owners, plan.targets):
            if b in at:
                part.scored.append(s + at[b])
                part.owners.append(b)
                part.targets.append(t)
        parts.append(part)
    return parts


def _run_step(plan: Plan, rows: list[Row], runner: Runner, model: Transformer, cache: RotatingBufferCache,
              strict: bool) -> tuple[list[int], list[float], list[list[tuple[int, float]] | None], set[int]]:
    """Run one step and pick its tokens: (R,) tokens, (R,) their log-probabilities, (R,) the top_logprobs pairs of
    each (None where its row asks for none), and the rows whose logits are not finite (strict: it raises instead)."""
    ids = torch.tensor(plan.inputs, device=model.device)
    logits, failure = runner.step(ids, plan.seqlens, cache, plan.rows)  # (R, V); None on a rank without the head
    broken: set[int] = set()
    if not strict and plan.scored:
        finite = torch.isfinite(logits).all(dim=1).tolist()  # (R,)
        broken = {b for b, ok in zip(plan.owners, finite) if not ok}
        if broken:  # the others' picks need no numbers of theirs: those rows pick from zeros, and are dropped
            logits = logits.masked_fill(~torch.tensor(finite, device=logits.device)[:, None], 0.0)

    def pick() -> tuple[torch.Tensor, torch.Tensor]:
        return _pick(logits, plan.targets, [rows[b] for b in plan.owners], runner, model)

    tops: list = [None] * len(plan.targets)
    if model.num_pipeline_ranks > 1:  # every step, scored or not: it is where a failure on any rank is told
        tokens, lps = pipeline.last_rank_pick(model, pick, len(plan.targets), failure)
    elif plan.scored:
        tokens, lps = (t.tolist() for t in pick())
        tops = _tops(logits, plan.targets, [rows[b] for b in plan.owners])
    else:
        tokens, lps = [], []
    if any(math.isnan(lp) for lp in lps):  # NaN or inf among the logits: the model's numbers are broken
        raise _non_finite(model)
    return tokens, lps, tops, broken


def _forget(cache: RotatingBufferCache, seen: list[int], seqlens: list[int]) -> None:
    """Undo a step that raised: row b is back at seen[b] positions, and the slots where the step would have written
    its seqlens[b] new positions (the last N of them, at most) are zeroed, whether or not it got that far.

    seen [2, 9], seqlens [3, 1], N=4: row 0 forgets positions 2, 3, 4: slots 2, 3 and 0, which held position 0, still
    counted but lost (the row wrapped in the step). Row 1 forgets position 9: slot 1, which held position 5, the one
    that a query at position 9 no longer sees with a window of 4."""
    N = cache.slots
    for b, n in enumerate(seqlens):
        if n:
            cache.clear(b, sorted({p % N for p in range(seen[b] + max(n - N, 0), seen[b] + n)}))
    cache.seq_pos[:] = seen


def check_speculate(speculate: int) -> None:
    if not isinstance(speculate, int) or isinstance(speculate, bool) or not 0 <= speculate <= MAX_SPECULATE:
        raise MistralError(f"speculate must be a whole number of draft tokens from 0 (off) to {MAX_SPECULATE}, "
                           f"got {speculate!r}")


def speculating_slots(reach: int, args: ModelArgs, speculate: int) -> tuple[int, int]:
    """(slots, spare) of a cache for rows reaching `reach` positions that draft up to `speculate` tokens: as many spare
    slots as draft tokens where a row may wrap around a layer's window (the narrowest wraps first; a model with
    layers of full attention too keeps all positions in those), none where it never does."""
    spare = speculate if args.narrowest is not None and reach > args.narrowest else 0
    return slots_for(reach, args.window) + spare, spare


def _cache_for(model: Transformer, reach: list[int], speculate: int = 0) -> RotatingBufferCache:
    """A cache for rows that will reach these many positions, after checking that it fits in memory."""
    args, B = model.args, len(reach)
    slots, spare = speculating_slots(max(reach), args, speculate)
    size = 2 * model.n_local_layers * B * slots * args.n_kv_heads * args.head_dim * model.dtype.itemsize
    free = memory_available(model.device)
    if size > free:
        raise MistralError(f"{B} rows of up to {max(reach):,} positions need a cache of {gb(size)}, more than the "
                           f"{gb(free)} available: ask for fewer tokens or rows")
    return RotatingBufferCache(model.n_local_layers, B, slots, args.n_kv_heads, args.head_dim, device=model.device,
                               dtype=model.dtype, windows=model.layer_windows, spare=spare)


def _checked(cache: RotatingBufferCache, model: Transformer, reach: list[int], speculate: int = 0
             ) -> RotatingBufferCache:
    """The caller's cache, after checking that each row can go on for `reach` more positions (and take back drafts of
    `speculate` tokens)."""
    if len(reach) > cache.max_batch_size:
        raise MistralError(f"{len(reach)} prompts but the cache has {cache.max_batch_size} rows")
    if speculate > cache.spare and cache.wraps(model.args.narrowest):
        raise MistralError(f"speculate={speculate} needs that many spare slots in a cache whose rows wrap around the "
                           f"window; this one has {cache.spare}: build it with RotatingBufferCache(spare={speculate})")
    for b, n in enumerate(reach):
        cache.check_room(b, cache.seq_pos[b] + n, model.args.window)
    return cache


def _pick(logits: torch.Tensor, targets: list[int], owners: list[Row], runner: Runner,
          model: Transformer) -> tuple[torch.Tensor, torch.Tensor]:
    """(R,) tokens, the sampled ones and the known targets, and (R,) their log-probabilities. owners[r] is the row of
    position r: the sampled positions of rows with the same sampling and generator are drawn together, in order."""
    to_sample = [t == NEW for t in targets]
    # A greedy decode step on a CPU: the engine picks each row's argmax and its log-softmax in one call.
    greedy = all(row.sampling.temperature == 0 for row in owners)
    picked = runner.greedy(logits) if greedy and all(to_sample) else None
    if picked is not None:
        return picked
    draws: dict[tuple, list[int]] = {}  # (sampling, generator) -> the positions it samples
    drafts: dict[int, list[int]] = {}  # a sampling row with a draft -> its positions, verified together
    for r, (row, new) in enumerate(zip(owners, to_sample)):
        if new and row.draft and not is_greedy(row.sampling.temperature):  # greedy drafts: argmax, as any token
            drafts.setdefault(id(row), []).append(r)
        elif new:
            draws.setdefault((row.sampling, id(row.generator)), []).append(r)
    if not greedy and not torch.isfinite(logits).all():  # sampling would fail on them, less clearly
        raise _non_finite(model)
    tokens = torch.tensor(targets, device=logits.device)  # (R,)
    for (params, _), at in draws.items():
        generator = owners[at[0]].generator
        if len(at) == len(targets):  # every decode step of one kind of rows: no gather
            tokens = sample(logits, params.temperature, params.top_p, params.top_k, generator)  # (R,)
        else:
            index = torch.tensor(at, device=logits.device)
            tokens[index] = sample(logits[index], params.temperature, params.top_p, params.top_k, generator)
    for at in drafts.values():
        row, params = owners[at[0]], owners[at[0]].sampling
        kept = accept_sampled(probabilities(logits[at], params.temperature, params.top_p, params.top_k), row.draft,
                              row.generator)
        tokens[at] = 0  # the positions after the first the draft did not foresee: dropped
        tokens[at[: len(kept)]] = torch.tensor(kept, device=logits.device)
    return tokens, torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)  # (R,)


def _tops(logits: torch.Tensor, targets: list[int], owners: list[Row]) -> list[list[tuple[int, float]] | None]:
    """For each sampled position whose row asks for top_logprobs k: its k most likely (token, logprob) pairs."""
    out: list[list[tuple[int, float]] | None] = [None] * len(targets)
    for r, (row, target) in enumerate(zip(owners, targets)):
        if target == NEW and row.top_logprobs:
            values, ids = torch.log_softmax(logits[r].float(), dim=-1).topk(row.top_logprobs)
            out[r] = list(zip(ids.tolist(), values.tolist()))
    return out


def _non_finite(model: Transformer) -> MistralError:
    return MistralError("the model gave non-finite logits (NaN or inf): its weights are damaged, or too large for its "
                        f"dtype ({str(model.dtype).removeprefix('torch.')})")


def generate(prompts: list[str], model: Transformer, tokenizer: Tokenizer, *, max_tokens: int,
             temperature: float = SamplingParams.temperature, top_p: float = SamplingParams.top_p,
             top_k: int = SamplingParams.top_k, chunk_size: int | None = None,
             eos_id: int | None = None, generator: torch.Generator | None = None,
             prompt_logprobs: bool = False, speculate: int = 0) -> tuple[list[str], list[list[float]]]:
    """Complete text prompts. Returns (texts, logprobs): texts[i] is prompt plus completion, decoded
    together; logprobs[i] scores every generated token (with prompt_logprobs, every prompt token after the
    first before them). speculate: as generate_ids'."""
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        # a string is a sequence too: each of its characters would be taken for a prompt
        raise MistralError(f"prompts must be a list of strings, got {type(prompts).__name__}; for one prompt: [prompt]")
    if any(not p for p in prompts):
        raise MistralError("empty prompt: every prompt needs some text")
    encoded = [tokenizer.encode(p, bos=True) for p in prompts]
    generated, logprobs = generate_ids(encoded, model, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                       top_k=top_k, chunk_size=chunk_size, eos_id=eos_id, generator=generator,
                                       prompt_logprobs=prompt_logprobs, speculate=speculate)
    return [tokenizer.decode(p + g) for p, g in zip(encoded, generated)], logprobs
