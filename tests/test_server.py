"""``python -m tkpy serve``: OpenAI's completions and chat API over tkpy.runtime, through the openai
client.

A server on the built-in tiny-random model (float16, on the CPU) answers as :meth:`LLM.generate`
and :meth:`LLM.chat` answer in this process on the same seeded weights: alone, streamed, and among
other requests in its batch. Seeded sampling draws random bytes from the tiny model's byte
tokenizer, so its streams cut UTF-8 characters across tokens. Malformed requests get OpenAI's
error body and the server carries on; a client that goes away gives its KV pages back; a step that
fails is a 500. The real SmolLM2-135M-Instruct (GGUF) answers a chat as :meth:`LLM.chat` does.
"""

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from helpers import smollm2_gguf

# tkpy[serve] and the test client (a machine without them, e.g. the GPU run's, skips this file).
httpx = pytest.importorskip("httpx2")  # httpx's API: the openai client's HTTP library
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from tkpy.runtime import LLM  # noqa: E402
from tkpy.runtime.server import MAX_BODY_BYTES, build_app  # noqa: E402

MAX_SEQ_LEN = 1024  # room for a generation long enough to be left mid-stream
TINY_FLAGS = ("--model", "tiny-random", "--device", "cpu", "--dtype", "float16", "--max-seq-len", str(MAX_SEQ_LEN),
              "--max-batch-size", "4")
TIMEOUT = 60  # seconds, for any one request


class Served:
    """A server at ``port``: its process and log when it runs in a subprocess (then the port is
    the one it says it took, once :meth:`ready`)."""

    def __init__(self, port: int = None, model: str = None, proc: subprocess.Popen = None, log=None):
        self.model, self.proc, self.log = model, proc, log
        self.at(port)

    def at(self, port: int) -> None:
        self.port, self.url = port, f"http://127.0.0.1:{port}"

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-4000:]

    def ready(self, seconds: float = 180) -> "Served":
        """Wait for the server's "serving ... on http://127.0.0.1:PORT" line and a healthy
        /health (showing its output if it ends or takes too long); learn the model's name."""
        deadline = time.monotonic() + seconds
        while True:
            assert self.proc.poll() is None, f"the server exited with {self.proc.returncode}:\n{self.output()}"
            assert time.monotonic() < deadline, f"no /health within {seconds} s:\n{self.output()}"
            serving = re.search(r"serving \S+ on http://127\.0\.0\.1:(\d+)", self.output())
            if serving:
                self.at(int(serving.group(1)))
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                        break
            time.sleep(0.2)
        self.model = httpx.get(self.url + "/v1/models", timeout=TIMEOUT).json()["data"][0]["id"]
        return self

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=TIMEOUT).json()

    def client(self):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0, timeout=TIMEOUT)


