"""OpenAI's chat-completions and completions protocol: a request's JSON checked and turned into engine requests, and
what the engine gives back turned into OpenAI's response shapes. mistral/server.py serves them over HTTP.

Every field is checked, and a wrong one is refused (ApiError: 400, naming it). A field that would change the answer
but is not supported here is refused too, never ignored; the few that change nothing (user, metadata, ...) are taken.
"""
import json
import math
import time
import uuid
from dataclasses import dataclass, field

from mistral import tools as tool_calls
from mistral.errors import MistralError
from mistral.sampling import SamplingParams
from mistral.tokenizer import Tokenizer

MAX_STOPS = 4
MAX_TOP_LOGPROBS = 20
MAX_N = 16
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions; a chat goes on to EOS (or the cap)
# Fields that change nothing here, taken and left aside.
INERT = {"user", "metadata", "store", "service_tier", "model"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def parse_json(raw: bytes) -> dict:
    """The body as a JSON object; 400 for what is not one: bad syntax, NaN or Infinity, lone surrogates, nesting too
    deep for Python's parser."""
    def no_constant(name: str):
        raise ApiError(400, f"the body holds {name}, which is not JSON: send numbers as numbers")

    try:
        body = json.loads(raw, parse_constant=no_constant)
    except RecursionError:
        raise ApiError(400, "the body is nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise ApiError(400, f"the body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(body).__name__}")
    try:
        _check_text(body)
    except RecursionError:
        raise ApiError(400, "the body is nested too deeply") from None
    return body


def _check_text(value) -> None:
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            raise ApiError(400, "the body holds a lone surrogate (\\ud800-\\udfff alone is not text)") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(k)
            _check_text(v)
    elif isinstance(value, list):
        for v in value:
            _check_text(v)


@dataclass
class Job:
    """What one request asks: prompts (ids), each completed n times, and how."""

    chat: bool
    prompts: list[list[int]]
    max_tokens: int
    sampling: SamplingParams
    n: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: none; chat: top_logprobs (0 for the token's own only); completions: logprobs
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    tools: bool = False  # answers that start with [TOOL_CALLS] are read as tool calls
    forced: list[int] = field(default_factory=list)  # the ids that end each prompt, an answer's forced start
    id: str = ""
    created: int = 0


class Fields:
    """A request's fields, taken one by one with their checks; what is left at the end was not understood."""

    def __init__(self, body: dict):
        self.body, self.left = body, set(body) - INERT

    def get(self, name: str, kinds: tuple, default=None, what: str = ""):
        self.left.discard(name)
        value = self.body.get(name)
        if value is None:
            return default
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            raise ApiError(400, f"{name} must be {what or ' or '.join(k.__name__ for k in kinds)}, got {value!r}",
                           name)
        return value

    def refuse(self, name: str, fine, why: str) -> None:
        """A field whose only accepted values are those that change nothing (`fine(value)`)."""
        self.left.discard(name)
        if name in self.body and self.body[name] is not None and not fine(self.body[name]):
            raise ApiError(400, f"{name} is not supported: {why}", name)

    def done(self) -> None:
        if self.left:
            raise ApiError(400, f"unknown or unsupported field{'s' * (len(self.left) > 1)}: "
                                f"{', '.join(sorted(self.left))}", sorted(self.left)[0])


def parse(body: dict, tokenizer: Tokenizer, chat: bool, cap: int, room) -> Job:
    """The Job a request asks for, every field checked; room(n_ids): the most tokens a prompt of n_ids can be
    followed by (None: no limit, the model has a sliding window); cap: the most a request may ask for."""
    f = Fields(body)
    f.refuse("functions", lambda v: v == [], "it is OpenAI's old form of tools: send tools")
    f.refuse("function_call", lambda v: v == "none", "it is OpenAI's old form of tool_choice: send tool_choice")
    f.refuse("response_format", lambda v: v == {"type": "text"}, "only {\"type\": \"text\"} is")
    f.refuse("logit_bias", lambda v: v == {}, "logit_bias changes no logit here")
    f.refuse("frequency_penalty", lambda v: v == 0, "only 0 is")
    f.refuse("presence_penalty", lambda v: v == 0, "only 0 is")
    f.refuse("best_of", lambda v: v == 1, "only 1 is (n gives several answers)")
    suffix = None if chat else f.get("suffix", (str,), "", "a string") or None  # chat: an unknown field
    offered, choice = _tools(f, tokenizer) if chat else (None, None)
    forced = []
    if chat:
        prompts = [tokenizer_chat(tokenizer, f.get("messages", (list,), what="a list of messages"), offered)]
        start = tool_calls.forced_text(choice)
        if start is not None:  # the answer starts with [TOOL_CALLS] (and the name): its first ids end the prompt
            forced = [tokenizer.tool_calls_id, *(tokenizer.encode(start, bos=False) if start else [])]
            prompts = [p + forced for p in prompts]
    elif suffix is not None:
        prompts = fim_ids(f.get("prompt", (str, list), "", "text, or a list of texts"), suffix, tokenizer)
    else:
        prompts = prompt_ids(f.get("prompt", (str, list), what="a string, a list of strings, or token ids"),
                             tokenizer)
    number = (int, float)
    temperature = f.get("temperature", number, 1.0, "a number >= 0")
    top_p = f.get("top_p", number, 1.0, "a number in (0, 1]")
    top_k = f.get("top_k", (int,), 0, "a whole number (0 or -1 turn it off)")
    top_k = 0 if top_k == -1 else top_k
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ApiError(400, f"temperature must be a number >= 0, got {temperature!r}", "temperature")
    if not 0 < top_p <= 1:
        raise ApiError(400, f"top_p must be in (0, 1], got {top_p!r}", "top_p")
    if top_k < 0:
        raise ApiError(400, f"top_k must be >= 0 (0 or -1 turn it off), got {top_k!r}", "top_k")
    job = Job(chat, prompts, 0, SamplingParams(float(temperature), float(top_p), top_k))
    job.tools, job.forced = bool(offered) and choice != "none", forced
    job.n = f.get("n", (int,), 1, "a whole number")
    if not 1 <= job.n <= MAX_N:
        raise ApiError(400, f"n must be from 1 to {MAX_N}, got {job.n}", "n")
    job.seed = f.get("seed", (int,), None, "a whole number")
    if job.seed is not None and not 0 <= job.seed < 2**63:
        raise ApiError(400, f"seed must be from 0 to 2**63 - 1, got {job.seed}", "seed")
    stop = f.get("stop", (str, list), [], "a string or a list of up to 4 strings")
    job.stop = [stop] if isinstance(stop, str) else stop
    if len(job.stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in job.stop):
        raise ApiError(400, f"stop must be a non-empty string or a list of up to {MAX_STOPS}, got {stop!r}", "stop")
    job.logprobs = _logprobs(f, chat)
    job.stream = f.get("stream", (bool,), False, "true or false")
    options = f.get("stream_options", (dict,), None, "an object")
    if options is not None:
        if not job.stream:
            raise ApiError(400, "stream_options is only for stream: true", "stream_options")
        if set(options) - {"include_usage"} or not isinstance(options.get("include_usage", False), bool):
            raise ApiError(400, f"stream_options takes include_usage (true or false), got {options!r}",
                           "stream_options")
        job.include_usage = options.get("include_usage", False)
    if not chat:
        job.echo = f.get("echo", (bool,), False, "true or false")
        if job.echo and suffix is not None:
            raise ApiError(400, "echo is not supported with suffix: the prompt of a fill-in-the-middle request is "
                                "the suffix and then the prefix", "echo")
    job.max_tokens = _max_tokens(f, chat, cap, room, prompts)
    f.done()
    job.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    job.created = int(time.time())
    return job


def _tools(f: Fields, tokenizer: Tokenizer) -> tuple[list[dict] | None, str | dict | None]:
    """A chat's tools and tool_choice, checked: the tools offered (None: none) and the choice."""
    offered = f.get("tools", (list,), None, "a list of tools") or None
    choice = f.get("tool_choice", (str, dict), None, '"none", "auto", "required" or {"type": "function", ...}')
    if f.get("parallel_tool_calls", (bool,), True, "true or false") is False:
        raise ApiError(400, "parallel_tool_calls is not supported: false is not, as a Mistral model may answer with "
                            "several calls at once", "parallel_tool_calls")
    if offered is not None:
        if tokenizer.tools_refusal:
            raise ApiError(400, tokenizer.tools_refusal, "tools")
        try:
            tool_calls.check_tools(offered)
        except MistralError as e:
            raise ApiError(400, str(e), "tools") from None
    names = [t["function"]["name"] for t in offered or []]
    if isinstance(choice, dict):
        name = choice.get("function", {}).get("name") if isinstance(choice.get("function"), dict) else None
        if choice.get("type") != "function" or set(choice) != {"type", "function"} or not isinstance(name, str):
            raise ApiError(400, f'tool_choice must be "none", "auto", "required" or {{"type": "function", '
                                f'"function": {{"name": ...}}}}, got {choice!r}', "tool_choice")
        if name not in names:
            raise ApiError(400, f"tool_choice names {name!r}, which is not among the tools"
                                + (f" ({', '.join(names)})" if names else " (none were sent)"), "tool_choice")
    elif choice not in (None, "none", "auto", "required"):
        raise ApiError(400, f'tool_choice must be "none", "auto", "required" or {{"type": "function", "function": '
                            f'{{"name": ...}}}}, got {choice!r}', "tool_choice")
    elif choice == "required" and not offered:
        raise ApiError(400, 'tool_choice "required" needs tools', "tool_choice")
    return offered, choice


def _logprobs(f: Fields, chat: bool) -> int | None:
    if chat:
        wanted = f.get("logprobs", (bool,), False, "true or false")
        top = f.get("top_logprobs", (int,), None, "a whole number")
        if top is not None and not wanted:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
            raise ApiError(400, f"top_logprobs must be from 0 to {MAX_TOP_LOGPROBS}, got {top}", "top_logprobs")
        return (top or 0) if wanted else None
    top = f.get("logprobs", (int,), None, "a whole number")
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"logprobs must be from 0 to {MAX_TOP_LOGPROBS}, got {top}", "logprobs")
    return top


def _max_tokens(f: Fields, chat: bool, cap: int, room, prompts: list[list[int]]) -> int:
    asked = f.get("max_completion_tokens", (int,), None, "a whole number")
    other = f.get("max_tokens", (int,), None, "a whole number")
    if asked is not None and other is not None and asked != other:
        raise ApiError(400, f"max_tokens ({other}) and max_completion_tokens ({asked}) differ: give one",
                       "max_tokens")
    asked = other if asked is None else asked
    name = "max_tokens"
    longest = max(map(len, prompts))
    fits = room(longest)
    if asked is None:
        default = cap if chat else min(COMPLETIONS_MAX_TOKENS, cap)
        asked = default if fits is None else min(default, fits)
        if asked < 1:
            raise ApiError(400, f"the prompt is {longest} tokens, which leaves no room for an answer in the "
                                f"{longest + fits - 1} positions a request may hold here: send less", "messages"
                           if chat else "prompt")
        return asked
    if asked < 1:
        raise ApiError(400, f"{name} must be at least 1, got {asked}", name)
    if asked > cap:
        raise ApiError(400, f"{name} is {asked}, over this server's cap of {cap} (its --max_tokens)", name)
    if fits is not None and asked > fits:
        raise ApiError(400, f"the prompt is {longest} tokens and {name} {asked}: {longest + asked - 1} positions, "
                            f"more than the {longest + fits - 1} a request may hold here (the model has no sliding "
                            f"window; the server's --context): send less, or lower {name}", name)
    return asked


def tokenizer_chat(tokenizer: Tokenizer, messages, tools: list[dict] | None = None) -> list[int]:
    """A chat's ids, as the chat command's: the tokenizer's encode_chat (mistral_common's encode_chat_completion)."""
    if not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    fields = {"system": {"content"}, "user": {"content"}, "assistant": {"content", "tool_calls"},
              "tool": {"content", "tool_call_id", "name"}}
    plain = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object, got {m!r}", "messages")
        role = m.get("role")
        if role not in fields:
            raise ApiError(400, f"messages[{i}].role must be system, user, assistant or tool, got {role!r}",
                           "messages")
        extra = set(m) - fields[role] - {"role"}
        if extra:
            raise ApiError(400, f"messages[{i}] ({role}) has fields that are not supported: "
                                f"{', '.join(sorted(extra))}", "messages")
        message = {k: v for k, v in m.items() if v is not None}
        if "content" in message:
            message["content"] = _text(message["content"], i)
        if role == "assistant" and "tool_calls" in message:
            if tokenizer.tools_refusal:
                raise ApiError(400, f"messages[{i}] has tool_calls, but {tokenizer.tools_refusal}", "messages")
            if not message.get("content"):
                message.pop("content", None)
        plain.append(message)
    try:
        return tokenizer.encode_chat(plain, tools=tools)
    except MistralError as e:
        raise ApiError(400, str(e), "messages") from None


def _text(content, i: int) -> str:
    """A message's content as text: a string, or a list of text parts joined by newlines."""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{i}].content parts must be {{\"type\": \"text\", \"text\": ...}}, "
                                    f"got {part!r}", "messages")
            texts.append(part["text"])
        content = "\n".join(texts)
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", "messages")
    return content


def fim_ids(prompt, suffix: str, tokenizer: Tokenizer) -> list[list[int]]:
    """A completion's prompts with a suffix, as fill-in-the-middle requests: each prompt, text, is the prefix."""
    if not tokenizer.fim:
        raise ApiError(400, f"suffix (fill-in-the-middle) needs a tokenizer with [PREFIX] and [SUFFIX] tokens (v3 and "
                            f"later, or tekken: Codestral's); this model's is {tokenizer.version}", "suffix")
    texts = prompt if isinstance(prompt, list) else [prompt]
    if not texts or not all(isinstance(p, str) for p in texts):
        raise ApiError(400, "with suffix, prompt must be text (a string or a list of strings): what comes before the "
                            "gap", "prompt")
    return [tokenizer.encode_fim(p, suffix) for p in texts]


def prompt_ids(prompt, tokenizer: Tokenizer) -> list[list[int]]:
    """A completion's prompts as ids: a string, a list of strings, a list of ids, or a list of lists of ids."""
    def ids(p) -> list[int]:
        if isinstance(p, str):
            if not p:
                raise ApiError(400, "a prompt must not be empty", "prompt")
            return tokenizer.encode(p, bos=True)
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            bad = [t for t in p if not 0 <= t < tokenizer.n_words]
            if bad:
                raise ApiError(400, f"token id {bad[0]} is not in the vocabulary (0 to {tokenizer.n_words - 1})",
                               "prompt")
            return list(p)
        raise ApiError(400, "prompt must be a string, a list of strings, or a non-empty list of token ids",
                       "prompt")

    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        return [ids(p) for p in prompt]
    return [ids(prompt)]


class Text:
    """The text of one answer as its tokens come, and what of it may be sent: the decode of the tokens with what came
    before them (so that a word keeps its leading space), cut at the first stop string, holding back an end that may
    still become one, or a multi-byte character still incomplete."""

    def __init__(self, tokenizer: Tokenizer, before: list[int], stops: list[str]):
        self.tokenizer, self.before, self.stops = tokenizer, before[-8:], stops
        self.head = tokenizer.decode(self.before)
        self.tokens: list[int] = []
        self.text, self.sent, self.stopped = "", 0, False

    def add(self, token: int) -> None:
        if self.stopped:  # tokens of the step under way when the stop string came: not part of the answer
            return
        self.tokens.append(token)
        full = self.tokenizer.decode(self.before + self.tokens)
        self.text = full[len(self.head):] if full.startswith(self.head) else full
        cuts = [at for at in (self.text.find(stop) for stop in self.stops) if at >= 0]
        if cuts:
            self.text, self.stopped = self.text[: min(cuts)], True

    def ready(self, final: bool = False) -> str:
        """What can be sent now that was not yet (all of it if final, or once stopped)."""
        end = len(self.text)
        if not final and not self.stopped:
            while end and self.text[end - 1] == "\ufffd":
                end -= 1
            held = [k for stop in self.stops for k in range(1, len(stop)) if self.text[:end].endswith(stop[:k])]
            end -= max(held, default=0)
        out = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out


def logprob_entry(tokenizer: Tokenizer, token: int, logprob: float, top) -> dict:
    """One token of a chat answer's logprobs.content."""
    def one(t: int, lp: float) -> dict:
        raw = tokenizer.token_bytes(t)
        return {"token": raw.decode(errors="replace"), "logprob": lp, "bytes": list(raw)}

    return {**one(token, logprob), "top_logprobs": [one(t, lp) for t, lp in (top or [])]}


def usage(prompt_tokens: int, completion_tokens: int, cached: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached}}
