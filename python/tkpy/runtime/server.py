"""``python -m tkpy serve``: an OpenAI-compatible HTTP server over one :class:`LLM`.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with
``stream``: server-sent events), and ``GET /health`` (the batch, the free KV pages, the requests
aborted so far).

All torch work happens on one engine thread, which owns the server's one :class:`Scheduler`:
requests that arrive while others run join them at the next step, as :meth:`LLM.generate` batches
a list of prompts. The event loop checks a request (JSON, types, bounds, the prompt's tokens) and
hands it over through a lock-guarded inbox; the engine thread takes in new requests and
cancellations between steps, sleeps while it has none, and after each step passes every request's
new token to that request's asyncio queue with ``call_soon_threadsafe``. The event loop turns the
tokens into text, so the engine thread only ever waits for the model.

A client that goes away cancels its request, which frees its KV pages at the engine's next turn:
a stream notices when its response ends early, a plain request watches for ``http.disconnect``
while it waits. A step that raises fails the requests of its batch (a 500, or an error event in a
stream); the waiting ones and the server carry on. At SIGINT or SIGTERM, the requests in flight get
SHUTDOWN_GRACE_SECONDS to end; those left end with a 503 (an error event in a stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Optional

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import ArgumentError
from .engine import LLM
from .request import Request, TextStream

__all__ = ["APIError", "Engine", "build_app", "serve"]

MAX_BODY_BYTES = 1 << 20  # a larger request body is refused (413) before it is parsed
MAX_WAITING = 256  # requests queued beyond a full batch; more are refused (429)
MAX_STOP_STRINGS = 4  # as OpenAI's API
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
SHUTDOWN_GRACE_SECONDS = 5  # on SIGINT/SIGTERM, requests in flight get this long to end, then a 503

_log = logging.getLogger("uvicorn.error")  # where uvicorn writes its own errors

# Options this server does not implement, with the values that ask for nothing (besides null and a
# missing key): any other value is refused rather than silently ignored.
_COMPLETION_UNSUPPORTED = {"logprobs": (), "echo": (False,), "best_of": (1,), "suffix": (), "logit_bias": ({},),
                           "presence_penalty": (0,), "frequency_penalty": (0,)}
_CHAT_UNSUPPORTED = {"tools": ([],), "tool_choice": ("none",), "functions": ([],), "function_call": ("none",),
                     "response_format": ({"type": "text"},), "logprobs": (False,), "top_logprobs": (0,),
                     "logit_bias": ({},), "presence_penalty": (0,), "frequency_penalty": (0,), "audio": (),
                     "modalities": (["text"],), "prediction": ()}


class APIError(Exception):
    """A refused or failed request, answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Stream:
    """One request's tokens, from the engine thread to the event loop that answers it.

    The engine thread calls :meth:`push` or :meth:`fail`; the event loop reads with :meth:`update`
    into ``copy``, its own copy of the request, and decodes the text there: the engine thread only
    ever waits for the model."""

    def __init__(self, request: Request, decode: Callable[[list[int]], str], seed: Optional[int]):
        self.request, self.decode, self.seed = request, decode, seed
        self.copy = Request(list(request.tokens), request.prompt_len, request.max_new_tokens, stop=request.stop)
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def news(self) -> tuple:
        """Engine thread: what ``request`` has now (its newest token, and whether it ended), for
        :meth:`deliver`."""
        request = self.request
        return request.tokens[-1], request.finish_reason, request.text

    def deliver(self, item) -> None:
        """Engine thread: hand :meth:`news`, or the APIError that ended the request, to the loop."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    @property
    def finish_reason(self) -> Optional[str]:
        """None while it runs; "stop" or "length"; "error" once it failed."""
        return self.copy.finish_reason

    async def update(self) -> None:
        """Wait for the engine's next tokens, then take in every one that has come."""
        items = [await self.queue.get()]
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        for item in items:
            if isinstance(item, APIError):
                self.copy.finish_reason = "error"
                raise item
            token, self.copy.finish_reason, self.copy.text = item
            self.copy.tokens.append(token)

    async def finish(self) -> None:
        while self.finish_reason is None:
            await self.update()

    @property
    def text(self) -> str:
        """The final text, once finished, as :meth:`LLM.generate` gives it."""
        return self.decode(self.copy.generated) if self.copy.text is None else self.copy.text

    async def pieces(self) -> AsyncIterator[str]:
        """The text in pieces as they settle (see :class:`TextStream`); together, :attr:`text`."""
        text = TextStream(self.copy, self.decode)
        while self.finish_reason is None:
            await self.update()
            piece = text.next_piece()
            if piece:
                yield piece