@contextlib.contextmanager
def serving(log_path, *flags):
    """``python -m tkpy serve`` on a loopback port it picks (port 0; :meth:`Served.ready` waits for
    it), until the block ends: then SIGTERM, which must end it cleanly."""
    with open(log_path, "w+") as log:
        # One torch thread: the server shares this machine's cores with the tests' own model.
        proc = subprocess.Popen([sys.executable, "-m", "tkpy", "serve", *flags, "--port", "0"],
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        served = Served(proc=proc, log=log)
        try:
            yield served
        finally:
            proc.terminate()
            try:
                code = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
        assert code == 0, f"SIGTERM ended the server with {code}:\n{served.output()}"
        assert "Traceback" not in served.output(), served.output()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    with serving(tmp_path_factory.mktemp("server") / "server.log", *TINY_FLAGS) as served:
        yield served.ready()


@pytest.fixture(scope="module")
def client(tiny):
    return tiny.client()


@pytest.fixture(scope="module")
def reference():
    """The server's model in this process: the same seeded weights."""
    return LLM("tiny-random", device="cpu", dtype=torch.float16, max_batch_size=4, max_seq_len=MAX_SEQ_LEN,
               progress=False)


def wait_for(condition, what: str, seconds: float = 30):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"not within {seconds} s: {what}"
        time.sleep(0.05)


def idle(served: Served, aborted: int = None) -> bool:
    """Nothing running or waiting, every KV page free (and ``aborted`` requests aborted so far)."""
    h = served.health()
    return (h["running"] == 0 and h["waiting"] == 0 and h["kv_pages_free"] == h["kv_pages_total"]
            and (aborted is None or h["aborted"] == aborted))


def answers(client, model: str) -> bool:
    """Whether the server answers a request."""
    out = client.completions.create(model=model, prompt="Hi", max_tokens=2, temperature=0)
    return out.usage.completion_tokens == 2 and out.choices[0].finish_reason == "length"


def stream_text(chunks, chat: bool):
    """The pieces of a stream's text and its finish reason, checking the chunks' shape."""
    chunks = [c for c in chunks if c.choices]  # not the usage chunk
    if chat:
        assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
        chunks = chunks[1:]
    *middle, last = chunks
    assert all(c.choices[0].finish_reason is None for c in middle)
    assert (last.choices[0].delta.content is None) if chat else last.choices[0].text == ""
    pieces = [c.choices[0].delta.content if chat else c.choices[0].text for c in middle]
    assert all(pieces), pieces
    return pieces, last.choices[0].finish_reason


# ---- answers -------------------------------------------------------------------------------------

def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [(m.id, m.object, m.owned_by) for m in models] == [("tiny-random", "model", "tkpy")]
    assert client.models.retrieve("tiny-random").id == "tiny-random"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-5")


@pytest.mark.parametrize("prompt", ["The capital of France is", [1, 2, 3, 4, 5], ["A batch of one"]])
def test_greedy_completion_is_what_generate_gives(client, reference, tiny, prompt):
    out = client.completions.create(model=tiny.model, prompt=prompt, max_tokens=12, temperature=0)
    prompt = prompt[0] if isinstance(prompt, list) and isinstance(prompt[0], str) else prompt  # a batch of one
    expected = reference.generate(prompt, max_new_tokens=12)[0]
    assert out.object == "text_completion" and out.id.startswith("cmpl-") and out.model == tiny.model
    assert (out.choices[0].text, out.choices[0].finish_reason) == (expected.text, expected.finish_reason)
    assert out.usage.prompt_tokens == len(reference.encode(prompt))
    assert out.usage.completion_tokens == len(expected.token_ids)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_completion_max_tokens_defaults_to_16_as_openai(client, reference, tiny):
    out = client.completions.create(model=tiny.model, prompt="Hello", temperature=0)
    assert out.choices[0].text == reference.generate("Hello", max_new_tokens=16)[0].text
    assert out.usage.completion_tokens == 16


def test_greedy_chat_is_what_llm_chat_gives(client, reference, tiny):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    out = client.chat.completions.create(model=tiny.model, messages=messages, max_tokens=10, temperature=0)
    expected = reference.chat(messages, max_new_tokens=10)[0]
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert out.choices[0].message.role == "assistant"
    assert (out.choices[0].message.content, out.choices[0].finish_reason) == (expected.text, expected.finish_reason)
    assert out.usage.prompt_tokens == len(reference.chat_prompt(messages))


def test_chat_content_may_be_text_parts(client, reference, tiny):
    parts = [{"type": "text", "text": "Name"}, {"type": "text", "text": "a colour."}]
    out = client.chat.completions.create(model=tiny.model, messages=[{"role": "user", "content": parts}],
                                         max_tokens=6, temperature=0)
    expected = reference.chat([{"role": "user", "content": "Name\na colour."}], max_new_tokens=6)[0]
    assert out.choices[0].message.content == expected.text


def test_streamed_completion_joins_to_the_whole_text(client, reference, tiny):
    args = dict(model=tiny.model, prompt="Hello", max_tokens=48, temperature=1.0, seed=5)
    whole = client.completions.create(**args).choices[0]
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    pieces, finish_reason = stream_text(chunks, chat=False)
    expected = reference.generate("Hello", max_new_tokens=48, temperature=1.0, seed=5)[0]
    assert "".join(pieces) == whole.text == expected.text
    assert finish_reason == whole.finish_reason == "length"
    assert "\ufffd" in expected.text  # random bytes: characters cut across tokens...
    assert not any(p.endswith("\ufffd") for p in pieces[:-1])  # ...never sent half
    assert chunks[-1].usage.completion_tokens == 48 and not chunks[-1].choices


def test_streamed_chat_with_a_stop_string_joins_to_the_whole_text(client, reference, tiny):
    messages = [{"role": "user", "content": "Say something."}]
    args = dict(max_new_tokens=60, temperature=1.0, seed=7)
    full = reference.chat(messages, **args)[0].text
    start = next(i for i in range(20, len(full)) if "\ufffd" not in full[i:i + 2])
    stop = full[start:start + 2]
    expected = reference.chat(messages, **args, stop=stop)[0]
    assert expected.finish_reason == "stop" and expected.text == full[:full.index(stop)]

    request = dict(model=tiny.model, messages=messages, max_tokens=60, temperature=1.0, seed=7, stop=[stop])
    whole = client.chat.completions.create(**request).choices[0]
    pieces, finish_reason = stream_text(client.chat.completions.create(**request, stream=True), chat=True)
    assert "".join(pieces) == whole.message.content == expected.text
    assert finish_reason == whole.finish_reason == "stop"


def test_concurrent_requests_each_answer_as_alone(client, reference, tiny):
    # More requests than the batch holds, of different lengths: some wait, then join running ones.
    jobs = [("a", 8, 1, False), ("The quick brown fox", 40, 2, True), ("x" * 100, 25, 3, False),
            ([5, 6, 7], 60, 4, True), ("Hello there", 12, 5, False), ("1, 2, 3,", 33, 6, False)]

    def ask(prompt, max_tokens, seed, stream):
        out = client.completions.create(model=tiny.model, prompt=prompt, max_tokens=max_tokens, temperature=0.8,
                                        seed=seed, stream=stream)
        return "".join(stream_text(list(out), chat=False)[0]) if stream else out.choices[0].text

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: ask(*job), jobs))
    expected = [reference.generate(p, max_new_tokens=m, temperature=0.8, seed=s)[0].text for p, m, s, _ in jobs]
    assert answers == expected
    wait_for(lambda: idle(tiny), "every page free once the requests ended")


