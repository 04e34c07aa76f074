"""A conversation kept in the rolling cache: each turn pre-fills only what is new.

The ids of a conversation are what mistral_common's encode_chat_completion gives for it, with each answer as the ids
the model sampled (not its text encoded again) and the EOS that closes every assistant message. After turn k the cache
holds those ids but the last sampled token; turn k + 1 pre-fills from there: that token, the EOS, and the new user
message with its template tokens. Where the encoding of the earlier turns changes (a new system prompt; v2 and v3,
which put the system prompt in the last user message, move it at every turn), the cache is cut back to the first id
that differs, as long as it has not wrapped around its window; otherwise the whole conversation is pre-filled again.
Either way the ids in the cache are exactly the conversation's, so the logits are those of a fresh forward over it.
An answer of tool calls is the one kind kept as mistral_common encodes it (with the calls' ids, which the model need
not have written), so the turn that gives their results pre-fills from the first id where the two differ.

With a sliding window the conversation goes on for as long as it likes. Without one, every id stays in the cache, so
a conversation is bounded (`context`): when the next turn would not fit, the oldest turns are dropped, down to about
half the limit. Dropping a turn moves every position after it, so what is kept is pre-filled again whole; dropping down
to half makes that refill come once every many turns, rather than at every turn once the limit is reached.

A turn pre-fills its new ids PREFILL_CHUNK at a time unless chunk_size says otherwise, so that a long pasted message
needs no more memory than a short one. A turn that fails (an exception other than Ctrl-C) is forgotten: the cache goes
back to where it was before it, or, where the turn overwrote slots of earlier positions, starts over and the next turn
pre-fills the whole conversation; the exception propagates.
"""
import collections
import logging
import time
from dataclasses import dataclass

import torch

from mistral.cache import RotatingBufferCache
from mistral.errors import MistralError
from mistral.generate import PREFILL_CHUNK, check_speculate, generate_ids
from mistral.model import Transformer
from mistral.sampling import SamplingParams, check_options
from mistral.tokenizer import Tokenizer
from mistral.tools import check_tools, openai_call, read_calls

log = logging.getLogger(__name__)

# Tokens a conversation may hold without a sliding window, unless the caller says otherwise.
DEFAULT_CONTEXT = 32768


def conversation_limit(window: int | None, max_tokens: int, context: int | None) -> int | None:
    """The most ids a conversation holds, for a model whose sliding window is `window` (None: no limit, with a window),
    after checking max_tokens and context against it: what a Chat refuses, and the chat command before loading."""
    if max_tokens < 1:
        raise MistralError(f"a chat answers: max_tokens must be at least 1, got {max_tokens}")
    if context is not None and (not isinstance(context, int) or isinstance(context, bool) or context <= 0):
        raise MistralError(f"context must be a positive number of tokens, got {context!r}")
    if context is not None and window is not None:
        raise MistralError(f"this model has a sliding window of {window} tokens, so its conversations have no "
                           "length limit: leave out --context")
    if window is not None:
        return None
    limit = context or DEFAULT_CONTEXT
    if max_tokens >= limit:
        raise MistralError(f"--max_tokens {max_tokens} leaves no room for a message in a conversation of at most "
                           f"{limit} tokens (--context): lower --max_tokens, or raise --context")
    return limit


@dataclass
class Turn:
    """What one answer took: the new ids pre-filled, and the tokens after the first, each a decode step."""

    answer: list[int]  # the sampled ids, without a final EOS
    prefilled: int
    prefill_s: float  # to the first token
    decoded: int
    decode_s: float
    context: int  # ids the conversation holds now, the answer and its EOS included
    stopped: bool = False  # by Ctrl-C: the answer is what was sampled until then (nothing, during pre-fill)
    calls: list[dict] | None = None  # an answer of tool calls: {"id", "name", "arguments"} each, awaiting results
    drafts: collections.Counter | None = None  # speculating: the draft tokens fed ("drafted") and kept ("accepted")

    def stats(self) -> str:
        line = (f"prefill {self.prefilled} tokens in {self.prefill_s:.2f} s "
                f"({self.prefilled / max(self.prefill_s, 1e-9):,.1f} tokens/s), decode {self.decoded} tokens in "
                f"{self.decode_s:.2f} s ({self.decoded / max(self.decode_s, 1e-9):,.1f} tokens/s), "
                f"context {self.context} tokens")
        return line + (f", {drafts_kept(self.drafts)}" if self.drafts is not None else "")