class Engine:
    """The thread that runs the model: it alone calls :meth:`LLM.step` and :meth:`LLM.abort`, on
    the one scheduler it owns. The event loop talks to it through :meth:`submit` and
    :meth:`cancel`, and reads :attr:`health`, a snapshot the thread replaces after each turn."""

    def __init__(self, llm: LLM, max_waiting: int = MAX_WAITING):
        self.llm, self.max_in_flight = llm, llm.max_batch_size + max_waiting
        self._cond = threading.Condition()
        self._submitted: list[_Stream] = []  # the inbox; it and the next three are guarded by _cond
        self._cancelled: list[_Stream] = []
        self._in_flight = 0  # submitted and not yet ended
        self._closed: Optional[str] = None  # why requests are refused: shutting down, or the thread died
        self._stop_by = 0.0  # once closed, the time.monotonic() by which the requests left are aborted
        self._aborted = 0
        self._thread = threading.Thread(target=self._run, name="tkpy-engine", daemon=True)
        self.health = self._snapshot(0, 0)

    def start(self) -> None:
        self._thread.start()

    def stop(self, grace: float = 0.0) -> None:
        """Refuse new requests, give the others ``grace`` seconds to end, abort the rest (a 503 for
        them), and end the thread."""
        with self._cond:
            if not self._closed:
                self._closed, self._stop_by = "the server is shutting down", time.monotonic() + grace
                self.health = {**self.health, "status": self._closed}
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join()

    def submit(self, stream: _Stream) -> None:
        with self._cond:
            if self._closed:
                raise APIError(503, self._closed, kind="server_error")
            if self._in_flight >= self.max_in_flight:
                raise APIError(429, f"the server has {self._in_flight} requests in flight, its limit: try again "
                                    f"later", code="rate_limit_exceeded", kind="rate_limit_error")
            self._in_flight += 1
            self._submitted.append(stream)
            self._cond.notify()

    def cancel(self, stream: _Stream) -> None:
        """Abort ``stream``'s request unless it has ended (its client went away)."""
        with self._cond:
            self._cancelled.append(stream)
            self._cond.notify()

    def _snapshot(self, running: int, waiting: int) -> dict:
        pages = self.llm.paging.pages
        return {"status": self._closed or "ok", "running": running, "waiting": waiting,
                "kv_pages_free": pages.num_free, "kv_pages_total": pages.count - 1,  # count holds the scratch page
                "aborted": self._aborted}

    def _run(self) -> None:
        scheduler, streams = self.llm.new_scheduler(), {}
        error = APIError(503, "the server is shutting down", kind="server_error")
        try:
            self._serve(scheduler, streams)
        except Exception:  # a bug outside a step: refuse requests from now on rather than hang them
            _log.exception("tkpy: the engine thread failed; requests are refused from now on")
            error = APIError(503, "the engine thread failed (see the server's log)", kind="server_error")
        with self._cond:
            self._closed = self._closed or error.message
            left, self._submitted = [*streams.values(), *self._submitted], []
        for stream in left:
            try:
                self.llm.abort(scheduler, stream.request)
            finally:  # whatever abort did, the client gets its answer
                stream.deliver(error)
        self.health = self._snapshot(len(scheduler.running), len(scheduler.waiting))

    def _serve(self, scheduler, streams: dict[Request, _Stream]) -> None:
        while True:
            with self._cond:
                while not (self._submitted or self._cancelled or self._closed or streams):
                    self._cond.wait()
                if self._closed and (not streams or time.monotonic() >= self._stop_by):
                    return
                submitted, cancelled = self._submitted, self._cancelled
                self._submitted, self._cancelled = [], []
            for stream in submitted:  # held first: if what follows raises, _run answers them all
                streams[stream.request] = stream
            for stream in submitted:
                if stream.seed is not None:  # a generator on the model's device: made on this thread, as all torch work
                    sampling = stream.request.sampling
                    stream.request.sampling = self.llm.sampling(sampling.temperature, sampling.top_p, stream.seed)
                scheduler.add(stream.request)
            ended = 0
            for stream in cancelled:
                if streams.pop(stream.request, None) is not None:  # else it had ended
                    self.llm.abort(scheduler, stream.request)
                    self._aborted += 1
                    ended += 1
            # Delivered once the count and the health say what ended: a client's next request may follow at once.
            outbox = []
            if streams:
                running = set(scheduler.running)
                try:
                    stepped = self.llm.step(scheduler)
                except Exception as e:
                    _log.exception("tkpy: a step failed; the requests of its batch get an error")
                    stepped, failed = [], self._fail_batch(scheduler, streams, running, e)
                    outbox += failed
                    ended += len(failed)
                for request in stepped:
                    stream = streams[request]
                    outbox.append((stream, stream.news()))
                    if request.finish_reason is not None:
                        del streams[request]
                        ended += 1
            with self._cond:
                self._in_flight -= ended
            self.health = self._snapshot(len(scheduler.running), len(scheduler.waiting))
            for stream, item in outbox:
                stream.deliver(item)

    def _fail_batch(self, scheduler, streams: dict[Request, _Stream], running: set, e: Exception) -> list:
        """After a step raised: end the requests it ran with a 500, giving back their pages. A failed
        prefill ran the requests it admitted (those running now and not before), a failed decode all
        the running ones; if it failed before either, all of them, so that none is retried forever.
        Returns ``(stream, error)`` to deliver."""
        error = APIError(500, f"generation failed: {type(e).__name__}: {e}", kind="server_error")
        admitted = [r for r in scheduler.running if r not in running]
        failed = admitted or list(scheduler.running) or list(streams)
        for request in failed:
            self.llm.abort(scheduler, request)
        return [(streams.pop(request), error) for request in failed]