# ---- a client that goes away ----------------------------------------------------------------------

def test_a_client_that_leaves_mid_stream_gives_its_pages_back(tiny):
    aborted = tiny.health()["aborted"]
    body = {"model": tiny.model, "prompt": "Hello", "max_tokens": MAX_SEQ_LEN - 24, "temperature": 0, "stream": True}
    with httpx.Client(timeout=TIMEOUT) as http:
        with http.stream("POST", tiny.url + "/v1/completions", json=body) as response:
            assert response.status_code == 200
            events = (line for line in response.iter_lines() if line.startswith("data: "))
            assert json.loads(next(events)[6:])["choices"][0]["finish_reason"] is None
            next(events)
    wait_for(lambda: idle(tiny, aborted + 1), "the request aborted and its pages free")


def test_a_client_that_leaves_before_its_answer_gives_its_pages_back(tiny):
    aborted = tiny.health()["aborted"]
    body = json.dumps({"model": tiny.model, "prompt": "Hello", "max_tokens": MAX_SEQ_LEN - 24,
                       "temperature": 0}).encode()
    with socket.create_connection(("127.0.0.1", tiny.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_for(lambda: tiny.health()["running"] == 1, "the request running")
    wait_for(lambda: idle(tiny, aborted + 1), "the request aborted and its pages free")


# ---- bad requests --------------------------------------------------------------------------------

def completion(**fields):
    return {"model": "tiny-random", "prompt": "Hi", "max_tokens": 4, **fields}


def chat(**fields):
    return {"model": "tiny-random", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **fields}


C, CHAT = "/v1/completions", "/v1/chat/completions"
# (path, body: bytes as sent or an object as JSON, status, error param, error code)
BAD_REQUESTS = {
    "malformed JSON": (C, b'{"model": "tiny-random", "prompt": ', 400, None, None),
    "not UTF-8": (C, b'{"prompt": "\xff"}', 400, None, None),
    "NaN is not JSON": (C, b'{"model": "tiny-random", "prompt": "Hi", "temperature": NaN}', 400, None, None),
    "deeply nested": (C, b"[" * 100_000, 400, None, None),
    "a list body": (C, [completion()], 400, None, None),
    "a string body": (CHAT, "hello", 400, None, None),
    "no model": (C, {"prompt": "Hi"}, 400, "model", "missing_required_parameter"),
    "model not a string": (C, completion(model=3), 400, "model", None),
    "unknown model": (CHAT, chat(model="gpt-5"), 404, "model", "model_not_found"),
    "no prompt": (C, completion(prompt=None), 400, "prompt", None),
    "a batch of prompts": (C, completion(prompt=["a", "b"]), 400, "prompt", None),
    "token ids beyond the vocabulary": (C, completion(prompt=[1, 100_000]), 400, "prompt", None),
    "max_tokens a string": (C, completion(max_tokens="ten"), 400, "max_tokens", None),
    "max_tokens 0": (C, completion(max_tokens=0), 400, "max_tokens", None),
    "max_tokens a bool": (CHAT, chat(max_tokens=True), 400, "max_tokens", None),
    "max_tokens beyond max_seq_len": (C, completion(max_tokens=MAX_SEQ_LEN), 400, "max_tokens",
                                      "context_length_exceeded"),
    "a prompt of max_seq_len": (C, completion(prompt=[65] * MAX_SEQ_LEN), 400, "prompt", "context_length_exceeded"),
    "a chat of max_seq_len": (CHAT, chat(messages=[{"role": "user", "content": "x" * MAX_SEQ_LEN}], max_tokens=None),
                              400, "messages", "context_length_exceeded"),
    "temperature -1": (C, completion(temperature=-1), 400, "temperature", None),
    "temperature 3": (CHAT, chat(temperature=3), 400, "temperature", None),
    "temperature a huge integer": (C, completion(temperature=10**400), 400, "temperature", None),
    "temperature 1e400": (C, b'{"model": "tiny-random", "prompt": "Hi", "temperature": 1e400}', 400, "temperature",
                          None),
    "top_p 0": (CHAT, chat(top_p=0), 400, "top_p", None),
    "seed -1": (C, completion(seed=-1), 400, "seed", None),
    "stream a string": (C, completion(stream="yes"), 400, "stream", None),
    "five stop strings": (C, completion(stop=["a", "b", "c", "d", "e"]), 400, "stop", None),
    "an empty stop string": (CHAT, chat(stop=""), 400, "stop", None),
    "n 2": (CHAT, chat(n=2), 400, "n", None),
    "messages not a list": (CHAT, chat(messages="Hi"), 400, "messages", None),
    "no messages": (CHAT, chat(messages=[]), 400, "messages", None),
    "an unknown role": (CHAT, chat(messages=[{"role": "wizard", "content": "Hi"}]), 400, "messages", None),
    "a lone surrogate": (CHAT, chat(messages=[{"role": "user", "content": "\ud800"}]), 400, None, None),
    "content not text": (CHAT, chat(messages=[{"role": "user", "content": 3}]), 400, "messages", None),
    "an image part": (CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
                      400, "messages", None),
    "logprobs": (C, completion(logprobs=2), 400, "logprobs", "unsupported_parameter"),
    "echo": (C, completion(echo=True), 400, "echo", "unsupported_parameter"),
    "best_of 2": (C, completion(best_of=2), 400, "best_of", "unsupported_parameter"),
    "tools": (CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools",
              "unsupported_parameter"),
    "response_format": (CHAT, chat(response_format={"type": "json_object"}), 400, "response_format",
                        "unsupported_parameter"),
    "a body over the limit": (C, b" " * (MAX_BODY_BYTES + 1), 413, None, "request_too_large"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_a_bad_request_gets_an_openai_error_and_the_server_carries_on(tiny, client, case):
    path, body, status, param, code = BAD_REQUESTS[case]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(tiny.url + path, content=content, headers={"content-type": "application/json"},
                          timeout=TIMEOUT)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code), error
    assert answers(client, tiny.model)


@pytest.mark.parametrize("method, path, status", [("POST", "/v1/nothing", 404), ("GET", "/", 404),
                                                  ("GET", C, 405), ("POST", "/v1/models", 405)])
def test_unknown_routes_and_methods_get_an_openai_error(tiny, method, path, status):
    response = httpx.request(method, tiny.url + path, timeout=TIMEOUT)
    assert response.status_code == status
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_the_openai_client_raises_its_errors(client, tiny):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=tiny.model, prompt="Hi", max_tokens=MAX_SEQ_LEN)
    assert e.value.code == "context_length_exceeded" and f"{MAX_SEQ_LEN} tokens" in e.value.message
    with pytest.raises(openai.BadRequestError, match="messages\\[0\\].role"):
        client.chat.completions.create(model=tiny.model, messages=[{"role": "wizard", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=tiny.model, messages=[{"role": "user", "content": "Hi"}], n=2)
    assert e.value.param == "n"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "Hi"}])
    assert e.value.code == "model_not_found"
    assert idle(tiny)


# ---- the engine thread, in this process ------------------------------------------------------------

@pytest.fixture(scope="module")
def single():
    """A model that runs one sequence at a time."""
    return LLM("tiny-random", device="cpu", dtype=torch.float16, max_batch_size=1, max_seq_len=MAX_SEQ_LEN,
               progress=False)


@contextlib.contextmanager
def serving_in_process(llm, **kwargs):
    """:func:`build_app` under uvicorn, on a thread of this process."""
    config = uvicorn.Config(build_app(llm, "tiny", **kwargs), host="127.0.0.1", port=0, lifespan="on",
                            log_config=None)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), "uvicorn started")
        assert server.started
        yield Served(server.servers[0].sockets[0].getsockname()[1], model="tiny")
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)
    assert not thread.is_alive()


