"""An OpenAI-compatible HTTP server: `python -m main serve [model_path]`, FastAPI routes on uvicorn, in front of the
serving engine (mistral/engine.py). mistral/api.py checks the requests and shapes the answers.

    POST /v1/chat/completions, /v1/completions   streamed (server-sent events, ending in `data: [DONE]`) or not
    GET  /v1/models                               the one model: its folder's name
    GET  /health                                  503 while the model loads, 200 once it serves
    GET  /metrics                                 Prometheus' text format
    POST /tokenize, /detokenize

With an API key every route but /health wants `Authorization: Bearer KEY`. Errors are OpenAI's
{"error": {"message", "type", "param", "code"}}, with 400, 401, 404, 413, 429 (with Retry-After) or 503; an error in
one request ends that request, and the server goes on.
"""
import asyncio
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from mistral import api, tools
from mistral.api import ApiError, Job, Text
from mistral.engine import Engine, QueueFull
from mistral.engine import Request as EngineRequest
from mistral.tokenizer import Tokenizer

log = logging.getLogger(__name__)

MAX_BODY = 4 * 2**20  # bytes of a request body: a long prompt is well under it
RETRY_AFTER_S = 1
FINISH = {"stop": "stop", "length": "length", "cancelled": "abort"}


def _error(e: ApiError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if e.status == 429 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


class Server:
    """The routes of one model: ready(engine, tokenizer) once it is loaded; until then the completion routes answer
    503."""

    def __init__(self, model_id: str, *, api_key: str | None = None, max_tokens: int = 4096,
                 max_body: int = MAX_BODY):
        self.model_id, self.api_key, self.cap, self.max_body = model_id, api_key, max_tokens, max_body
        self.engine: Engine | None = None
        self.tokenizer: Tokenizer | None = None
        self.created = int(time.time())
        self.loop: asyncio.AbstractEventLoop | None = None  # the event loop the routes run on, once one has
        self.app = self._routes()

    def ready(self, engine: Engine, tokenizer: Tokenizer) -> None:
        self.engine, self.tokenizer = engine, tokenizer
        engine.settle = self._settle

    def _settle(self, most_s: float = 0.005) -> None:
        """From the engine's thread, after a step: wait until the event loop has run what the step's tokens woke (at
        most most_s), so that sending them does not overlap the next step's kernels."""
        loop, done = self.loop, threading.Event()
        if loop is None:
            return
        try:  # the second hop runs after the callbacks the first found queued, and the tasks they woke
            loop.call_soon_threadsafe(loop.call_soon, done.set)
        except RuntimeError:  # the loop has closed
            return
        done.wait(most_s)

    async def __call__(self, scope, receive, send) -> None:
        """The ASGI app: the key and the body's declared size are checked before any route runs."""
        self.loop = asyncio.get_running_loop()
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            refusal = None
            if self.api_key is not None and scope["path"] != "/health":
                given = headers.get(b"authorization", b"")
                if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                    refusal = ApiError(401, "a valid API key is needed: Authorization: Bearer KEY",
                                       kind="authentication_error", code="invalid_api_key")
            length = headers.get(b"content-length", b"")
            if refusal is None and length.isdigit() and int(length) > self.max_body:
                refusal = ApiError(413, f"the body is {int(length)} bytes, over the limit of {self.max_body}")
            if refusal is not None:
                await _error(refusal)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _routes(self) -> FastAPI:
        app = FastAPI(title="mistral", docs_url=None, redoc_url=None, openapi_url=None)
        app.add_exception_handler(ApiError, lambda request, e: _error(e))
        app.add_exception_handler(HTTPException, lambda request, e: _error(
            ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", kind="not_found_error"
                     if e.status_code == 404 else "invalid_request_error")))

        @app.get("/health")
        async def health():
            if self.engine is None:
                return JSONResponse({"status": "loading"}, status_code=503)
            return {"status": "ok"}

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [self._model()]}

        @app.get("/v1/models/{name:path}")
        async def model(name: str):
            if name != self.model_id:
                raise ApiError(404, f"model {name!r} is not served here; this server serves {self.model_id!r}",
                               "model", code="model_not_found")
            return self._model()

        @app.get("/metrics")
        async def metrics():
            return PlainTextResponse(self._metrics(), media_type="text/plain; version=0.0.4")

        @app.post("/tokenize")
        async def tokenize(request: Request):
            body = await self._body(request)
            self._loaded()
            f = api.Fields(body)
            if "messages" in body:
                ids = api.tokenizer_chat(self.tokenizer, f.get("messages", (list,), what="a list of messages"))
            else:
                prompt = f.get("prompt", (str,), what="a string")
                if prompt is None:
                    raise ApiError(400, "tokenize takes a prompt (a string) or messages", "prompt")
                ids = self.tokenizer.encode(prompt, bos=f.get("add_special_tokens", (bool,), True, "true or false"))
            f.done()
            return {"tokens": ids, "count": len(ids), "max_model_len": self.engine.cache.slots}

        @app.post("/detokenize")
        async def detokenize(request: Request):
            body = await self._body(request)
            self._loaded()
            f = api.Fields(body)
            ids = f.get("tokens", (list,), what="a list of token ids")
            f.done()
            if ids is None or not all(isinstance(t, int) and not isinstance(t, bool)
                                      and 0 <= t < self.tokenizer.n_words for t in ids):
                raise ApiError(400, f"tokens must be a list of ids from 0 to {self.tokenizer.n_words - 1}", "tokens")
            return {"prompt": self.tokenizer.decode(ids)}

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request):
            return await self._complete(request, chat=True)

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await self._complete(request, chat=False)

        return app

    def _model(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "mistral"}

    def _loaded(self) -> None:
        if self.engine is None:
            raise ApiError(503, "the model is still loading: try again in a few seconds (GET /health says when)",
                           kind="server_error", code="loading")

    async def _body(self, request: Request) -> dict:
        """The body as a JSON object, read up to max_body bytes whatever its headers said."""
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise ApiError(413, f"the body is over the limit of {self.max_body} bytes")
            chunks.append(chunk)
        return api.parse_json(b"".join(chunks))

    async def _complete(self, request: Request, chat: bool):
        body = await self._body(request)
        self._loaded()
        name = body.get("model")
        if name is not None and name != self.model_id:
            raise ApiError(404, f"model {name!r} is not served here; this server serves {self.model_id!r}", "model",
                           code="model_not_found")
        job = api.parse(body, self.tokenizer, chat, self.cap, self.engine.room)
        run = Run(self, job)
        if job.stream:
            return StreamingResponse(run.stream(request), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return JSONResponse(await run.whole(request))

    def _metrics(self) -> str:
        load = self.engine.load() if self.engine else {"running": 0, "waiting": 0, "rows": 0}
        counts = self.engine.counts if self.engine else {}
        lines = []
        for name, kind, value, what in (
                ("requests_running", "gauge", load["running"], "Requests that hold a cache row"),
                ("requests_waiting", "gauge", load["waiting"], "Requests waiting for a row"),
                ("rows_in_use", "gauge", load["running"], "Cache rows in use"),
                ("rows", "gauge", load["rows"], "Cache rows"),
                ("requests_total", "counter", counts.get("requests", 0), "Requests that took a row"),
                ("prompt_tokens_total", "counter", counts.get("prefilled", 0), "Prompt tokens pre-filled"),
                ("generation_tokens_total", "counter", counts.get("generated", 0), "Tokens generated"),
                ("draft_tokens_total", "counter", counts.get("drafted", 0),
                 "Draft tokens verified (--speculate), by requests that ended"),
                ("draft_tokens_accepted_total", "counter", counts.get("accepted", 0), "Draft tokens kept")):
            lines += [f"# HELP mistral_{name} {what}.", f"# TYPE mistral_{name} {kind}", f"mistral_{name} {value}"]
        lines += ["# HELP mistral_time_to_first_token_seconds From a request's arrival to its first token.",
                  "# TYPE mistral_time_to_first_token_seconds summary",
                  f"mistral_time_to_first_token_seconds_sum {counts.get('ttft_sum', 0.0)}",
                  f"mistral_time_to_first_token_seconds_count {counts.get('ttft_count', 0)}"]
        return "\n".join(lines) + "\n"


class Choice:
    """One answer under way: its engine request, its text, and its logprobs so far."""

    def __init__(self, index: int, prompt: int, request: EngineRequest, text: Text):
        self.index, self.prompt, self.request, self.text = index, prompt, request, text
        self.tokens: list[tuple[int, float, list | None]] = []  # (token, logprob, top) of each one with text
        self.generated = 0
        self.finish: str | None = None
        self.error: str | None = None
        self.sent_tokens = 0  # of self.tokens, streamed with their logprobs
        self.calling = False  # the answer started with [TOOL_CALLS]: its text is held until its calls are read
        self.calls: list[dict] | None = None  # the calls read: {"id", "name", "arguments"}
        self.sent_calls = False

    def holding(self) -> bool:
        """Whether the text so far is held back: the JSON of calls not yet whole."""
        return self.calling and self.calls is None and self.finish is None

    def read_calls(self) -> None:
        """Once the held text holds a whole list of calls, they are the answer's; what follows them is its text. At
        the answer's end, text that holds none is the answer's text."""
        if self.calling and self.calls is None and (self.finish is not None or tools.may_be_whole(self.text.text)):
            read = tools.read_calls(self.text.text)
            if read is not None:
                self.calls, rest = read
                self.text.sent = len(self.text.text) - len(rest)


class Run:
    """One HTTP request's answers: its choices, each a row of the engine, and their events as they come."""

    def __init__(self, server: Server, job: Job):
        self.server, self.job, self.tokenizer = server, job, server.tokenizer
        self.queue: asyncio.Queue = asyncio.Queue()
        self.started = time.perf_counter()
        self.choices: list[Choice] = []
        loop = asyncio.get_running_loop()
        for p, ids in enumerate(job.prompts):
            for k in range(job.n):
                index = len(self.choices)
                request = EngineRequest(ids, job.max_tokens, self._emitter(loop, index), job.sampling,
                                        None if job.seed is None else job.seed + k, job.logprobs or 0,
                                        job.echo and job.logprobs is not None)
                choice = Choice(index, p, request, Text(self.tokenizer, [] if job.chat else ids, job.stop))
                if job.forced:  # the answer's forced start, ending the prompt, is the start of its calls
                    choice.calling = True
                    for token in job.forced:
                        choice.text.add(token)
                self.choices.append(choice)
        engine = server.engine
        for choice in self.choices:
            try:
                engine.submit(choice.request)
            except QueueFull as e:
                self.cancel()
                if engine.stopping:
                    raise ApiError(503, "the server is stopping", kind="server_error") from None
                raise ApiError(429, f"the server is busy ({e}): try again shortly", kind="rate_limit_error",
                               code="queue_full") from None

    def _emitter(self, loop: asyncio.AbstractEventLoop, index: int) -> Callable[[str, object], None]:
        def emit(kind: str, data: object) -> None:
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, (index, kind, data))
            except RuntimeError:  # the loop has closed: the server is gone
                pass
        return emit

    def cancel(self) -> None:
        for choice in self.choices:
            if choice.finish is None:
                self.server.engine.cancel(choice.request)

    def _take(self, index: int, kind: str, data) -> Choice:
        """Apply one event of the engine to its choice."""
        choice = self.choices[index]
        if choice.finish is not None:
            return choice
        if kind == "token":
            token, logprob, top = data
            choice.generated += 1
            if token != self.tokenizer.eos_id and not choice.text.stopped:
                if choice.generated == 1 and self.job.tools and token == self.tokenizer.tool_calls_id:
                    choice.calling = True
                choice.text.add(token)
                choice.tokens.append((token, logprob, top))
                if choice.text.stopped:  # a stop string: the answer ends before it, and the row is freed
                    choice.finish = "stop"
                    self.server.engine.cancel(choice.request)
        else:
            reason = str(data)
            if reason.startswith("error: "):
                choice.finish, choice.error = "error", reason.removeprefix("error: ")
            else:
                choice.finish = FINISH[reason]
        choice.read_calls()
        if choice.calls and choice.finish == "stop":
            choice.finish = "tool_calls"
        return choice

    def _done(self) -> bool:
        return all(choice.finish is not None for choice in self.choices)

    async def whole(self, request: Request) -> dict:
        """The answer as one JSON object, once every choice is done; a client that leaves cancels its rows."""
        async def watch() -> None:  # the body has been read: what comes next is the client leaving
            while (await request.receive())["type"] != "http.disconnect":
                pass
            self.cancel()

        watcher = asyncio.create_task(watch())
        try:
            while not self._done():
                index, kind, data = await self.queue.get()
                self._take(index, kind, data)
        finally:
            watcher.cancel()
            self.cancel()
        failed = [c.error for c in self.choices if c.error]
        if failed:
            raise ApiError(500, f"the model could not answer: {failed[0]}", kind="server_error")
        self._log()
        job = self.job
        choices = []
        for c in self.choices:
            text = c.text.ready(final=True)
            if job.chat:
                logprobs = {"content": self._chat_logprobs(c, 0)} if job.logprobs is not None else None
                message = {"role": "assistant", "content": text}
                if c.calls:
                    message = {"role": "assistant", "content": text.strip() or None,
                               "tool_calls": [tools.openai_call(call) for call in c.calls]}
                choices.append({"index": c.index, "message": message, "logprobs": logprobs,
                                "finish_reason": c.finish})
            else:
                prompt_text = self.tokenizer.decode(job.prompts[c.prompt]) if job.echo else ""
                logprobs = self._completion_logprobs(c, len(prompt_text)) if job.logprobs is not None else None
                choices.append({"index": c.index, "text": prompt_text + text, "logprobs": logprobs,
                                "finish_reason": c.finish})
        return {"id": job.id, "object": "chat.completion" if job.chat else "text_completion", "created": job.created,
                "model": self.server.model_id, "choices": choices, "usage": self._usage()}

    async def stream(self, request: Request):
        """Server-sent events: a chunk per piece of text, a last one per choice with its finish_reason, the usage
        (with stream_options.include_usage), then [DONE]. A client that leaves cancels its rows."""
        job = self.job
        try:
            for c in self.choices:
                if job.chat:
                    yield self._chunk(c, {"role": "assistant", "content": ""})
                elif job.echo:
                    yield self._chunk(c, self.tokenizer.decode(job.prompts[c.prompt]))
            while not self._done():
                index, kind, data = await self.queue.get()
                c = self._take(index, kind, data)
                if c.error:
                    body = ApiError(500, f"the model could not answer: {c.error}", kind="server_error").body()
                    yield f"data: {json.dumps(body)}\n\n"
                    continue
                if c.calls and not c.sent_calls:
                    c.sent_calls = True
                    for k, call in enumerate(c.calls):
                        yield self._chunk(c, {"tool_calls": [{"index": k, **tools.openai_call(call)}]},
                                          self._stream_logprobs(c, "") if k == 0 else None)
                if c.holding():
                    continue
                text = c.text.ready(final=c.finish is not None)
                logprobs = c.sent_tokens < len(c.tokens) and job.logprobs is not None
                if text or logprobs:
                    yield self._chunk(c, {"content": text} if job.chat else text, self._stream_logprobs(c, text))
                if c.finish is not None:
                    yield self._chunk(c, {} if job.chat else "", None, c.finish)
            self._log()
            if job.include_usage:
                yield self._sse({"id": job.id, "object": self._object(), "created": job.created,
                                 "model": self.server.model_id, "choices": [], "usage": self._usage()})
            yield "data: [DONE]\n\n"
        finally:
            self.cancel()

    def _object(self) -> str:
        return "chat.completion.chunk" if self.job.chat else "text_completion"

    def _sse(self, body: dict) -> str:
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def _chunk(self, c: Choice, delta, logprobs=None, finish: str | None = None) -> str:
        choice = {"index": c.index, "delta" if self.job.chat else "text": delta, "logprobs": logprobs,
                  "finish_reason": finish}
        body = {"id": self.job.id, "object": self._object(), "created": self.job.created,
                "model": self.server.model_id, "choices": [choice]}
        if self.job.include_usage:
            body["usage"] = None
        return self._sse(body)

    def _stream_logprobs(self, c: Choice, text: str):
        if self.job.logprobs is None:
            return None
        start, c.sent_tokens = c.sent_tokens, len(c.tokens)
        if self.job.chat:
            return {"content": self._chat_logprobs(c, start)}
        return self._completion_logprobs(c, 0, start)

    def _chat_logprobs(self, c: Choice, start: int) -> list[dict]:
        return [api.logprob_entry(self.tokenizer, t, lp, top) for t, lp, top in c.tokens[start:]]

    def _completion_logprobs(self, c: Choice, offset: int, start: int = 0) -> dict:
        """OpenAI's completions logprobs: with echo, the prompt's tokens first (the first has none)."""
        tokens, lps, tops = [], [], []
        if self.job.echo and start == 0:
            ids = self.job.prompts[c.prompt]
            scored = c.request.row.logprobs[: len(ids) - 1]
            for i, t in enumerate(ids):
                tokens.append(t)
                lps.append(None if i == 0 else scored[i - 1])
                tops.append(None)
        for t, lp, top in c.tokens[start:]:
            tokens.append(t)
            lps.append(lp)
            tops.append({self._piece(u): v for u, v in top} if top else None)
        pieces = [self._piece(t) for t in tokens]
        offsets, at = [], offset if not self.job.echo else 0
        for piece in pieces:
            offsets.append(at)
            at += len(piece)
        return {"tokens": pieces, "token_logprobs": lps, "top_logprobs": tops if self.job.logprobs else None,
                "text_offset": offsets}

    def _piece(self, token: int) -> str:
        return self.tokenizer.token_bytes(token).decode(errors="replace")

    def _usage(self) -> dict:
        prompts = sum(map(len, self.job.prompts))
        cached = sum(c.request.cached for c in self.choices if c.index % self.job.n == 0)
        return api.usage(prompts, sum(c.generated for c in self.choices), cached)

    def _log(self) -> None:
        firsts = [c.request.first_token for c in self.choices if c.request.first_token is not None]
        end = time.perf_counter()
        generated = sum(c.generated for c in self.choices)
        ttft = min(firsts) - self.started if firsts else end - self.started
        rate = generated / max(end - min(firsts), 1e-9) if firsts else 0.0
        log.info("%s: %d prompt tokens (%d cached), %d generated, first token after %.2f s, %.1f tokens/s, %s",
                 self.job.id, sum(map(len, self.job.prompts)), self._usage()["prompt_tokens_details"]["cached_tokens"],
                 generated, ttft, rate, ",".join(c.finish or "?" for c in self.choices))