# ---- reading a request -----------------------------------------------------------------------------

def _show(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


async def _read_json(request: HTTPRequest) -> dict:
    """The body as a JSON object: at most MAX_BODY_BYTES (else 413), valid JSON, an object (else 400)."""
    too_large = APIError(413, f"the request body exceeds {MAX_BODY_BYTES} bytes", code="request_too_large")
    length = request.headers.get("content-length", "0")
    if not length.isdigit() or int(length) > MAX_BODY_BYTES:
        raise too_large
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise too_large
    except ClientDisconnect:  # gone halfway through its body: nobody reads the answer
        raise APIError(400, "the client disconnected while sending its request") from None
    try:
        value = json.loads(body, parse_constant=_refuse_constant)  # NaN and Infinity are Python's, not JSON
        json.dumps(value, ensure_ascii=False).encode("utf-8")  # a \ud800 escape can write half a character
    except UnicodeEncodeError:
        raise APIError(400, "the request body holds a lone surrogate (a \\ud800-\\udfff escape without its "
                            "pair), which is not text") from None
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(value).__name__}")
    return value


def _param(body: dict, name: str, types, default=None, expected: str = "", ok=lambda value: True):
    """``body[name]``, or ``default`` when missing or null; a 400 naming it unless it is of
    ``types`` (a bool is no number) and ``ok(value)``."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, types) or (isinstance(value, bool) and types is not bool) or not ok(value):
        raise APIError(400, f"'{name}' must be {expected}, got {_show(value)}", param=name)
    return value


@dataclass
class _Options:
    """A request's options besides its prompt, checked."""

    max_tokens: Optional[int]  # None: as many as fit in max_seq_len
    temperature: float
    top_p: float
    seed: Optional[int]
    stream: bool
    include_usage: bool
    stops: list[str]