def test_a_failed_step_is_a_500_and_the_server_carries_on(single, monkeypatch):
    expected = single.generate("Hi", max_new_tokens=3)[0].text
    calls, runner = {"prefill": 0, "decode": 0}, single.runner

    def failing(name: str, failing_call: int):
        run = getattr(runner, name)

        def sometimes_failing(requests):
            calls[name] += 1
            if calls[name] == failing_call:
                raise RuntimeError("injected failure")
            return run(requests)
        return sometimes_failing

    # The first request's prefill fails; the second request's second decode step.
    monkeypatch.setattr(runner, "prefill", failing("prefill", 1))
    monkeypatch.setattr(runner, "decode", failing("decode", 2))
    with serving_in_process(single) as served:
        client = served.client()
        response = httpx.post(served.url + C, json=completion(model="tiny"), timeout=TIMEOUT)
        assert response.status_code == 500, response.text
        error = response.json()["error"]
        assert error["type"] == "server_error" and "injected failure" in error["message"]
        with pytest.raises(openai.APIError, match="injected failure"):
            list(client.completions.create(model="tiny", prompt="Hi", max_tokens=8, temperature=0, stream=True))
        assert calls == {"prefill": 2, "decode": 2}
        out = client.completions.create(model="tiny", prompt="Hi", max_tokens=3, temperature=0)
        assert out.choices[0].text == expected
        assert idle(served, aborted=0)


