"""The OpenAI routes over an :class:`Engine`; the protocol itself (request bodies, validation,
response envelopes, errors) is mtx.serving.protocol.

Kept free of any server process so that ``mtx serve`` (uvicorn, mtx.serving.http) and the Ray Serve
deployment (mtx.serving.ray_app) mount the same FastAPI routes.

* ``POST /v1/completions``, ``POST /v1/chat/completions`` — ``stream: true`` sends server-sent events
  ``data: {json}\\n\\n`` and a final ``data: [DONE]\\n\\n``, as OpenAI does; usage in the response,
  and in a last chunk with ``stream_options.include_usage``.
* ``GET /v1/models``, ``GET /health`` (liveness), ``GET /ready`` and ``GET /health/ready``,
  ``GET /metrics`` (Prometheus).

Invariants (no request can stall the event loop, so /health always answers):
* The event loop only moves bytes: a body is read with a byte limit (:class:`Guard`: Content-Length
  first, then the bytes actually received; 413) and a deadline (408). Parsing, validation,
  tokenization (GIL released) and chat-template rendering (under its deadline) run on a bounded pool
  of worker threads, at most ``max_preparing`` requests at a time (then 429).
* Every error response is OpenAI's error JSON, and each one is counted once, by status, in
  ``mtx_requests_rejected_total`` — both in :class:`Guard`, which every response passes.
* A request whose client disconnects is cancelled at once, streamed or not (its row freed at the
  engine's next step).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from mtx.errors import MtxError
from mtx.runtime.request import check_utf8
from mtx.serving import protocol
from mtx.runtime.grammar import GrammarCompiler, GrammarSpec
from mtx.serving.chat import chat_encoder
from mtx.serving.engine import Engine, EngineBusy, EngineDraining, Event, RequestHandle
from mtx.serving.metrics import ServingMetrics
from mtx.serving.protocol import (DEFAULT_BODY_TIMEOUT_S, DEFAULT_COMPLETION_MAX_TOKENS, DEFAULT_MAX_REQUEST_BYTES,
                                  SSE_DONE, ApiError, ChatRequest, CompletionRequest, Envelope, Prepared,
                                  SamplingRequest, api_error, sse)
from mtx.serving.tools import TOOL_CALLS_TOKEN, ToolOutput, ToolRequest, response_grammar, tool_request
from mtx.tokenizer import encode_checked

log = logging.getLogger("mtx.serving")
#: Worker threads that parse, tokenize and render requests (off the event loop).
PREPARE_THREADS = 4
Sink = Callable[[Event], None]


# -- the routes' state ---------------------------------------------------------------------------------
def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[[], None]) -> None:
    try:
        loop.call_soon_threadsafe(fn)
    except RuntimeError:  # the event loop is gone (server stopped)
        pass


class _StreamResponse(StreamingResponse):
    """An SSE response that cancels its request however it ends, even if its body never started."""

    def __init__(self, handle: RequestHandle, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._handle = handle

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._handle.cancel()  # no-op once finished


def _cancel_submitted(future: Any) -> None:
    """Cancel the request a finished preparation submitted (its handler is gone)."""
    if not future.cancelled() and future.exception() is None:
        future.result()[2].cancel()


class OpenAIServer:
    """The state behind the routes: one engine, its generator, the served model name, the chat
    prompt path, the metrics, the request limits and the pool of worker threads that prepares requests."""

    def __init__(self, engine: Engine, model_name: str, folder: Path | None, metrics: ServingMetrics,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
                 prepare_threads: int = PREPARE_THREADS) -> None:
        self.engine = engine
        self.generator = engine.generator
        self.model_name = model_name
        self.metrics = metrics
        self.max_request_bytes = max_request_bytes
        self.body_timeout_s = body_timeout_s
        self.created = int(time.time())
        #: The one chat prompt path (mtx.serving.chat): the folder's template, or mistral_common's encoding.
        self.chat = chat_encoder(folder, self.generator.tokenizer)
        #: Grammars of structured output and forced tool calls, compiled on the worker threads.
        self.grammars = GrammarCompiler(self.generator.tokenizer, self.generator.config.vocab_size,
                                        self.generator.eos_token_ids)
        self.tool_calls_id = _control_id(self.generator.tokenizer, TOOL_CALLS_TOKEN)
        self.v11_calls = _control_id(self.generator.tokenizer, "[ARGS]") is not None
        self._pool = ThreadPoolExecutor(max_workers=prepare_threads, thread_name_prefix="mtx-prepare")
        #: Requests being parsed / prepared at once (running or waiting for a worker); beyond it, 429.
        self.max_preparing = prepare_threads + engine.max_queue
        self._preparing = 0
        metrics.bind(engine)

    def close(self) -> None:
        """Stop the worker threads (those at work finish their request) and the engine."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.engine.close()

    def position_limit(self) -> int | None:
        """Positions a request may reach (prompt + new tokens), or None where unbounded."""
        return self.generator.backend.position_limit()

    # -- request body -> Prepared (on a worker thread: tokenising here, validating in protocol) --------
    def _prepare(self, req: SamplingRequest, ids: list[int], max_tokens: int | None, default_max: int | None,
                 prompt_field: str, grammar: GrammarSpec | None = None) -> Prepared:
        """Validate the sampling fields, then compile ``grammar`` (or that of ``response_format`` /
        ``guided_*``) here, on the worker thread: 400 naming the field when it is invalid."""
        prep = protocol.prepare(req, ids, max_tokens=max_tokens, default_max=default_max, prompt_field=prompt_field,
                                position_limit=self.position_limit(), eos_token_ids=self.generator.eos_token_ids)
        try:
            spec = response_grammar(req)
            if grammar is not None and spec is not None:
                raise ApiError(400, f"tool_choice: a forced tool call cannot be combined with {spec.field}",
                               "tool_choice")
            spec = spec or grammar
            if spec is not None:
                prep.options["constraint"] = self.grammars.compile(spec)
        except MtxError as e:
            raise api_error(e) from None
        return prep

    def _ids(self, prompt: str | list[int], what: str, tokenizer: Any, add_special_tokens: bool) -> list[int]:
        """Validated ids of ``prompt``; text is tokenized with the GIL released (long texts take seconds)."""
        if isinstance(prompt, str) and tokenizer is not None:
            check_utf8(prompt, what, param=None)  # the route names its own field
            prompt = encode_checked(tokenizer, prompt, what, add_special_tokens, release_gil=True)
        return self.generator.to_ids(prompt, what)

    def prepare_completion(self, req: CompletionRequest) -> Prepared:
        protocol.check_model(req, self.model_name)
        prompt = protocol.completion_prompt(req)
        try:
            ids = self._ids(prompt, "prompt", self.generator.tokenizer, add_special_tokens=True)
        except MtxError as e:
            raise api_error(e, "prompt") from None
        return self._prepare(req, ids, req.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS, "prompt")

    def prepare_chat(self, req: ChatRequest) -> Prepared:
        protocol.check_model(req, self.model_name)
        messages = protocol.chat_messages(req, self.chat is not None)
        try:
            tools: ToolRequest | None = tool_request(req, self.tool_calls_id, self.v11_calls)
        except MtxError as e:
            raise api_error(e, "tools") from None
        try:
            assert self.chat is not None  # chat_messages refuses a request without a tokenizer
            prompt = self.chat.encode(messages, tools=tools.tools if tools is not None else None)
            ids = self.generator.to_ids(prompt, "chat prompt")
        except MtxError as e:
            raise api_error(e, "messages") from None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        prep = self._prepare(req, ids, max_tokens, None, "messages", tools.grammar if tools is not None else None)
        if tools is not None and tools.parses:
            assert self.tool_calls_id is not None  # tool_request refuses tools the model cannot call
            prep = dataclasses.replace(prep, tool_calls=(self.tool_calls_id, tools.parallel))
        return prep

    def submit(self, prep: Prepared, sink: Sink) -> RequestHandle:
        """Submit ``prep`` to the engine (any thread); its events go to ``sink``."""
        try:
            return self.engine.submit(prep.ids, prep.max_tokens, sink=sink, want_text=self.generator.tokenizer
                                      is not None, **prep.options)
        except (EngineBusy, EngineDraining, MtxError) as e:
            raise api_error(e, "max_tokens") from None

    def _admit(self, raw: bytes, chat: bool, sink: Sink) -> tuple[SamplingRequest, Prepared, RequestHandle]:
        """On a worker thread: parse and validate ``raw``, tokenize, submit (ApiError when refused)."""
        body: SamplingRequest
        if chat:
            body = protocol.parse_body(raw, ChatRequest)
            prep = self.prepare_chat(body)  # type: ignore[arg-type]
        else:
            body = protocol.parse_body(raw, CompletionRequest)
            prep = self.prepare_completion(body)  # type: ignore[arg-type]
        return body, prep, self.submit(prep, sink)

    # -- running (on the event loop) ----------------------------------------------------------------
    async def read_body(self, request: Request) -> bytes:
        """The request body, within ``body_timeout_s`` (408) and the byte limit (413, :class:`Guard`)."""
        try:
            return await asyncio.wait_for(request.body(), self.body_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {self.body_timeout_s:g} s (--body-timeout)",
                           None, "invalid_request_error", "request_timeout") from None
        except ClientDisconnect:
            raise ApiError(400, "the client disconnected while sending the request body") from None

    async def handle(self, request: Request, chat: bool) -> Response:
        """One POST of a completion (``chat``: a chat completion): read, prepare off the loop, run."""
        raw = await self.read_body(request)
        if self._preparing >= self.max_preparing:
            raise ApiError(429, f"{self._preparing} requests are being prepared; retry later", None,
                           "rate_limit_error", "queue_full")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def sink(ev: Event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, ev)
            except RuntimeError:  # the event loop is gone (server stopped): nobody is listening
                pass

        self._preparing += 1
        future = self._pool.submit(self._admit, raw, chat, sink)
        future.add_done_callback(lambda _: _call_soon(loop, self._prepared))  # counted until it ends
        try:
            body, prep, handle = await asyncio.wrap_future(future)
        except asyncio.CancelledError:  # the handler was cancelled (client gone, shutdown): so is the request
            future.add_done_callback(_cancel_submitted)
            raise
        try:
            return await self.run(request, body, prep, handle, events, chat)
        except BaseException:
            handle.cancel()  # no-op once finished; a response that never started frees its row
            raise

    def _prepared(self) -> None:
        self._preparing -= 1

    async def run(self, request: Request, body: SamplingRequest, prep: Prepared, handle: RequestHandle,
                  events: asyncio.Queue[Event], chat: bool) -> Response:
        """Answer a submitted request: an SSE stream, or one JSON object when it finishes.

        The text is the engine's (the core's one detokenizer: complete characters only, ending before
        the first stop string); this layer only wraps it."""
        env = Envelope(self.model_name, chat, body.stream, body.include_usage)
        if body.stream:
            return _StreamResponse(handle, self._stream(handle, events, env, prep),
                                   media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        watcher = asyncio.create_task(_on_disconnect(request, lambda: events.put_nowait(_GONE)))
        tools = ToolOutput(*prep.tool_calls) if prep.tool_calls is not None else None
        try:
            reason, text, n_tokens = await self._collect(events, tools)
        finally:
            watcher.cancel()
            handle.cancel()  # no-op once finished; frees the row if the client went away
        if reason == "error":
            raise ApiError(500, "the engine failed on this request", None, "server_error")
        usage = protocol.usage(len(prep.ids), n_tokens)
        if tools is not None:
            content, calls = tools.message()
            return JSONResponse(env.wrap([env.call_choice(content, calls, "tool_calls" if calls and reason == "stop"
                                                          else reason)], usage))
        return JSONResponse(env.wrap([env.choice(text, reason)], usage))

    @staticmethod
    async def _collect(events: asyncio.Queue[Event], tools: ToolOutput | None = None) -> tuple[str, str, int]:
        """(finish reason, text, tokens) of a request ("cancelled" as soon as the client is gone); with
        ``tools``, each event's token and text also go to it."""
        parts: list[str] = []
        n_tokens = 0
        while True:
            ev = await events.get()
            if ev is _GONE:
                return "cancelled", "".join(parts), n_tokens
            parts.append(ev.text)
            if tools is not None:
                tools.push(ev.token, ev.text)
            if ev.kind == "token":
                n_tokens += 1
            else:
                return ev.finish_reason or "error", "".join(parts), n_tokens

    async def _stream(self, handle: RequestHandle, events: asyncio.Queue[Event], env: Envelope,
                      prep: Prepared) -> AsyncIterator[str]:
        """The SSE events of one request; always ends with ``[DONE]`` and cancels ``handle``."""
        n_tokens = 0
        tools = ToolOutput(*prep.tool_calls) if prep.tool_calls is not None else None
        try:
            if env.chat:
                yield sse(env.wrap([env.choice(None, None, role=True)]))
            while True:
                ev = await events.get()
                if ev.kind == "token":
                    n_tokens += 1
                    if tools is not None:
                        content, deltas = tools.push(ev.token, ev.text)
                        if content or deltas:
                            yield sse(env.wrap([env.call_choice(content, deltas, None)]))
                    elif ev.text:
                        yield sse(env.wrap([env.choice(ev.text, None)]))
                    continue
                reason = ev.finish_reason
                if reason == "error":
                    yield sse(ApiError(500, f"the engine failed on this request: {ev.message}", None,
                                       "server_error").body())
                    break
                if tools is not None:
                    content, deltas = tools.push(ev.token, ev.text)
                    if content or deltas:
                        yield sse(env.wrap([env.call_choice(content, deltas, None)]))
                    if reason == "stop" and tools.calls():
                        reason = "tool_calls"
                    yield sse(env.wrap([env.choice(None, reason)]))
                elif env.chat:
                    if ev.text:
                        yield sse(env.wrap([env.choice(ev.text, None)]))
                    yield sse(env.wrap([env.choice(None, reason)]))
                else:
                    yield sse(env.wrap([env.choice(ev.text, reason)]))
                if env.include_usage:
                    yield sse(env.wrap([], protocol.usage(len(prep.ids), n_tokens)))
                break
            yield SSE_DONE
        finally:
            handle.cancel()  # the client went away (or we are done): free the row now


def _control_id(tokenizer: Any | None, text: str) -> int | None:
    """The id of control token ``text`` in ``tokenizer`` (an HF added special token, or one of Mistral's),
    or None where it has none."""
    if tokenizer is None:
        return None
    mistral = getattr(tokenizer, "mistral", None)
    if mistral is not None:
        raw = mistral.instruct_tokenizer.tokenizer
        try:
            token = int((getattr(raw, "get_special_token", None) or raw.get_control_token)(text))
        except Exception:  # noqa: BLE001 - mistral_common raises its own kinds for an unknown control token
            return None
        return token if raw.id_to_piece(token) == text else None  # SentencePiece answers <unk> for unknown
    added = getattr(tokenizer, "get_added_tokens_decoder", None)
    if added is None:
        return None
    return next((int(i) for i, t in added().items() if t.content == text and t.special), None)


#: Put on a request's event queue when its client disconnects.
_GONE = Event("finish", finish_reason="cancelled")


async def _on_disconnect(request: Request, callback: Callable[[], None]) -> None:
    """Call ``callback`` when the client of ``request`` (its body already read) disconnects: the ASGI
    server's next message after the body is ``http.disconnect``."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            callback()
            return
        await asyncio.sleep(0.05)  # a server that repeats empty body messages: poll, never spin


# -- the one place every response passes -----------------------------------------------------------------
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class Guard:
    """ASGI middleware around the routes (inside Starlette's last-resort error handler):

    * the request body limit: a Content-Length over the limit is answered 413 before any byte of the
      body is read; bodies without one (chunked) are counted as they arrive, and the read raises 413
      once the count passes the limit — a body is never held beyond ``limit`` bytes;
    * an exception no handler took becomes OpenAI's 500 JSON (when no response has started);
    * every response of status >= 400 is counted once in ``mtx_requests_rejected_total{status}``.

    ``get_server()`` gives the limit and the metrics (the defaults, uncounted, while it cannot)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]],
                 get_server: Callable[[], OpenAIServer]) -> None:
        self.app = app
        self.get_server = get_server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            server: OpenAIServer | None = self.get_server()
        except Exception:  # noqa: BLE001 - e.g. a Ray replica still loading: defaults
            server = None
        limit = server.max_request_bytes if server is not None else DEFAULT_MAX_REQUEST_BYTES
        started = False

        async def counted_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if message["status"] >= 400 and server is not None:
                    server.metrics.rejected.labels(status=str(message["status"])).inc()
            await send(message)

        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None:
            error = None
            if not length.strip().isdigit():
                error = ApiError(400, f"Content-Length {length[:40].decode('latin-1')!r} is not a number")
            elif int(length) > limit:
                error = protocol.too_large(limit)
            if error is not None:
                await error.response()(scope, receive, counted_send)
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise protocol.too_large(limit)
            return message

        try:
            await self.app(scope, limited_receive, counted_send)
        except Exception as e:  # noqa: BLE001 - the last resort: OpenAI's 500, logged
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            error = ApiError(500, f"internal server error ({type(e).__name__})", None, "server_error")
            await error.response()(scope, receive, counted_send)