def _options(body: dict, unsupported: dict, max_tokens: Optional[int]) -> _Options:
    for name, harmless in unsupported.items():
        value = body.get(name)
        if value is not None and value not in harmless:
            raise APIError(400, f"'{name}' is not supported by this server (got {_show(value)}): leave it out",
                           param=name, code="unsupported_parameter")
    _param(body, "n", int, 1, "1 (this server answers with one choice)", lambda v: v == 1)
    at_least_one = ("an integer >= 1", lambda v: v >= 1)
    max_tokens = _param(body, "max_tokens", int, max_tokens, *at_least_one)
    max_tokens = _param(body, "max_completion_tokens", int, max_tokens, *at_least_one)  # the chat API's new name
    stop = _param(body, "stop", (str, list), [], "a string or a list of strings")
    stops = [stop] if isinstance(stop, str) else stop
    if len(stops) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stops):
        raise APIError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them, "
                            f"got {_show(stop)}", param="stop")
    stream_options = _param(body, "stream_options", dict, {}, "an object")
    return _Options(
        max_tokens=max_tokens,
        temperature=_param(body, "temperature", (int, float), 1.0, "a number in [0, 2]", lambda v: 0 <= v <= 2),
        top_p=_param(body, "top_p", (int, float), 1.0, "a number in (0, 1]", lambda v: 0 < v <= 1),
        seed=_param(body, "seed", int, None, "an integer in [0, 2**64)", lambda v: 0 <= v < 2**64),
        stream=_param(body, "stream", bool, False, "a boolean"),
        include_usage=_param(stream_options, "include_usage", bool, False, "a boolean"),
        stops=stops)


def _prompt_tokens(llm: LLM, prompt) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # a batch of one text prompt, as OpenAI's client may send it
    if not (isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt))):
        raise APIError(400, f"'prompt' must be a string or a non-empty list of token ids (one prompt a request), "
                            f"got {_show(prompt)}", param="prompt")
    return _checked(lambda: llm.encode(prompt, "prompt"), "prompt")


def _chat_tokens(llm: LLM, messages) -> list[int]:
    """The conversation's prompt. A message's content may also be a list of text parts, as OpenAI's
    API takes it: they are joined into one string."""
    if isinstance(messages, list):
        joined = []
        for i, message in enumerate(messages):
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise APIError(400, f"messages[{i}].content: only text parts ({{\"type\": \"text\", \"text\": "
                                        f"...}}) are supported", param="messages")
                message = {**message, "content": "\n".join(p["text"] for p in content)}
            joined.append(message)
        messages = joined
    return _checked(lambda: llm.chat_prompt(messages, "/v1/chat/completions"), "messages")


def _checked(make: Callable[[], Any], param: str):
    """``make()``, its ArgumentError (the runtime's message, naming what is wrong) a 400 on ``param``."""
    try:
        return make()
    except ArgumentError as e:
        raise APIError(400, str(e), param=param) from None


# ---- answering -------------------------------------------------------------------------------------

class _Reply:
    """The response bodies of one request, shaped as OpenAI's API shapes them."""

    def __init__(self, model_name: str, chat: bool, prompt_tokens: int):
        self.model_name, self.chat, self.prompt_tokens = model_name, chat, prompt_tokens
        self.id, self.created = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, int(time.time())

    def _body(self, kind: str, choices: list, **more) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_name, "choices": choices,
                **more}

    def usage(self, stream: _Stream) -> dict:
        completion_tokens = len(stream.copy.generated)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def whole(self, stream: _Stream) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": stream.text}}
        else:
            choice = {"index": 0, "text": stream.text}
        choice.update(logprobs=None, finish_reason=stream.finish_reason)
        return self._body("chat.completion" if self.chat else "text_completion", [choice], usage=self.usage(stream))

    def chunk(self, delta: Optional[dict], finish_reason: Optional[str] = None, **more) -> str:
        """A stream's event: ``delta`` (chat) or its content as ``text`` (completions); no choice
        when ``delta`` is None (the usage chunk)."""
        choices = []
        if delta is not None:
            choices = [{"index": 0, "delta": delta} if self.chat else {"index": 0, "text": delta.get("content", "")}]
            choices[0].update(logprobs=None, finish_reason=finish_reason)
        return _event(self._body("chat.completion.chunk" if self.chat else "text_completion", choices, **more))

    async def events(self, stream: _Stream, include_usage: bool) -> AsyncIterator[str]:
        """The server-sent events: the text's pieces, a last chunk with the finish reason (and, when
        asked for, one with the usage), then ``[DONE]``; an error event if the engine failed."""
        if self.chat:
            yield self.chunk({"role": "assistant", "content": ""})
        try:
            async for piece in stream.pieces():
                yield self.chunk({"content": piece})
        except APIError as e:
            yield _event(e.body())
            return
        yield self.chunk({}, stream.finish_reason)
        if include_usage:
            yield self.chunk(None, usage=self.usage(stream))
        yield "data: [DONE]\n\n"