def test_requests_beyond_the_queue_bound_get_429(single):
    with serving_in_process(single, max_waiting=0) as served:
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": MAX_SEQ_LEN - 24, "temperature": 0, "stream": True}
        with httpx.Client(timeout=TIMEOUT) as http, http.stream("POST", served.url + C, json=body) as response:
            lines = response.iter_lines()  # held: a dropped iterator would close the response
            assert next(lines).startswith("data: ")
            with pytest.raises(openai.RateLimitError):
                served.client().completions.create(model="tiny", prompt="Hi", max_tokens=2)
        wait_for(lambda: idle(served, aborted=1), "the stream aborted")
        assert answers(served.client(), "tiny")



@pytest.fixture(scope="module")
def pair():
    """A model that decodes two sequences together."""
    return LLM("tiny-random", device="cpu", dtype=torch.float16, max_batch_size=2, max_seq_len=MAX_SEQ_LEN,
               progress=False)


@contextlib.contextmanager
def recording_schedules(monkeypatch):
    """Every step the server's scheduler plans: (prefill?, batch size, requests running)."""
    from tkpy.runtime.scheduler import Scheduler

    steps, schedule = [], Scheduler.schedule

    def recorded(self):
        batch, is_prefill = schedule(self)
        steps.append((is_prefill, len(batch), len(self.running)))
        return batch, is_prefill
    monkeypatch.setattr(Scheduler, "schedule", recorded)
    yield steps


def test_a_request_joins_the_running_batch(pair, monkeypatch):
    """B arrives while A streams: B's prefill runs with A running, then both decode together, and
    each answers as alone."""
    long_body = {"model": "tiny", "prompt": "Hello", "max_tokens": 400, "temperature": 0, "stream": True}
    expected = [pair.generate(p, max_new_tokens=n)[0].text for p, n in (("Hello", 400), ("Bye", 20))]
    with recording_schedules(monkeypatch) as steps, serving_in_process(pair) as served:
        with httpx.Client(timeout=TIMEOUT) as http, http.stream("POST", served.url + C, json=long_body) as response:
            lines = response.iter_lines()
            first = next(lines)
            joined = served.client().completions.create(model="tiny", prompt="Bye", max_tokens=20, temperature=0)
            rest = [line for line in lines if line.startswith("data: {")]
        wait_for(lambda: idle(served), "both ended")
    pieces = [json.loads(line[6:])["choices"][0]["text"] for line in [first, *rest]]
    assert ["".join(pieces), joined.choices[0].text] == expected
    assert any(prefill and running == 2 and batch == 1 for prefill, batch, running in steps), steps
    assert any(not prefill and batch == 2 for prefill, batch, running in steps), steps


