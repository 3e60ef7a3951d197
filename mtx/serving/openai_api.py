"""The OpenAI routes over an :class:`Engine`: request models, text assembly, responses, errors.

Kept free of any server process so that ``mtx serve`` (uvicorn, mtx.serving.http) and the Ray Serve
deployment (mtx.serving.ray_app) mount the same FastAPI routes.

* ``POST /v1/completions``, ``POST /v1/chat/completions`` — ``stream: true`` sends server-sent events
  ``data: {json}\\n\\n`` and a final ``data: [DONE]\\n\\n``, as OpenAI does; usage in the response,
  and in a last chunk with ``stream_options.include_usage``.
* ``GET /v1/models``, ``GET /health`` (liveness), ``GET /ready`` and ``GET /health/ready``,
  ``GET /metrics`` (Prometheus).
* Errors are ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad request, 429 when the
  waiting queue is full, 503 while shutting down.

Sampling fields: ``temperature`` (OpenAI's default 1), ``top_p``, ``seed``, ``stop``, ``max_tokens``
(completions default 16; chat default: up to 256 or the positions left), and the vLLM-style
extensions ``top_k``, ``repetition_penalty``, ``stop_token_ids``, ``ignore_eos``. Unknown fields are
ignored; known fields of the wrong type are refused.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict

from mtx.errors import MtxError
from mtx.runtime.detokenizer import TextStream
from mtx.runtime.generator import Generator
from mtx.serving.chat import ChatTemplate, chat_tokenizer
from mtx.serving.engine import Engine, EngineBusy, EngineDraining, Event
from mtx.serving.metrics import ServingMetrics
from mtx.tokenizer import encode_checked

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's legacy completions default
DEFAULT_CHAT_MAX_TOKENS = 256
#: Python parameter names of mtx errors -> the request field they concern.
FIELD_OF_PARAM = {"max_new_tokens": "max_tokens", "prompt": "prompt", "max_position": "max_tokens",
                  "cache_capacity": "max_tokens"}


# -- request bodies ---------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Union[bool, int, None] = None
    user: str | None = None
    # extensions (vLLM's names)
    top_k: int | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: str
    content: Union[str, list[TextPart], None] = None
    name: str | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None


# -- errors -------------------------------------------------------------------------------------------
class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content={"error": {
            "message": self.message, "type": self.type, "param": self.param, "code": self.code}})


def _from_mtx(e: MtxError, default_param: str | None = None) -> ApiError:
    param = next((FIELD_OF_PARAM.get(p, p) for p in e.params), default_param)
    return ApiError(400, str(e), param)


# -- text -----------------------------------------------------------------------------------------------
class _Reply:
    """A request's generated tokens as OpenAI text (a :class:`TextStream`: the text ends before the first
    stop string, and no text is sent that may turn out to start one or to be half a UTF-8 character),
    and their count for ``usage``."""

    def __init__(self, generator: Generator, stop: list[str]) -> None:
        self.stream = TextStream(generator.tokenizer, stop)
        self.tokens = 0

    def push(self, token: int) -> str:
        self.tokens += 1
        return self.stream.push(token)[0]

    def finish(self) -> str:
        return self.stream.finish()

    @property
    def text(self) -> str:
        return self.stream.text


@dataclass
class _Prepared:
    ids: list[int]
    max_tokens: int
    options: dict[str, Any]
    stop: list[str]


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

    # -- limits -------------------------------------------------------------------------------------
    def position_limit(self) -> int | None:
        """Positions a request may reach (prompt + new tokens), or None where unbounded."""
        return self.generator.backend.position_limit()

    # -- parsing ------------------------------------------------------------------------------------
    def _check_model(self, req: _Sampling) -> None:
        if req.model != self.model_name:
            raise ApiError(400, f"model: unknown model {req.model!r}; this server serves {self.model_name!r}",
                           "model", code="model_not_found")

    def _common(self, req: _Sampling, ids: list[int], default_max: int | None,
                max_tokens: int | None, prompt_field: str) -> _Prepared:
        left = self.position_limit()
        if left is not None and len(ids) > left:
            raise ApiError(400, f"{prompt_field}: the prompt of {len(ids)} tokens exceeds the {left} positions "
                           f"of this model", prompt_field, code="context_length_exceeded")
        if req.n != 1:
            raise ApiError(400, f"n: only n = 1 is supported, got {req.n}", "n")
        if req.logprobs not in (None, False, 0):
            raise ApiError(400, "logprobs: not supported by this server", "logprobs")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(req, name) != 0:
                raise ApiError(400, f"{name}: not supported (use repetition_penalty)", name)
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise ApiError(400, "stop: up to 4 non-empty strings", "stop")
        if max_tokens is None:
            max_tokens = default_max if default_max is not None else DEFAULT_CHAT_MAX_TOKENS
            if left is not None and default_max is None:
                max_tokens = max(0, min(max_tokens, left - len(ids)))
        elif max_tokens < 0:
            raise ApiError(400, f"max_tokens must be an integer >= 0, got {max_tokens}", "max_tokens")
        stop_ids = req.stop_token_ids
        if req.ignore_eos:
            stop_ids = list(stop_ids or [])
        elif stop_ids is not None:
            stop_ids = list(self.generator.eos_token_ids) + list(stop_ids)
        options = dict(temperature=1.0 if req.temperature is None else req.temperature,
                       top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
                       repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                       seed=req.seed, stop=stop or None, stop_token_ids=stop_ids)
        return _Prepared(ids, max_tokens, options, stop)

    def prepare_completion(self, req: CompletionRequest) -> _Prepared:
        self._check_model(req)
        prompt: Any = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ApiError(400, f"prompt: one prompt per request is supported, got {len(prompt)}", "prompt")
            prompt = prompt[0]
        if req.echo or req.suffix or (req.best_of not in (None, 1)):
            raise ApiError(400, "echo, suffix and best_of are not supported", "echo")
        try:
            ids = self.generator.to_ids(prompt)
        except MtxError as e:
            raise _from_mtx(e, "prompt") from None
        return self._common(req, ids, DEFAULT_COMPLETION_MAX_TOKENS, req.max_tokens, "prompt")

    def prepare_chat(self, req: ChatRequest) -> _Prepared:
        self._check_model(req)
        if not req.messages:
            raise ApiError(400, "messages: give at least one message", "messages")
        if self.generator.tokenizer is None:
            raise ApiError(400, "messages: this export has no tokenizer.json; use /v1/completions with token ids",
                           "messages")
        messages = []
        for m in req.messages:
            content = m.content if isinstance(m.content, str) or m.content is None else \
                "".join(p.text for p in m.content)
            messages.append({"role": m.role, "content": content or ""})
        try:
            text = self.chat_template.render(messages, add_generation_prompt=True)
            ids = encode_checked(self._chat_tokenizer, text, "chat prompt", add_special_tokens=False)
            ids = self.generator.to_ids(ids, "chat prompt")
        except MtxError as e:
            raise _from_mtx(e, "messages") from None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        return self._common(req, ids, None, max_tokens, "messages")

    # -- running ------------------------------------------------------------------------------------
    def submit(self, prep: _Prepared) -> tuple[Any, asyncio.Queue[Event]]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def sink(ev: Event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, ev)
            except RuntimeError:  # the event loop is gone (server stopped): nobody is listening
                pass

        try:
            handle = self.engine.submit(prep.ids, prep.max_tokens, sink=sink, **prep.options)
        except EngineBusy as e:
            self.metrics.rejected.labels(status="429").inc()
            raise ApiError(429, str(e), None, "rate_limit_error", "queue_full") from None
        except EngineDraining as e:
            self.metrics.rejected.labels(status="503").inc()
            raise ApiError(503, str(e), None, "service_unavailable", "shutting_down") from None
        except MtxError as e:
            self.metrics.rejected.labels(status="400").inc()
            raise _from_mtx(e, "max_tokens") from None
        return handle, events

    async def run(self, request: Request, body: _Sampling, prep: _Prepared, chat: bool) -> Response:
        """Submit ``prep`` and answer: an SSE stream, or one JSON object when the request finishes."""
        try:
            text = _Reply(self.generator, prep.stop)
        except MtxError as e:
            raise _from_mtx(e, "stop") from None
        handle, events = self.submit(prep)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._stream(handle, events, text, rid, chat, prep, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            reason = await self._collect(request, events, text)
        finally:
            handle.cancel()  # no-op once finished; frees the row if the client went away
        if reason == "error":
            raise ApiError(500, "the engine failed on this request", None, "server_error")
        text.finish()
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": text.text}
        else:
            choice["text"] = text.text
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": self.model_name, "choices": [choice],
                             "usage": self._usage(prep, text)})

    @staticmethod
    def _usage(prep: _Prepared, text: _Reply) -> dict[str, int]:
        return {"prompt_tokens": len(prep.ids), "completion_tokens": text.tokens,
                "total_tokens": len(prep.ids) + text.tokens}

    async def _collect(self, request: Request, events: asyncio.Queue[Event], text: _Reply) -> str:
        while True:
            try:
                ev = await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return "cancelled"
                continue
            if ev.kind == "token":
                text.push(int(ev.token))  # type: ignore[arg-type]
            else:
                return ev.finish_reason or "error"

    async def _stream(self, handle: Any, events: asyncio.Queue[Event], text: _Reply, rid: str, chat: bool,
                      prep: _Prepared, include_usage: bool) -> AsyncIterator[str]:
        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, reason: str | None, role: bool = False) -> str:
            choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": reason}
            if chat:
                d: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
                if delta:
                    d["content"] = delta
                choice["delta"] = d
            else:
                choice["text"] = delta or ""
            obj: dict[str, Any] = {"id": rid, "object": kind, "created": created, "model": self.model_name,
                                   "choices": [choice]}
            if include_usage:
                obj["usage"] = None
            return f"data: {json.dumps(obj)}\n\n"

        try:
            if chat:
                yield chunk(None, None, role=True)
            while True:
                ev = await events.get()
                if ev.kind == "token":
                    delta = text.push(int(ev.token))  # type: ignore[arg-type]
                    if delta:
                        yield chunk(delta, None)
                    continue
                reason = ev.finish_reason
                if reason == "error":
                    err = {"error": {"message": f"the engine failed on this request: {ev.message}",
                                     "type": "server_error", "param": None, "code": None}}
                    yield f"data: {json.dumps(err)}\n\n"
                    break
                tail = text.finish()
                if chat:
                    if tail:
                        yield chunk(tail, None)
                    yield chunk(None, reason)
                else:
                    yield chunk(tail, reason)
                if include_usage:
                    usage = {"id": rid, "object": kind, "created": created, "model": self.model_name,
                             "choices": [], "usage": self._usage(prep, text)}
                    yield f"data: {json.dumps(usage)}\n\n"
                break
            yield "data: [DONE]\n\n"
        finally:
            handle.cancel()  # the client went away (or we are done): free the row now


def add_routes(app: FastAPI, get_server: Any) -> FastAPI:
    """Mount the OpenAI routes on ``app``; ``get_server()`` returns the :class:`OpenAIServer` of this
    process (a replica's own under Ray Serve)."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        e = errs[0] if errs else {}
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        field = loc[0] if loc else None
        if e.get("type") == "json_invalid":
            message, field = f"request body is not valid JSON ({e.get('ctx', {}).get('error', e.get('msg'))})", None
        elif e.get("type") == "model_attributes_type":
            message, field = "request body must be a JSON object", None
        else:
            message = f"{'.'.join(loc) or 'body'}: {e.get('msg', 'invalid value')}"
        return ApiError(400, message, field).response()

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
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "mtx", "max_model_len": server.position_limit()}]}

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