def add_routes(app: FastAPI, get_server: Callable[[], OpenAIServer]) -> FastAPI:
    """Mount the OpenAI routes on ``app``; ``get_server()`` returns the :class:`OpenAIServer` of this
    process (a replica's own under Ray Serve)."""

    @app.exception_handler(ApiError)
    @app.exception_handler(RequestValidationError)
    async def _error(request: Request, exc: Exception) -> JSONResponse:
        return api_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        response = protocol.http_error(exc.status_code, exc.detail, request.method, request.url.path).response()
        response.headers.update(exc.headers or {})
        return response

    app.add_middleware(Guard, get_server=get_server)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await get_server().handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await get_server().handle(request, chat=True)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        server = get_server()
        return protocol.models_response(server.model_name, server.created, server.position_limit())

    @app.get("/health")
    async def health() -> Response:
        alive = get_server().engine.alive
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)

    @app.get("/ready")
    @app.get("/health/ready")
    async def ready() -> Response:
        engine = get_server().engine
        ok = engine.alive and not engine.draining
        return JSONResponse({"status": "ready" if ok else ("draining" if engine.draining else "not started")},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        m = get_server().metrics
        return Response(m.render(), media_type=m.content_type)

    return app


def build_app(server: OpenAIServer) -> FastAPI:
    """A FastAPI app serving ``server``."""
    app = FastAPI(title="mtx serve", docs_url=None, redoc_url=None)
    return add_routes(app, lambda: server)
