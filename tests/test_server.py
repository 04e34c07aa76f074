"""The OpenAI-compatible server (mistral/server.py, mistral/api.py) and its engine (mistral/engine.py), through the
official `openai` client and plain HTTP, against a tiny random model with the real v3 tokenizer.

Each answer is checked against an independent computation: one forward of the model over the prompt and the whole
answer, without any cache, whose argmax at every position must be the next greedy token and whose log-softmax must be
the logprobs the server gave."""
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import mistral_common
import openai
import pytest
import torch
import uvicorn

from helpers import ROOT, random_model, tiny_params, wait_healthy
from mistral.engine import Engine
from mistral.server import Server
from mistral.tokenizer import Tokenizer

V3 = Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"
WINDOW = 12
KEY = "sk-test"


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(V3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A server in a thread of this process, on a free port."""

    def __init__(self, model, tokenizer, rows=4, max_queue=8, api_key=KEY, slots=None, ready=True, engine=None,
                 cap=64, **options):
        """engine: one to serve instead of an Engine of the model (which is then None)."""
        self.model, self.tokenizer = model, tokenizer
        self.port = free_port()
        self.front = Server("tiny", api_key=api_key, max_tokens=cap, max_body=2**16)
        self.engine = engine or Engine(model, tokenizer.eos_id, rows=rows, slots=slots or model.args.sliding_window,
                                       max_queue=max_queue, **options)
        if ready:
            self.engine.start()
            self.front.ready(self.engine, tokenizer)
        self.uvicorn = uvicorn.Server(uvicorn.Config(self.front, port=self.port, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        while not self.uvicorn.started:
            time.sleep(0.01)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=api_key or "none",
                                    max_retries=0, timeout=60)

    def http(self, method, path, body=None, headers=None, raw=None):
        """(status, parsed JSON or text, headers) of one plain request."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        data = raw if raw is not None else (json.dumps(body) if body is not None else None)
        conn.request(method, path, body=data, headers={"Authorization": f"Bearer {KEY}", **(headers or {})})
        response = conn.getresponse()
        text = response.read().decode()
        try:
            text = json.loads(text)
        except ValueError:
            pass
        return response.status, text, {k.lower(): v for k, v in response.getheaders()}

    def metric(self, name):
        _, text, _ = self.http("GET", "/metrics")
        return float(next(line.split()[1] for line in text.splitlines() if line.startswith(f"mistral_{name} ")))

    def close(self):
        self.uvicorn.should_exit = True
        self.thread.join(10)
        self.engine.stop()


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_params(vocab_size=32768, sliding_window=WINDOW), seed=3)


@pytest.fixture(scope="module")
def served(model, tokenizer):
    running = Running(model, tokenizer)
    yield running
    running.close()


def at_once(*calls):
    """What each of calls returns, all of them made at the same time, each from a thread of its own."""
    results = [None] * len(calls)

    def run(i):
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def reference(model, ids: list[int], answer: list[int]) -> tuple[list[int], list[float]]:
    """Greedy tokens and the answer's logprobs from one forward over the prompt and the answer, no cache."""
    seq = ids + answer
    with torch.no_grad():
        logits = model(torch.tensor(seq), [len(seq)])  # (S, V)
    lps = torch.log_softmax(logits.double(), dim=-1)[len(ids) - 1 : len(seq) - 1]
    return lps.argmax(dim=-1).tolist(), lps.gather(1, torch.tensor(answer)[:, None]).squeeze(1).tolist()


def completion_ids(tokenizer, prompt):
    return tokenizer.encode(prompt, bos=True)