def test_a_joining_request_whose_prefill_fails_leaves_the_running_one_alone(pair, monkeypatch):
    expected = pair.generate("Hello", max_new_tokens=300)[0].text
    prefill, calls = pair.runner.prefill, []

    def second_fails(requests):
        calls.append(len(requests))
        if len(calls) == 2:
            raise RuntimeError("injected failure")
        return prefill(requests)
    monkeypatch.setattr(pair.runner, "prefill", second_fails)
    with serving_in_process(pair) as served:
        client = served.client()
        stream = client.completions.create(model="tiny", prompt="Hello", max_tokens=300, temperature=0, stream=True)
        pieces = [next(iter(stream)).choices[0].text]
        with pytest.raises(openai.InternalServerError, match="injected failure"):
            client.completions.create(model="tiny", prompt="Bye", max_tokens=5, temperature=0)
        pieces += [chunk.choices[0].text for chunk in stream]
        assert "".join(pieces) == expected and calls == [1, 1]
        assert idle(served, aborted=0)


def test_a_finished_request_is_counted_before_its_answer_arrives(single):
    """One request after another, with no room to queue: none is refused, and each answer finds
    the server idle."""
    with serving_in_process(single, max_waiting=0) as served, httpx.Client(timeout=TIMEOUT) as http:
        for i in range(30):
            response = http.post(served.url + C, json={"model": "tiny", "prompt": f"Hi {i}", "max_tokens": 1})
            assert response.status_code == 200, response.text
            health = http.get(served.url + "/health").json()
            assert health["running"] == 0 and health["kv_pages_free"] == health["kv_pages_total"], health



def test_an_engine_thread_that_dies_answers_every_request_and_says_so(pair, monkeypatch):
    sampling = pair.sampling

    def no_seeds(temperature=0.0, top_p=1.0, seed=None, where="LLM"):
        if seed is not None:  # made on the engine thread, outside any step
            raise RuntimeError("injected failure")
        return sampling(temperature, top_p, seed, where)
    monkeypatch.setattr(pair, "sampling", no_seeds)
    free = pair.paging.pages.num_free
    with serving_in_process(pair) as served, httpx.Client(timeout=TIMEOUT) as http:
        response = http.post(served.url + C, json={"model": "tiny", "prompt": "Hi", "max_tokens": 2, "seed": 3})
        assert response.status_code == 503 and "engine thread failed" in response.json()["error"]["message"]
        health = http.get(served.url + "/health")
        assert health.status_code == 503 and "engine thread failed" in health.json()["status"]
        assert http.post(served.url + C, json={"model": "tiny", "prompt": "Hi", "max_tokens": 2}).status_code == 503
    assert pair.paging.pages.num_free == free


# ---- a real model ------------------------------------------------------------------------------------

def test_smollm2_gguf_answers_a_chat_as_llm_chat(tmp_path, smollm2):
    path = str(smollm2_gguf())
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    with serving(tmp_path / "server.log", "--model", path, "--device", "cpu", "--dtype", "bfloat16",
                 "--max-seq-len", "512", "--max-batch-size", "2") as served:
        # While the server loads the model (the same file, dtype and max_seq_len).
        expected = smollm2(torch.bfloat16).chat(messages, max_new_tokens=24, temperature=0)[0]
        client = served.ready().client()
        whole = client.chat.completions.create(model=served.model, messages=messages, max_tokens=24,
                                               temperature=0).choices[0]
        pieces, finish_reason = stream_text(client.chat.completions.create(
            model=served.model, messages=messages, max_tokens=24, temperature=0, stream=True), chat=True)
    assert "Paris" in expected.text
    assert "".join(pieces) == whole.message.content == expected.text
    assert finish_reason == whole.finish_reason == expected.finish_reason