def _event(value: dict) -> str:
    return f"data: {json.dumps(value, ensure_ascii=False)}\n\n"


class _EventStream(StreamingResponse):
    """Server-sent events that call ``on_close`` however the response ends: finished, its client
    gone (Starlette then cancels the response), or the server shutting down."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream", headers={"cache-control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def _finished_unless_gone(request: HTTPRequest, stream: _Stream) -> bool:
    """Wait until ``stream`` has finished (True) or its client has disconnected (False)."""

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    finishing, watching = asyncio.ensure_future(stream.finish()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({finishing, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        finishing.cancel()
        watching.cancel()
    if not finishing.done() or finishing.cancelled():
        return False
    finishing.result()  # the engine's APIError, if the request failed
    return True


class _API:
    """The endpoints, over one :class:`LLM` and its engine thread."""

    def __init__(self, llm: LLM, model_name: str, max_waiting: int):
        self.llm, self.model_name, self.engine = llm, model_name, Engine(llm, max_waiting)
        self.created = int(time.time())

    def _model(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "tkpy"}

    async def models(self, request: HTTPRequest) -> Response:
        return JSONResponse({"object": "list", "data": [self._model()]})

    async def model(self, request: HTTPRequest) -> Response:
        name = request.path_params["model"]
        if name != self.model_name:
            raise APIError(404, f"The model {name!r} does not exist: this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        return JSONResponse(self._model())

    async def health(self, request: HTTPRequest) -> Response:
        health = self.engine.health
        return JSONResponse(health, status_code=200 if health["status"] == "ok" else 503)

    async def completions(self, request: HTTPRequest) -> Response:
        body = await self._body(request)
        options = _options(body, _COMPLETION_UNSUPPORTED, COMPLETION_MAX_TOKENS)
        return await self._generate(request, _prompt_tokens(self.llm, body.get("prompt")), options, chat=False)

    async def chat_completions(self, request: HTTPRequest) -> Response:
        body = await self._body(request)
        options = _options(body, _CHAT_UNSUPPORTED, None)
        return await self._generate(request, _chat_tokens(self.llm, body.get("messages")), options, chat=True)

    async def _body(self, request: HTTPRequest) -> dict:
        body = await _read_json(request)
        model = body.get("model")
        if not isinstance(model, str):
            raise APIError(400, f"'model' is required: a string ({self.model_name!r} here)", param="model",
                           code="missing_required_parameter" if model is None else None)
        if model != self.model_name:
            raise APIError(404, f"The model {model!r} does not exist: this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        return body

    async def _generate(self, request: HTTPRequest, tokens: list[int], options: _Options, chat: bool) -> Response:
        llm, prompt_param = self.llm, "messages" if chat else "prompt"
        room = llm.max_seq_len - len(tokens)
        if room < 1 or (options.max_tokens or 0) > room:
            asked = "leaving no room for a completion" if room < 1 else f"and max_tokens is {options.max_tokens}"
            raise APIError(400, f"This model's maximum context length is {llm.max_seq_len} tokens: the prompt has "
                                f"{len(tokens)} tokens, {asked}", param=prompt_param if room < 1 else "max_tokens",
                           code="context_length_exceeded")
        sampling = llm.sampling(options.temperature, options.top_p, None, "sampling")  # the seed's: Engine's
        generation = _checked(lambda: llm.make_request(tokens, options.max_tokens or room, sampling, options.stops),
                              prompt_param)
        stream = _Stream(generation, llm.decode_text, options.seed)
        self.engine.submit(stream)
        reply = _Reply(self.model_name, chat, len(tokens))
        if options.stream:
            return _EventStream(reply.events(stream, options.include_usage), lambda: self._cancel(stream))
        try:
            if not await _finished_unless_gone(request, stream):
                return Response()  # nobody is there to read it
        finally:
            self._cancel(stream)
        return JSONResponse(reply.whole(stream))

    def _cancel(self, stream: _Stream) -> None:
        if stream.finish_reason is None:
            self.engine.cancel(stream)


async def _api_error(request: HTTPRequest, error: APIError) -> Response:
    return JSONResponse(error.body(), status_code=error.status)


async def _http_error(request: HTTPRequest, error: HTTPException) -> Response:
    """Starlette's own refusals (an unknown route, a wrong method) in OpenAI's error body."""
    message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    body = APIError(error.status_code, message.get(error.status_code, error.detail)).body()
    return JSONResponse(body, status_code=error.status_code, headers=error.headers)


async def _server_error(request: HTTPRequest, error: Exception) -> Response:
    return JSONResponse(APIError(500, f"internal error: {type(error).__name__}", kind="server_error").body(),
                        status_code=500)


def build_app(llm: LLM, model_name: str, max_waiting: int = MAX_WAITING) -> Starlette:
    """The server's ASGI app over ``llm``, answering to ``model_name``; ``app.state.engine`` is its
    :class:`Engine`. The engine thread starts with the app's lifespan and stops at its end (run the
    app with lifespan events, as uvicorn does); requests still running then end with a 503."""
    api = _API(llm, model_name, max_waiting)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        api.engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(api.engine.stop)

    routes = [Route("/v1/models", api.models, methods=["GET"]),
              Route("/v1/models/{model:path}", api.model, methods=["GET"]),
              Route("/v1/completions", api.completions, methods=["POST"]),
              Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
              Route("/health", api.health, methods=["GET"])]
    handlers = {APIError: _api_error, HTTPException: _http_error, Exception: _server_error}
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    app.state.engine = api.engine
    return app


class _Uvicorn(uvicorn.Server):
    """uvicorn, saying on stderr once the port is bound and the engine thread runs, and ending the
    requests in flight itself at shutdown: uvicorn would cancel them mid-response."""

    def __init__(self, config: uvicorn.Config, model_name: str, engine: Engine):
        super().__init__(config)
        self.model_name, self.engine = model_name, engine

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            host, port = self.config.host, self.servers[0].sockets[0].getsockname()[1]  # the port 0 took
            host = f"[{host}]" if ":" in host else host
            print(f"serving {self.model_name} on http://{host}:{port}", file=sys.stderr, flush=True)

    async def shutdown(self, sockets=None) -> None:
        await asyncio.to_thread(self.engine.stop, SHUTDOWN_GRACE_SECONDS)
        await super().shutdown(sockets)


def serve(llm: LLM, host: str = "127.0.0.1", port: int = 8000, model_name: str = "tkpy",
          max_waiting: int = MAX_WAITING) -> None:
    """Serve ``llm`` on ``host:port`` until SIGINT or SIGTERM; then give the requests in flight
    SHUTDOWN_GRACE_SECONDS to end (new ones get a 503), end the rest with a 503, stop the engine
    thread and return. Call it from the main thread."""
    if not 0 <= port <= 65535:
        raise ArgumentError(f"serve: port must be in [0, 65535] (0: any free one), got {port}")
    app = build_app(llm, model_name, max_waiting)
    config = uvicorn.Config(app, host=host, port=port, lifespan="on", log_level="warning",
                            timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS)
    # uvicorn handles SIGINT and SIGTERM itself, then raises the signal again for the handler it
    # found, to end the process the default way; found here: one that ignores it, so that serve()
    # returns and the command ends normally.
    handlers = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        _Uvicorn(config, model_name, app.state.engine).run()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