def test_chat_shapes_usage_and_greedy_answer(served, model, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    r = served.client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                              logprobs=True, top_logprobs=3)
    ids = tokenizer.encode_chat(messages)
    assert r.object == "chat.completion" and r.model == "tiny" and r.id.startswith("chatcmpl-")
    assert r.usage.prompt_tokens == len(ids) and r.usage.total_tokens == len(ids) + r.usage.completion_tokens
    choice = r.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    answer = [tokenizer.encode(e.token, bos=False) for e in choice.logprobs.content]  # only for the count
    assert len(answer) == r.usage.completion_tokens - (choice.finish_reason == "stop")
    greedy_ids = _greedy(model, ids, r.usage.completion_tokens, tokenizer.eos_id)
    assert choice.finish_reason == ("stop" if greedy_ids[-1] == tokenizer.eos_id else "length")
    text_ids = [t for t in greedy_ids if t != tokenizer.eos_id]
    assert choice.message.content == tokenizer.decode(text_ids)
    _, lps = reference(model, ids, text_ids)
    torch.testing.assert_close(torch.tensor([e.logprob for e in choice.logprobs.content]), torch.tensor(lps),
                               rtol=0, atol=1e-4)
    for e in choice.logprobs.content:  # a greedy token's logprob is the top one
        assert len(e.top_logprobs) == 3 and e.logprob == pytest.approx(e.top_logprobs[0].logprob, abs=1e-6)


def _greedy(model, ids, n, eos_id):
    """n greedy tokens after ids (fewer if EOS comes), each from a full forward without cache."""
    out = []
    for _ in range(n):
        nxt, _ = reference(model, ids + out, [0])
        out.append(nxt[-1])
        if out[-1] == eos_id:
            break
    return out


def test_completion_text_keeps_its_leading_space_and_echo(served, model, tokenizer):
    prompt = "Now is the winter of our"
    ids = completion_ids(tokenizer, prompt)
    r = served.client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, echo=True,
                                         logprobs=2)
    greedy_ids = _greedy(model, ids, 6, tokenizer.eos_id)
    text_ids = [t for t in greedy_ids if t != tokenizer.eos_id]
    assert r.choices[0].text == tokenizer.decode(ids + text_ids)  # prompt and completion decoded together
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.tokens) == len(ids) + len(text_ids)
    full, _ = reference(model, ids[:1], ids[1:] + text_ids)
    _, prompt_lps = reference(model, ids[:1], ids[1:])
    torch.testing.assert_close(torch.tensor(lp.token_logprobs[1 : len(ids)]), torch.tensor(prompt_lps), rtol=0,
                               atol=1e-4)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(greedy_ids)


def test_stream_equals_the_whole_answer(served, tokenizer):
    messages = [{"role": "user", "content": "Tell me a story about a cat"}]
    whole = served.client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    chunks = list(served.client.chat.completions.create(model="tiny", messages=messages, max_tokens=12,
                                                        temperature=0, stream=True,
                                                        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:] if c.choices)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    streamed = list(served.client.completions.create(model="tiny", prompt="To be, or not", max_tokens=8,
                                                     temperature=0, stream=True))
    alone = served.client.completions.create(model="tiny", prompt="To be, or not", max_tokens=8, temperature=0)
    assert "".join(c.choices[0].text for c in streamed) == alone.choices[0].text