def drafts_kept(counts: collections.Counter) -> str:
    """How speculation went, for a stats line: "drafts kept 57 of 100 tokens (57%)"."""
    drafted, accepted = counts["drafted"], counts["accepted"]
    return f"drafts kept {accepted} of {drafted} tokens ({accepted / max(drafted, 1):.0%})"


def user(text: str) -> list[dict]:
    """A turn as it starts: the user's message."""
    return [{"role": "user", "content": text}]


class Chat:
    """One conversation with a model, its turns in row 0 of a cache of its own.

    A turn is the messages from one user message to the next: the user's, then the model's answer, as the ids it
    sampled ({"role": "assistant", "ids": [...]}); or, where the model was offered tools and called some, its calls
    (an OpenAI assistant message with tool_calls), a tool message with each one's result (result()), and the answer
    that follows."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, max_tokens: int,
                 temperature: float = SamplingParams.temperature, top_p: float = SamplingParams.top_p,
                 top_k: int = SamplingParams.top_k, chunk_size: int | None = PREFILL_CHUNK,
                 generator: torch.Generator | None = None, context: int | None = None,
                 tools: list[dict] | None = None, speculate: int = 0):
        """chunk_size: the most tokens a turn pre-fills in one step (None: a turn's new ids in one step, whatever
        their number). context: the most ids a conversation holds, for a model without a sliding window (None:
        DEFAULT_CONTEXT). tools: OpenAI's tool list, offered to the model at every turn (None: none). speculate: draft
        tokens verified at once (mistral/speculate.py; 0: none), drafted from the whole conversation."""
        check_speculate(speculate)
        check_options(max_tokens, temperature, top_p, top_k, chunk_size)
        if tools and tokenizer.tools_refusal:
            raise MistralError(tokenizer.tools_refusal)
        self.model, self.tokenizer = model, tokenizer
        self.tools = check_tools(tools) if tools else None
        self.options = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            chunk_size=chunk_size, generator=generator, speculate=speculate)
        self.limit = conversation_limit(model.args.window, max_tokens, context)  # None: no limit
        self.system: str | None = None
        self.turns: list[list[dict]] = []  # oldest first
        self.fed: list[int] = []  # the ids whose keys and values the cache holds, in order
        self.cache: RotatingBufferCache | None = None
        self.context = 0  # ids of the conversation so far, each answer's EOS included

    def reset(self) -> None:
        """Start over: no turns; the system prompt stays. (The cache is cut back at the next turn.)"""
        self.turns, self.context = [], 0

    @property
    def pending(self) -> list[dict]:
        """The model's last calls that have no result yet, in order."""
        calls, answered = [], set()
        for m in self.turns[-1] if self.turns else []:
            if m["role"] == "assistant":
                calls, answered = m.get("tool_calls", []), set()
            elif m["role"] == "tool":
                answered.add(m["tool_call_id"])
        return [c for c in calls if c["id"] not in answered]

    def messages(self, turns: list[list[dict]]) -> tuple[list[dict], list[list[int]]]:
        """The conversation of `turns` as encode_chat takes it: its messages, and the ids of its answers."""
        out = [{"role": "system", "content": self.system}] if self.system else []
        answers = []
        for turn in turns:
            for m in turn:
                if "ids" in m:  # the content only stands in for the ids (encode_chat's answer_ids), but is not empty
                    out.append({"role": "assistant", "content": "-"})
                    answers.append(m["ids"])
                else:
                    out.append(m)
        return out, answers

    def ids(self, turns: list[list[dict]]) -> list[int]:
        """The ids of the conversation of `turns`, the last one waiting for its answer."""
        messages, answers = self.messages(turns)
        return self.tokenizer.encode_chat(messages, answers, tools=self.tools)

    def say(self, text: str, on_token=None) -> Turn:
        """Answer the user's `text`, streaming each sampled id to on_token(id). Ctrl-C stops the answer: what was
        sampled is kept as the answer (closed by EOS at the next turn, as any answer), and a turn stopped before its
        first token is forgotten. So is a turn that raises anything else, which propagates: the next turn goes on from
        the conversation before it (turns dropped to fit the limit stay dropped)."""
        if self.pending:
            raise MistralError(f"the model called {_names(self.pending)}: give each call its result first (/result "
                               "JSON), or start over (/reset)")
        return self._answer(self.turns + [user(text)], on_token)

    def result(self, content: str, on_token=None) -> Turn | None:
        """The result of the first call still waiting for one; once every call has its result, the model answers
        (as say() does), else None."""
        pending = self.pending
        if not pending:
            raise MistralError("there is no tool call waiting for a result")
        tool = {"role": "tool", "tool_call_id": pending[0]["id"], "content": content}
        turns = self.turns[:-1] + [self.turns[-1] + [tool]]
        if len(pending) > 1:
            self.turns = turns
            return None
        return self._answer(turns, on_token)

    def _answer(self, turns: list[list[dict]], on_token) -> Turn:
        """Answer the last message of `turns`, which become the conversation's once the answer is taken."""
        turns, target = self._fit(turns)
        max_tokens = self.options["max_tokens"]
        kept = 0  # how much of the cache is the start of target
        while kept < min(len(target), len(self.fed)) and target[kept] == self.fed[kept]:
            kept += 1
        self._make_room(len(target) + max(max_tokens - 1, 0))
        if kept < len(self.fed):
            if not self.cache.can_rewind(0):
                kept = 0
                self.cache.reset()
            self.cache.rewind(0, kept)
            self.fed = self.fed[:kept]
        new = target[kept:]

        sampled, times = [], []

        def took(row: int, token: int) -> None:
            times.append(time.perf_counter())
            sampled.append(token)
            if on_token is not None:
                on_token(token)

        start, stopped = time.perf_counter(), False
        drafts = collections.Counter() if self.options["speculate"] else None
        try:
            generate_ids([new], self.model, eos_id=self.tokenizer.eos_id, on_token=took, cache=self.cache,
                         history=[target[:kept]], counts=drafts, **self.options)
        except KeyboardInterrupt:
            stopped = True
        except BaseException:
            self._forget(len(target) + len(sampled))
            raise
        end = time.perf_counter()
        n_cached = self.cache.seq_pos[0]
        if stopped and not sampled:
            # Stopped in pre-fill: the chunk under way may have overwritten slots of the positions before it, unless
            # the whole turn fits without wrapping.
            self.fed = target[:n_cached] if len(target) <= self.cache.slots else []
            if not self.fed:
                self.cache.reset()
            return Turn([], n_cached - kept, end - start, 0, 0.0, self.context, stopped=True, drafts=drafts)
        # Every sampled id but the last went through the model (a decode step stopped midway wrote only its own slot;
        # Ctrl-C between a verified draft and its taking back leaves the draft's positions, taken back here).
        if stopped and n_cached > len(target) + len(sampled) - 1:
            n_cached = len(target) + len(sampled) - 1
            self.cache.rewind(0, n_cached)
        assert n_cached == len(target) + len(sampled) - 1 or stopped, (n_cached, len(target), len(sampled))
        self.fed = (target + sampled)[:n_cached]
        answer = sampled[:-1] if sampled[-1] == self.tokenizer.eos_id else sampled
        calls = self._calls(answer)
        if calls:  # kept as mistral_common encodes calls (with their ids): the next turn pre-fills from there
            said = {"role": "assistant", "tool_calls": [openai_call(c) for c in calls]}
        else:
            said = {"role": "assistant", "ids": answer}
        self.turns = turns[:-1] + [turns[-1] + [said]]
        self.context = len(target) + len(answer) + 1
        first = times[0] if times else end
        return Turn(answer, len(new), first - start, len(sampled) - 1, end - first, self.context, stopped=stopped,
                    calls=calls, drafts=drafts)

    def _calls(self, answer: list[int]) -> list[dict] | None:
        """The calls of an answer that starts with [TOOL_CALLS] and a JSON list of them, where tools were offered."""
        if not self.tools or answer[:1] != [self.tokenizer.tool_calls_id]:
            return None
        read = read_calls(self.tokenizer.decode(answer[1:]))
        return read[0] if read else None

    def _forget(self, reached: int) -> None:
        """Back to the cache before a turn that raised, whose steps fed positions up to `reached` (not included).
        generate_ids counted only the steps that completed, but those wrote the turn's keys: the cache is rewound to
        the ids it held before the turn (self.fed), unless a step reached past its slots, which then held earlier
        positions of the conversation: then it starts over, and the next turn pre-fills the whole conversation."""
        if reached <= self.cache.slots:
            self.cache.rewind(0, len(self.fed))
        else:
            self.fed = []
            self.cache.reset()

    def _fit(self, turns: list[list[dict]]) -> tuple[list[list[dict]], list[int]]:
        """The turns kept and their ids, the last one waiting for its answer. Where they would not fit the limit with
        the longest answer, the oldest turns are dropped, as few as leave the ids at most half the limit (all but the
        last if none does)."""
        target = self.ids(turns)
        budget = None if self.limit is None else self.limit - self.options["max_tokens"] - 1  # the longest answer, EOS
        if budget is None or len(target) <= budget:
            return turns, target
        # Dropping the first turn moves the positions of every later one, so the kept ones are pre-filled again whole.
        # Keeping at most half the limit puts the next such refill as many tokens of conversation away.
        goal = min(budget, self.limit // 2)
        lo, hi = 1, len(turns) - 1  # the fewest turns to drop is in lo..hi (hi: all but the last); fewer ids for more
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self.ids(turns[mid:])) <= goal:
                hi = mid
            else:
                lo = mid + 1
        kept = turns[lo:]
        target = self.ids(kept)
        if len(target) > budget:
            raise MistralError(f"this message is {len(target)} tokens with the template, and with max_tokens "
                               f"{self.options['max_tokens']} it would not fit the conversation's limit of "
                               f"{self.limit} tokens (the model has no sliding window): send less, or raise context")
        dropped = len(turns) - len(kept)
        self.turns = self.turns[dropped:]  # they stay dropped, whatever becomes of this turn
        log.warning("[the conversation would pass its limit of %d tokens (the model has no sliding window): dropped "
                    "the oldest %d turn%s, %d tokens remain with this message, pre-filled again]", self.limit, dropped,
                    "s" * (dropped != 1), len(target))
        return kept, target

    def _make_room(self, reach: int) -> None:
        """A cache with slots for `reach` positions, or the window's worth: grown in doublings, up to that."""
        args = self.model.args
        spare = self.options["speculate"] if args.narrowest else 0  # where rows wrap: slots for drafts taken back
        most = args.window + spare if args.window else self.limit
        if self.cache is None:
            self.cache = RotatingBufferCache(self.model.n_local_layers, 1, min(max(reach, 256), most), args.n_kv_heads,
                                             args.head_dim, device=self.model.device, dtype=self.model.dtype,
                                             windows=self.model.layer_windows, spare=spare)
        elif self.cache.slots < min(reach, most):
            if not self.cache.can_rewind(0):  # cannot happen: a row wraps only once its cache has the window's slots
                raise AssertionError((self.cache.slots, self.cache.seq_pos))
            self.cache.grow(min(max(reach, 2 * self.cache.slots), most))


def _names(calls: list[dict]) -> str:
    return ", ".join(f"{c['function']['name']} ({c['id']})" for c in calls)