class Uvicorn(uvicorn.Server):
    """uvicorn's server, which on SIGINT or SIGTERM also ends what the engine runs (its answers end with
    finish_reason "abort"), and exits 0 after, instead of raising the signal again."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]):
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()
        threading.Thread(target=self.on_exit, daemon=True).start()  # not here: the handler may interrupt a lock


def run(server: Server, host: str, port: int, load: Callable[[], tuple[Engine, Tokenizer]]) -> None:
    """Serve until SIGINT or SIGTERM: the routes answer at once (/health 503) while load() runs in a thread of its
    own; what it raises ends the server and is raised here."""
    failure: list[BaseException] = []
    config = uvicorn.Config(server, host=host, port=port, log_level="info", lifespan="off",
                            timeout_graceful_shutdown=5)
    front = Uvicorn(config, on_exit=lambda: server.engine and server.engine.stop())

    def loading() -> None:
        try:
            engine, tokenizer = load()
        except BaseException as e:  # said by the caller, once the server has stopped
            failure.append(e)
            front.should_exit = True
            return
        engine.start()
        server.ready(engine, tokenizer)
        log.info("serving %s on http://%s:%d/v1 (%d rows, %d slots each)", server.model_id, host, port,
                 len(engine.owners), engine.cache.slots)

    threading.Thread(target=loading, name="loading", daemon=True).start()
    front.run()
    if server.engine is not None:
        server.engine.stop()
    if failure:
        raise failure[0]
