"""The serving engine: one thread owns the model and its cache, and steps every request's row together.

This is generate_ids' loop (mistral/generate.py's Batch) with a queue in front: between any two steps a waiting
request takes a free cache row, and a finished, stopped or cancelled one leaves it. Each step, the decoding rows take
one token each, in one forward (the CPU engine's decode step, which reads every weight once for all of them), and the
pre-filling rows take their next chunk within a budget of tokens, each in a forward of its own: a long prompt comes in
over several steps while the others keep decoding, and no row's numbers depend on which others run beside it, so an
answer is the same served alone or among others.

    engine = Engine(model, eos_id, rows=8, slots=W)    # the whole cache is allocated here, once
    engine.start()
    engine.submit(Request(ids, max_tokens, emit=...))   # from any thread; emit is called from the engine's
    engine.cancel(request)                               # the row is free after the step under way
    engine.stop()

Prefix reuse: a free row keeps the ids its cache holds, and a new request whose ids begin with them pre-fills only the
rest (a conversation's next turn, sent whole). The rolling rule decides when that is allowed: a row that never wrapped
holds every position it saw and can be cut back to any; a row that wrapped holds only its last W, enough to go on from
its end, but not to go back.

    a row holds [1 5 9 4 7] (never wrapped), a request brings [1 5 9 2]: rewind to 3, pre-fill [2]
    a row holds 9000 ids with W=4096 (wrapped), a request extends them: pre-fill only what is new
    a row holds 9000 ids with W=4096 (wrapped), a request differs at id 8000: pre-fill all of it, in another row
"""
import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mistral.cache import RotatingBufferCache
from mistral.errors import MistralError
from mistral.generate import PREFILL_CHUNK, Batch, Row
from mistral.model import Transformer
from mistral.runners import Runner
from mistral.sampling import SamplingParams

log = logging.getLogger(__name__)

_ids = itertools.count(1)
MIN_REUSE = 16  # ids a new request must find in a row to take it over from an empty one (a BOS alone is not worth it)


@dataclass(eq=False)
class Request:
    """One sequence to complete. emit(kind, data) is called from the engine's thread as it goes:

        ("token", (token, logprob, top))   each sampled token; top: its row's top_logprobs pairs, or None
        ("end", reason)                    "stop" (EOS), "length" (max_tokens), "cancelled", or "error: why"

    After "end", row holds what the row recorded: with score_prompt, row.logprobs starts with the log-probability of
    each prompt token after the first (of those pre-filled: score_prompt turns prefix reuse off)."""

    ids: list[int]
    max_tokens: int
    emit: Callable[[str, object], None]
    sampling: SamplingParams = SamplingParams()
    seed: int | None = None  # None: a seed of its own, drawn at random
    top_logprobs: int = 0
    score_prompt: bool = False
    id: int = field(default_factory=lambda: next(_ids))
    cached: int = 0  # ids of the prompt found in the cache, not pre-filled again
    row: Row | None = None
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    sent: int = 0  # tokens emitted so far


class QueueFull(Exception):
    pass