def test_stop_strings_end_the_text_before_them(served):
    base = served.client.completions.create(model="tiny", prompt="ROMEO: But soft", max_tokens=20, temperature=0)
    text = base.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), text
    cut = served.client.completions.create(model="tiny", prompt="ROMEO: But soft", max_tokens=20, temperature=0,
                                           stop=[stop, "never appears here"])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = served.client.completions.create(model="tiny", prompt="ROMEO: But soft", max_tokens=20,
                                                temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text[: text.index(stop)]


def test_n_choices_and_seeds(served):
    ask = dict(model="tiny", messages=[{"role": "user", "content": "Pick a word"}], max_tokens=8, temperature=1.0,
               n=3, seed=7)
    a = served.client.chat.completions.create(**ask)
    b = served.client.chat.completions.create(**ask)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1  # each choice its own row and draw
    c = served.client.completions.create(model="tiny", prompt=["One", "Two"], max_tokens=4, temperature=0, n=2)
    assert len(c.choices) == 4 and c.usage.completion_tokens <= 16
    assert c.choices[0].text == c.choices[1].text and c.choices[2].text == c.choices[3].text


def test_staggered_clients_each_equal_to_themselves_alone(served, model, tokenizer):
    prompts = [" ".join(["word"] * k) + f" number {k}" for k in (1, 3, 9, 14, 2, 20, 5, 11)]  # around W=12 tokens
    ask = dict(model="tiny", max_tokens=40, temperature=0, logprobs=0)
    alone = [served.client.completions.create(prompt=p, **ask) for p in prompts]
    got, rows_in_use = [None] * len(prompts), []
    step = served.engine.batch.step

    def counted(*args):
        rows_in_use.append(sum(r is not None for r in served.engine.batch.rows))
        return step(*args)

    def client(i):
        time.sleep(0.005 * i)
        got[i] = served.client.completions.create(prompt=prompts[i], **ask)

    served.engine.batch.step = counted
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        del served.engine.batch.step
    assert max(rows_in_use) == 4  # the clients overlapped: every row in use, and some waited
    for p, a, g in zip(prompts, alone, got):
        assert g.choices[0].text == a.choices[0].text
        torch.testing.assert_close(torch.tensor(g.choices[0].logprobs.token_logprobs),
                                   torch.tensor(a.choices[0].logprobs.token_logprobs), rtol=0, atol=1e-5)
        ids = completion_ids(tokenizer, p)
        answer = _greedy(model, ids, 40, tokenizer.eos_id)
        _, lps = reference(model, ids, [t for t in answer if t != tokenizer.eos_id])
        torch.testing.assert_close(torch.tensor(g.choices[0].logprobs.token_logprobs[: len(lps)]), torch.tensor(lps),
                                   rtol=0, atol=1e-4)


def test_a_client_that_leaves_frees_its_row(served):
    stream = served.client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=64,
                                              temperature=0.8, stream=True)
    next(iter(stream))
    assert served.metric("requests_running") >= 1
    stream.close()
    deadline = time.time() + 5
    while served.metric("requests_running") > 0:
        assert time.time() < deadline, "the row was not freed"
        time.sleep(0.05)


def test_a_client_that_leaves_before_a_whole_answer_frees_its_row(served):
    step = served.engine.batch.step

    def slow(*args):  # 64 steps take over a second: the server notices the client has gone well before
        time.sleep(0.02)
        return step(*args)

    before = served.metric("generation_tokens_total")
    served.engine.batch.step = slow
    try:
        conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
        conn.request("POST", "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                     body=json.dumps({"prompt": "Once", "max_tokens": 64, "temperature": 0.8}))
        deadline = time.time() + 5
        while served.metric("requests_running") == 0:
            assert time.time() < deadline, "the request never ran"
            time.sleep(0.01)
        conn.sock.close()  # gone without reading the answer
        while served.metric("requests_running") > 0:
            assert time.time() < deadline + 5, "the row was not freed"
            time.sleep(0.05)
        assert served.metric("generation_tokens_total") - before < 64
    finally:
        del served.engine.batch.step


def test_prefix_reuse_equals_a_cold_prefill(model, tokenizer):
    running = Running(model, tokenizer, rows=2)
    try:
        first = [{"role": "user", "content": "Now is the winter of our discontent made glorious summer by this sun"}]
        a = running.client.chat.completions.create(model="tiny", messages=first, max_tokens=5, temperature=0)
        assert a.usage.prompt_tokens_details.cached_tokens == 0
        second = first + [{"role": "assistant", "content": a.choices[0].message.content or "-"},
                          {"role": "user", "content": "And then?"}]
        b = running.client.chat.completions.create(model="tiny", messages=second, max_tokens=5, temperature=0,
                                                   logprobs=True)
        assert b.usage.prompt_tokens_details.cached_tokens > 0
        ids = tokenizer.encode_chat(second)
        answer = [t for t in _greedy(model, ids, 5, tokenizer.eos_id) if t != tokenizer.eos_id]
        _, lps = reference(model, ids, answer)
        assert b.choices[0].message.content == tokenizer.decode(answer)
        torch.testing.assert_close(torch.tensor([e.logprob for e in b.choices[0].logprobs.content]),
                                   torch.tensor(lps), rtol=0, atol=1e-4)
    finally:
        running.close()


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "hi"}], "functions": [{"name": "f"}]}, "functions"),
    ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"5": 3}}, "logit_bias"),
    ({"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 0.5}, "frequency_penalty"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "wat": 1}, "wat"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": [{"role": "tool", "content": "hi"}]}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "seed": -1}, "seed"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}, "max_tokens"),
])
def test_bad_fields_get_400_naming_them(served, body, param):
    status, answer, _ = served.http("POST", "/v1/chat/completions", body)
    assert status == 400 and answer["error"]["param"] == param and answer["error"]["type"] == "invalid_request_error"
    assert served.http("GET", "/health")[0] == 200  # and the server goes on


