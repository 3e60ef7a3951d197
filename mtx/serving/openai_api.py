"""The OpenAI routes over an :class:`Engine`; the protocol itself (request bodies, validation,
response envelopes, errors) is mtx.serving.protocol.

Kept free of any server process so that ``mtx serve`` (uvicorn, mtx.serving.http) and the Ray Serve
deployment (mtx.serving.ray_app) mount the same FastAPI routes.

* ``POST /v1/completions``, ``POST /v1/chat/completions`` — ``stream: true`` sends server-sent events
  ``data: {json}\\n\\n`` and a final ``data: [DONE]\\n\\n``, as OpenAI does; usage in the response,
  and in a last chunk with ``stream_options.include_usage``.
* ``GET /v1/models``, ``GET /health`` (liveness), ``GET /ready`` and ``GET /health/ready``,
  ``GET /metrics`` (Prometheus).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from mtx.errors import MtxError
from mtx.serving import protocol
from mtx.serving.chat import ChatTemplate, chat_tokenizer
from mtx.serving.engine import Engine, EngineBusy, EngineDraining, Event
from mtx.serving.metrics import ServingMetrics
from mtx.serving.protocol import (DEFAULT_COMPLETION_MAX_TOKENS, SSE_DONE, ApiError, ChatRequest, CompletionRequest,
                                  Envelope, Prepared, SamplingRequest, api_error, sse)
from mtx.tokenizer import encode_checked


# -- the routes' state ---------------------------------------------------------------------------------
class OpenAIServer:
    """The state behind the routes: one engine, its generator, the served model name, the chat
    template and the metrics."""

    def __init__(self, engine: Engine, model_name: str, folder: Path | None, metrics: ServingMetrics) -> None:
        self.engine = engine
        self.generator = engine.generator
        self.model_name = model_name
        self.metrics = metrics
        self.created = int(time.time())
        self.chat_template = ChatTemplate.for_folder(folder) if folder is not None else ChatTemplate.default()
        self._chat_tokenizer = None if self.generator.tokenizer is None else chat_tokenizer(
            self.generator.tokenizer, self.chat_template.special_tokens)
        metrics.bind(engine)

    def position_limit(self) -> int | None:
        """Positions a request may reach (prompt + new tokens), or None where unbounded."""
        return self.generator.backend.position_limit()

    # -- request body -> Prepared (tokenising here, validating in protocol) ---------------------------
    def _prepare(self, req: SamplingRequest, ids: list[int], max_tokens: int | None, default_max: int | None,
                 prompt_field: str) -> Prepared:
        return protocol.prepare(req, ids, max_tokens=max_tokens, default_max=default_max, prompt_field=prompt_field,
                                position_limit=self.position_limit(), eos_token_ids=self.generator.eos_token_ids)

    def prepare_completion(self, req: CompletionRequest) -> Prepared:
        protocol.check_model(req, self.model_name)
        prompt = protocol.completion_prompt(req)
        try:
            ids = self.generator.to_ids(prompt)
        except MtxError as e:
            raise api_error(e, "prompt") from None
        return self._prepare(req, ids, req.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS, "prompt")

    def prepare_chat(self, req: ChatRequest) -> Prepared:
        protocol.check_model(req, self.model_name)
        messages = protocol.chat_messages(req, self.generator.tokenizer is not None)
        try:
            text = self.chat_template.render(messages, add_generation_prompt=True)
            ids = encode_checked(self._chat_tokenizer, text, "chat prompt", add_special_tokens=False)
            ids = self.generator.to_ids(ids, "chat prompt")
        except MtxError as e:
            raise api_error(e, "messages") from None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        return self._prepare(req, ids, max_tokens, None, "messages")

    # -- running ------------------------------------------------------------------------------------
    def submit(self, prep: Prepared) -> tuple[Any, asyncio.Queue[Event]]:
        """Submit ``prep`` to the engine; its events arrive on the returned queue (this event loop's)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def sink(ev: Event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, ev)
            except RuntimeError:  # the event loop is gone (server stopped): nobody is listening
                pass

        try:
            handle = self.engine.submit(prep.ids, prep.max_tokens, sink=sink, want_text=self.generator.tokenizer
                                        is not None, **prep.options)
        except (EngineBusy, EngineDraining, MtxError) as e:
            err = api_error(e, "max_tokens")
            self.metrics.rejected.labels(status=str(err.status)).inc()
            raise err from None
        return handle, events

    async def run(self, request: Request, body: SamplingRequest, prep: Prepared, chat: bool) -> Response:
        """Submit ``prep`` and answer: an SSE stream, or one JSON object when the request finishes.

        The text is the engine's (the core's one detokenizer: complete characters only, ending before
        the first stop string); this layer only wraps it."""
        handle, events = self.submit(prep)
        env = Envelope(self.model_name, chat, body.stream, body.include_usage)
        if body.stream:
            return StreamingResponse(self._stream(handle, events, env, prep),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            reason, text, n_tokens = await self._collect(request, events)
        finally:
            handle.cancel()  # no-op once finished; frees the row if the client went away
        if reason == "error":
            raise ApiError(500, "the engine failed on this request", None, "server_error")
        return JSONResponse(env.wrap([env.choice(text, reason)], protocol.usage(len(prep.ids), n_tokens)))

    async def _collect(self, request: Request, events: asyncio.Queue[Event]) -> tuple[str, str, int]:
        """(finish reason, text, tokens) of a request ("cancelled" once the client is gone)."""
        parts: list[str] = []
        n_tokens = 0
        while True:
            try:
                ev = await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return "cancelled", "".join(parts), n_tokens
                continue
            parts.append(ev.text)
            if ev.kind == "token":
                n_tokens += 1
            else:
                return ev.finish_reason or "error", "".join(parts), n_tokens

    async def _stream(self, handle: Any, events: asyncio.Queue[Event], env: Envelope,
                      prep: Prepared) -> AsyncIterator[str]:
        """The SSE events of one request; always ends with ``[DONE]`` and cancels ``handle``."""
        n_tokens = 0
        try:
            if env.chat:
                yield sse(env.wrap([env.choice(None, None, role=True)]))
            while True:
                ev = await events.get()
                if ev.kind == "token":
                    n_tokens += 1
                    if ev.text:
                        yield sse(env.wrap([env.choice(ev.text, None)]))
                    continue
                reason = ev.finish_reason
                if reason == "error":
                    yield sse(ApiError(500, f"the engine failed on this request: {ev.message}", None,
                                       "server_error").body())
                    break
                if env.chat:
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


def add_routes(app: FastAPI, get_server: Callable[[], OpenAIServer]) -> FastAPI:
    """Mount the OpenAI routes on ``app``; ``get_server()`` returns the :class:`OpenAIServer` of this
    process (a replica's own under Ray Serve)."""

    @app.exception_handler(ApiError)
    @app.exception_handler(RequestValidationError)
    async def _error(request: Request, exc: Exception) -> JSONResponse:
        return api_error(exc).response()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        server = get_server()
        return await server.run(request, body, server.prepare_completion(body), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        server = get_server()
        return await server.run(request, body, server.prepare_chat(body), chat=True)

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