class Engine:
    """Requests served together on one model: `rows` of them at a time, each in a cache row of `slots` slots (the
    model's window, or the most positions a request may reach without one), `max_queue` more waiting."""

    def __init__(self, model: Transformer, eos_id: int | None, *, rows: int, slots: int, max_queue: int = 64,
                 chunk_size: int = PREFILL_CHUNK, budget: int | None = None, speculate: int = 0):
        """speculate: draft tokens each row verifies a step (mistral/speculate.py); with a window, `slots` then counts
        the spare ones too (the window and as many more)."""
        args = model.args
        # Where rows roll, a draft may be no longer than the spare slots that let it be taken back: those past the
        # window; without one, only layers of a narrower window roll, and keep a slot per draft token beyond it.
        if args.window:
            spare = min(speculate, max(slots - args.window, 0))
            self.speculate = spare if slots >= args.window else speculate
        else:
            spare, self.speculate = (speculate if args.narrowest else 0), speculate
        self.model, self.eos_id, self.max_queue = model, eos_id, max_queue
        self.cache = RotatingBufferCache(model.n_local_layers, rows, slots, args.n_kv_heads, args.head_dim,
                                         device=model.device, dtype=model.dtype, windows=model.layer_windows,
                                         spare=spare)
        self.batch = Batch(model, self.cache, Runner(model), chunk_size, budget=budget or chunk_size, strict=False,
                           split=True)
        self.owners: list[Request | None] = [None] * rows
        self.held: list[list[int]] = [[] for _ in range(rows)]  # the ids whose keys each row's cache holds
        self.used = [0] * rows  # when each row last took a request, for the least recently used
        self.waiting: collections.deque[Request] = collections.deque()
        self.lock = threading.Condition()
        self.stopping = False
        self.thread: threading.Thread | None = None
        # For /metrics: prefilled, generated, requests, ttft_sum, ttft_count; drafted and accepted (draft tokens fed
        # and kept, --speculate) by requests that ended.
        self.counts = collections.Counter()
        # Called after a step whose tokens went out, before the next: a server waits there (briefly) until it has sent
        # them, so that its thread does not take a core from the next step's kernels, whose threads would all wait
        # for the one it displaced at their next barrier.
        self.settle: Callable[[], None] | None = None

    # Called from any thread.

    def submit(self, request: Request) -> None:
        """Queue a request (QueueFull past max_queue; MistralError for one that would not fit a row)."""
        self.check_fits(len(request.ids), request.max_tokens)
        with self.lock:
            if self.stopping:
                raise QueueFull("the server is stopping")
            if len(self.waiting) >= self.max_queue + self.owners.count(None):
                raise QueueFull(f"{len(self.waiting)} requests are waiting for a row already")
            self.waiting.append(request)
            self.lock.notify()

    def cancel(self, request: Request) -> None:
        """The request ends ("cancelled") before the next step, and frees its row: a client that has gone."""
        with self.lock:
            request.cancelled = True
            self.lock.notify()

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """End every request ("cancelled"), and the thread after its step under way."""
        with self.lock:
            self.stopping = True
            self.lock.notify()
        if self.thread is not None:
            self.thread.join(timeout)

    def room(self, n_ids: int) -> int | None:
        """The most tokens a prompt of n_ids may be followed by; None where rows roll (the model has a sliding window,
        and a row holds all of it), so that a request may go on as long as it likes."""
        window = self.model.args.window
        return None if window is not None and self.cache.slots >= window else self.cache.slots - n_ids + 1

    def check_fits(self, n_ids: int, max_tokens: int) -> None:
        """Refuse a request that would need more positions than a row holds (a model without a window), with the
        numbers: it is never cut to fit."""
        reach = n_ids + max(max_tokens - 1, 0)
        if self.room(n_ids) is not None and reach > self.cache.slots:
            raise MistralError(f"this request needs {reach} positions ({n_ids} prompt tokens and max_tokens "
                               f"{max_tokens}), more than the {self.cache.slots} a request may hold here (the model "
                               "has no sliding window; the server's --context): send less, or lower max_tokens")

    def load(self) -> dict[str, int]:
        with self.lock:
            running = sum(r is not None for r in self.owners)
            return {"running": running, "waiting": len(self.waiting), "rows": len(self.owners)}

    # The engine's thread.

    @torch.inference_mode()
    def _loop(self) -> None:
        while True:
            with self.lock:
                self._retire()
                if self.stopping:
                    for request in [*self.waiting, *filter(None, self.owners)]:
                        request.cancelled = True
                    self._retire()
                    for request in self.waiting:
                        request.emit("end", "cancelled")
                    self.waiting.clear()
                    return
                self._admit()
                if not any(self.owners):
                    self.lock.wait()
                    continue
            try:
                if not self.batch.step(self._took):  # cannot happen: every row that has not finished feeds
                    time.sleep(0.01)
                elif self.settle is not None:
                    self.settle()
            except Exception as e:  # a forward that raised: its rows end with the error, the others go on
                log.exception("a step failed")
                self._fail_step(f"error: {type(e).__name__}: {e}")

    def _took(self, b: int, token: int) -> None:
        request, row = self.owners[b], self.batch.rows[b]
        now = time.perf_counter()
        if request.first_token is None:
            request.first_token = now
            self.counts["ttft_sum"] += now - request.submitted
            self.counts["ttft_count"] += 1
            self.counts["prefilled"] += len(request.ids) - request.cached
        self.counts["generated"] += 1
        # A step may keep several tokens (a verified draft), all taken before the first is told: each goes out with
        # its own logprob (the last len(generated) of row.logprobs are the generated tokens') and top ones.
        i, request.sent = request.sent, request.sent + 1
        logprob = row.logprobs[len(row.logprobs) - len(row.generated) + i]
        request.emit("token", (token, logprob, row.top[i] if row.top_logprobs else None))

    def _retire(self) -> None:
        """Free the rows of requests that are done, stopped or cancelled, telling each why it ended."""
        for b, request in enumerate(self.owners):
            row = self.batch.rows[b]
            if request is None or not (row.finished or request.cancelled):
                continue
            if row.failed:
                reason = f"error: {row.failed}"
            elif request.cancelled:
                reason = "cancelled"
            else:
                reason = "stop" if row.generated[-1:] == [self.eos_id] else "length"
            self._free(b, clear=row.failed is not None)
            request.emit("end", reason)

    def _free(self, b: int, clear: bool) -> None:
        """Row b takes no more steps; its cache keeps what it holds for a later request to reuse, unless clear (its
        numbers are broken: a masked slot holding NaN still poisons an attention that reads it)."""
        row, request = self.batch.rows[b], self.owners[b]
        self.counts.update(drafted=row.drafted, accepted=row.accepted)
        self.held[b] = [] if clear else (request.ids + row.generated)[: self.cache.seq_pos[b]]
        if clear:
            self.cache.clear(b)
            self.cache.restart(b)
        self.owners[b] = self.batch.rows[b] = None

    def _fail_step(self, reason: str) -> None:
        """After a forward raised: Batch forgot it, but a row that wrapped in it may have lost positions it counts, so
        every row that was in it ends with the reason, its cache cleared; the others go on."""
        with self.lock:
            for b in self.batch.failed:
                request = self.owners[b]
                if request is not None:
                    self._free(b, clear=True)
                    request.emit("end", reason)

    def _admit(self) -> None:
        while self.waiting and None in self.owners:
            request = self.waiting.popleft()
            if request.cancelled:
                request.emit("end", "cancelled")
                continue
            b, kept = self._row_for(request)
            try:
                seed = request.seed if request.seed is not None else int(torch.randint(2**62, ()).item())
                generator = torch.Generator(device=self.model.device).manual_seed(seed)
                row = Row(request.ids[kept:], request.max_tokens, self.eos_id, request.sampling, generator,
                          request.top_logprobs, request.score_prompt, speculate=self.speculate)
            except Exception as e:  # nothing of this request's may stop the loop that serves the others
                request.emit("end", f"error: {type(e).__name__}: {e}")
                continue
            if kept < self.cache.seq_pos[b]:
                if self.cache.can_rewind(b):
                    self.cache.rewind(b, kept)
                else:
                    self.cache.restart(b)  # a new sequence: no slot is read before it is written again
            request.cached, request.row = kept, row
            self.batch.rows[b], self.owners[b] = row, request
            self.used[b] = next(_ids)
            self.counts["requests"] += 1

    def _row_for(self, request: Request) -> tuple[int, int]:
        """(the free row to use, how many of the request's first ids it holds and can keep): the row that keeps the
        most, where that is worth a row (MIN_REUSE ids, or all it holds); else an empty row; else the one least recently
        used (whose ids a later request is least likely to want)."""
        ids, best, best_key = request.ids, None, None
        for b in (b for b, owner in enumerate(self.owners) if owner is None):
            held, kept = self.held[b], 0
            limit = 0 if request.score_prompt else min(len(held), len(ids) - 1)  # at least one id is fed
            while kept < limit and held[kept] == ids[kept]:
                kept += 1
            if kept < self.cache.seq_pos[b] and not self.cache.can_rewind(b):
                kept = 0  # it wrapped: it can go on from its end, but not go back
            worth = kept if kept >= MIN_REUSE or kept == len(held) else 0
            key = (worth, not held, -self.used[b])
            if best_key is None or key > best_key:
                best, best_key = (b, worth), key
        return best