@pytest.mark.parametrize("raw", [b"{", b'{"prompt": NaN}', b'{"prompt": "\\ud800"}', b"[" * 60000, b"[1]"],
                         ids=["syntax", "nan", "surrogate", "deep", "not-an-object"])
def test_malformed_json_gets_400(served, raw):
    status, answer, _ = served.http("POST", "/v1/completions", raw=raw, headers={"Content-Type": "application/json"})
    assert status == 400 and answer["error"]["message"]


def test_key_model_size_and_routes(served):
    assert served.http("GET", "/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
    status, answer, _ = served.http("POST", "/v1/completions", {"prompt": "x"}, headers={"Authorization": ""})
    assert status == 401 and answer["error"]["code"] == "invalid_api_key"
    assert served.http("GET", "/nowhere", headers={"Authorization": ""})[0] == 401  # no route is open without it
    assert served.http("GET", "/health", headers={"Authorization": ""})[0] == 200
    status, answer, _ = served.http("POST", "/v1/completions", {"model": "gpt-4", "prompt": "x"})
    assert status == 404 and answer["error"]["param"] == "model"
    assert [m.id for m in served.client.models.list().data] == ["tiny"]
    status, answer, _ = served.http("POST", "/v1/completions", {"prompt": "x" * 70000})
    assert status == 413 and answer["error"]["message"]
    status, answer, _ = served.http("POST", "/tokenize", {"prompt": "Hello"})
    assert status == 200 and served.http("POST", "/detokenize", {"tokens": answer["tokens"]})[1]["prompt"] == "Hello"
    metrics = served.http("GET", "/metrics")[1]
    for name in ("requests_running", "requests_waiting", "prompt_tokens_total", "generation_tokens_total",
                 "time_to_first_token_seconds_count", "rows_in_use"):
        assert f"mistral_{name} " in metrics


def test_a_full_queue_gets_429_and_health_503_while_loading(model, tokenizer):
    running = Running(model, tokenizer, rows=1, max_queue=0)
    try:
        stream = running.client.completions.create(model="tiny", prompt="Hi", max_tokens=64, temperature=1,
                                                   stream=True)
        next(iter(stream))
        status, answer, headers = running.http("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        assert status == 429 and headers.get("retry-after") and answer["error"]["type"] == "rate_limit_error"
        stream.close()
    finally:
        running.close()
    loading = Running(model, tokenizer, ready=False)
    try:
        assert loading.http("GET", "/health")[0] == 503
        assert loading.http("POST", "/v1/completions", {"prompt": "Hi"})[0] == 503
    finally:
        loading.close()


def test_a_model_without_a_window_refuses_what_does_not_fit(tokenizer):
    model = random_model(tiny_params(vocab_size=32768, sliding_window=None), seed=1)
    running = Running(model, tokenizer, slots=32)
    try:
        ids = completion_ids(tokenizer, "one two three four five six")
        status, answer, _ = running.http("POST", "/v1/completions", {"prompt": ids, "max_tokens": 40})
        assert status == 400 and f"{len(ids) + 39} positions" in answer["error"]["message"]
        ok = running.client.completions.create(model="tiny", prompt=ids, max_tokens=32 - len(ids) + 1, temperature=0)
        assert ok.usage.completion_tokens <= 32 - len(ids) + 1
    finally:
        running.close()


def test_a_request_with_broken_numbers_fails_alone(tokenizer):
    model = random_model(tiny_params(vocab_size=32768, sliding_window=WINDOW), seed=2)
    broken = completion_ids(tokenizer, "zebra")[-1]
    with torch.no_grad():
        model.tok_embeddings.weight[broken] = float("nan")
    running = Running(model, tokenizer)
    try:
        good = threading.Thread(target=lambda: running.client.completions.create(
            model="tiny", prompt="A fine day", max_tokens=30, temperature=0))
        good.start()
        status, answer, _ = running.http("POST", "/v1/completions", {"prompt": "zebra", "max_tokens": 5})
        good.join()
        assert status == 500 and "non-finite" in answer["error"]["message"]
        again = running.client.completions.create(model="tiny", prompt="A fine day", max_tokens=30, temperature=0)
        assert again.choices[0].text and running.http("GET", "/health")[0] == 200
    finally:
        running.close()


def test_serve_command_loads_serves_and_exits_0_on_sigterm(tmp_path):
    port = free_port()
    env = {**os.environ, "MISTRAL_API_KEY": "k"}
    proc = subprocess.Popen([sys.executable, "-m", "main", "serve", "--port", str(port), "--max_batch_size", "2"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        wait_healthy(port, proc)
        r = client.completions.create(model="assets", prompt="To be, or not to be", max_tokens=5, temperature=0)
        assert r.choices[0].text and r.model == "assets"
        stream = client.completions.create(model="assets", prompt="ROMEO:", max_tokens=4000, stream=True)
        next(iter(stream))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        log = proc.stderr.read()
        assert f"{r.id}: {r.usage.prompt_tokens} prompt tokens (0 cached), 5 generated" in log  # a line a request
    finally:
        proc.kill()
        proc.wait()


def test_serve_refuses_bad_options_in_one_line():
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        for args, pattern in ((["--port", str(busy.getsockname()[1])], "cannot listen on"),
                              (["--num_pipeline_ranks", "2"], "serve runs in one process"),
                              (["--max_batch_size", "0"], "--max_batch_size must be at least 1"),
                              (["--context", "100"], "leave out --context")):
            out = subprocess.run([sys.executable, "-m", "main", "serve", *args], cwd=ROOT, capture_output=True,
                                 text=True, timeout=120)
            assert out.returncode == 2 and out.stderr.count("\n") == 1 and pattern in out.stderr, out.stderr
    finally:
        busy.close()


def test_prefix_reuse_on_a_row_past_its_window_only_goes_forward(model, tokenizer):
    running = Running(model, tokenizer, rows=1)
    try:
        prompt = completion_ids(tokenizer, "one two three four five six seven eight nine ten eleven twelve")
        assert len(prompt) > WINDOW
        a = running.client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0)
        answer = _greedy(model, prompt, 5, tokenizer.eos_id)
        assert a.usage.completion_tokens == len(answer) == 5
        longer = prompt + answer + completion_ids(tokenizer, "and more")[1:]
        b = running.client.completions.create(model="tiny", prompt=longer, max_tokens=4, temperature=0, logprobs=0)
        # The row wrapped, but holds the last W positions of what it saw: it goes on from there.
        assert b.usage.prompt_tokens_details.cached_tokens == len(prompt) + len(answer) - 1
        want = [t for t in _greedy(model, longer, 4, tokenizer.eos_id) if t != tokenizer.eos_id]
        _, lps = reference(model, longer, want)
        torch.testing.assert_close(torch.tensor(b.choices[0].logprobs.token_logprobs[: len(lps)]),
                                   torch.tensor(lps), rtol=0, atol=1e-4)
        # One that differs early cannot go back into a wrapped row: all of it is pre-filled.
        c = running.client.completions.create(model="tiny", prompt=prompt[:5] + longer[6:], max_tokens=2,
                                              temperature=0)
        assert c.usage.prompt_tokens_details.cached_tokens == 0
    finally:
        running.close()


def test_a_completion_with_suffix_fills_in_the_middle(served, model, tokenizer):
    """suffix makes the prompt a fill-in-the-middle one, encoded by mistral_common's encode_fim (v3 has the tokens):
    the answer is the greedy middle, its text read after the prefix; streamed, the same."""
    prefix, suffix = "def add(a, b):\n    return", "\n\nprint(add(1, 2))\n"
    ids = tokenizer.encode_fim(prefix, suffix)
    r = served.client.completions.create(model="tiny", prompt=prefix, suffix=suffix, max_tokens=8, temperature=0)
    middle = [t for t in _greedy(model, ids, r.usage.completion_tokens, tokenizer.eos_id) if t != tokenizer.eos_id]
    before = tokenizer.encode(prefix)
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].text == tokenizer.decode(before + middle)[len(tokenizer.decode(before)):]
    chunks = served.client.completions.create(model="tiny", prompt=prefix, suffix=suffix, max_tokens=8,
                                              temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text


@pytest.mark.parametrize("body, param", [
    ({"prompt": [1, 2, 3], "suffix": "x"}, "prompt"),
    ({"prompt": "def f():", "suffix": "x", "echo": True}, "echo"),
    ({"prompt": "def f():", "suffix": 5}, "suffix"),
])
def test_bad_fill_in_the_middle_requests_get_400(served, body, param):
    status, answer, _ = served.http("POST", "/v1/completions", body)
    assert status == 400 and answer["error"]["param"] == param, answer
    status, answer, _ = served.http("POST", "/v1/chat/completions",
                                    {"messages": [{"role": "user", "content": "hi"}], "suffix": "x"})
    assert status == 400 and answer["error"]["param"] == "suffix"
    assert served.http("GET", "/health")[0] == 200


def test_a_tokenizer_without_fim_tokens_gets_400_for_suffix(model):
    running = Running(model, Tokenizer(V3.parent / "tokenizer.model.v1"))
    try:
        status, answer, _ = running.http("POST", "/v1/completions", {"prompt": "def f():", "suffix": "x"})
        assert status == 400 and answer["error"]["param"] == "suffix" and "[PREFIX]" in answer["error"]["message"]
        assert running.http("POST", "/v1/completions", {"prompt": "def f():", "max_tokens": 2})[0] == 200
    finally:
        running.close()


def test_a_model_with_a_window_per_layer_serves_concurrent_requests_exactly(tokenizer):
    """Layers of window 4 beside full attention: each layer's cache keeps its own slots, rows roll in the narrow
    layers, and every answer (two at once, then a conversation sent again whole) is the cache-free greedy one."""
    model = random_model(tiny_params(vocab_size=32768, sliding_window=[4, None]), seed=5)
    running = Running(model, tokenizer, rows=2, slots=64)
    try:
        assert [k.shape[2] for k in running.engine.cache.k] == [4, 64]
        asks = [[{"role": "user", "content": "Now is the winter of our discontent"}],
                [{"role": "user", "content": "To be, or not to be"}]]
        results = at_once(*(lambda m=m: running.client.chat.completions.create(
            model="tiny", messages=m, max_tokens=6, temperature=0) for m in asks))
        again = asks[0] + [{"role": "assistant", "content": results[0].choices[0].message.content or "-"},
                           {"role": "user", "content": "And then?"}]
        results.append(running.client.chat.completions.create(model="tiny", messages=again, max_tokens=6,
                                                               temperature=0))
        for messages, r in zip(asks + [again], results):
            want = _greedy(model, tokenizer.encode_chat(messages), 6, tokenizer.eos_id)
            assert r.choices[0].message.content == tokenizer.decode([t for t in want if t != tokenizer.eos_id])
    finally:
        running.close()
