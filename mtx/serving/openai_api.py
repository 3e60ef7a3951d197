"""The OpenAI routes over an :class:`Engine`; the protocol itself (request bodies, validation,
response envelopes, errors) is mtx.serving.protocol.

Kept free of any server process so that ``mtx serve`` (uvicorn, mtx.serving.http) and the Ray Serve
deployment (mtx.serving.ray_app) mount the same FastAPI routes.

* ``POST /v1/completions``, ``POST /v1/chat/completions`` — ``stream: true`` sends server-sent events
  ``data: {json}\\n\\n`` and a final ``data: [DONE]\\n\\n``, as OpenAI does; usage in the response,
  and in a last chunk with ``stream_options.include_usage``. ``n`` choices are ``n`` engine requests
  (:class:`Choices`); their stream chunks carry the choice's ``index``. Structured output and tools
  (mtx.serving.tools): the grammar is compiled once per request and each choice matches with its
  own copy; each choice reads its own output for tool calls; logprobs cover the content tokens
  (none for the tool-call tokens, from ``[TOOL_CALLS]`` on).
* ``POST /tokenize``, ``POST /detokenize`` (vLLM's shapes): the prompt ids a completion or chat
  completion would get (the same preparation: :meth:`OpenAIServer.completion_ids`,
  :meth:`OpenAIServer.chat_prompt`, tools included), and the text of ids; prepared on the worker pool
  like the others.
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
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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
from mtx.serving.logprobs import TokenTexts, chat_logprobs, completion_logprobs
from mtx.serving.metrics import ServingMetrics
from mtx.serving.protocol import (DEFAULT_BODY_TIMEOUT_S, DEFAULT_COMPLETION_MAX_TOKENS, DEFAULT_MAX_REQUEST_BYTES,
                                  SSE_DONE, ApiError, ChatRequest, CompletionRequest, DetokenizeRequest, Envelope,
                                  Prepared, SamplingRequest, TokenizeChatRequest, api_error, sse)
from mtx.serving.tools import TOOL_CALLS_TOKEN, ToolOutput, ToolRequest, response_grammar, tool_request
from mtx.tokenizer import encode_checked

log = logging.getLogger("mtx.serving")
#: Worker threads that parse, tokenize and render requests (off the event loop).
PREPARE_THREADS = 4
#: A request's event sink: (choice index, event).
Sink = Callable[[int, Event], None]


# -- the routes' state ---------------------------------------------------------------------------------
def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[[], None]) -> None:
    try:
        loop.call_soon_threadsafe(fn)
    except RuntimeError:  # the event loop is gone (server stopped)
        pass


class Choices:
    """The engine requests of one API request, one per choice (``handles[i]`` is choice i)."""

    def __init__(self, handles: list[RequestHandle]) -> None:
        self.handles = handles

    def cancel(self) -> None:
        """Cancel every choice (idempotent; a finished one is not affected)."""
        for h in self.handles:
            h.cancel()


@dataclass
class _Choice:
    """What a response has of one choice so far: text ``parts``, ``tokens`` generated, the finish
    ``reason``, the (token, logprobs) ``steps`` (when asked) and, streaming completions, the next
    ``text_offset``. With tools: its own :class:`ToolOutput` and ``content_steps``, the steps before
    the ``[TOOL_CALLS]`` token (None until it comes)."""

    parts: list[str] = field(default_factory=list)
    tokens: int = 0
    reason: str | None = None
    steps: list[tuple[int, Any]] = field(default_factory=list)
    offset: int = 0
    tools: ToolOutput | None = None
    content_steps: int | None = None

    @staticmethod
    def all_of(prep: Prepared) -> list[_Choice]:
        """The ``n`` choices of ``prep``, each reading its own output for tool calls where ``prep`` asks."""
        return [_Choice(tools=ToolOutput(*prep.tool_calls) if prep.tool_calls is not None else None)
                for _ in range(prep.n)]

    def push_tools(self, ev: Event) -> tuple[str, list[dict[str, Any]]]:
        """Pass ``ev`` to the choice's :class:`ToolOutput`: its (content delta, tool call deltas); ("", [])
        without tools."""
        if self.tools is None:
            return "", []
        out = self.tools.push(ev.token, ev.text)
        if self.tools.parser is not None and self.content_steps is None:
            self.content_steps = len(self.steps)
        return out


class _StreamResponse(StreamingResponse):
    """An SSE response that cancels its request however it ends, even if its body never started."""

    def __init__(self, handle: Choices, *args: Any, **kwargs: Any) -> None:
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
        self.token_texts = TokenTexts(self.generator.tokenizer)
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
        ``guided_*``) here, on the worker thread: 400 naming the field when it is invalid. The compiled
        :class:`~mtx.runtime.grammar.Constraint` is shared by the ``n`` choices, each of which matches
        with its own copy (``Constraint.start``)."""
        prep = protocol.prepare(req, ids, max_tokens=max_tokens, default_max=default_max, prompt_field=prompt_field,
                                position_limit=self.position_limit(), eos_token_ids=self.generator.eos_token_ids,
                                max_n=self.engine.max_queue)
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

    def completion_ids(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        """The prompt ids of a completion (and of ``/tokenize``'s text): the one path (400 naming ``prompt``)."""
        try:
            return self._ids(prompt, "prompt", self.generator.tokenizer, add_special_tokens=add_special_tokens)
        except MtxError as e:
            raise api_error(e, "prompt") from None

    def chat_prompt(self, req: ChatRequest, add_generation_prompt: bool = True
                    ) -> tuple[list[int], ToolRequest | None]:
        """The prompt ids of a chat request and its checked tools (None: none): the one chat prompt path,
        of chat completions and of ``/tokenize``'s messages alike (the tools are in the prompt; 400
        naming the field)."""
        protocol.check_model(req, self.model_name)
        messages = protocol.chat_messages(req, self.chat is not None)
        try:
            tools: ToolRequest | None = tool_request(req, self.tool_calls_id, self.v11_calls)
        except MtxError as e:
            raise api_error(e, "tools") from None
        try:
            assert self.chat is not None  # chat_messages refuses a request without a tokenizer
            prompt = self.chat.encode(messages, add_generation_prompt, tools=tools.tools if tools is not None else None)
            return self.generator.to_ids(prompt, "chat prompt"), tools
        except MtxError as e:
            raise api_error(e, "messages") from None

    def prepare_completion(self, req: CompletionRequest) -> Prepared:
        protocol.check_model(req, self.model_name)
        ids = self.completion_ids(protocol.completion_prompt(req))
        return self._prepare(req, ids, req.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS, "prompt")

    def prepare_chat(self, req: ChatRequest) -> Prepared:
        ids, tools = self.chat_prompt(req)
        prep = self._prepare(req, ids, protocol.chat_max_tokens(req), None, "messages",
                             tools.grammar if tools is not None else None)
        if tools is not None and tools.parses:
            assert self.tool_calls_id is not None  # tool_request refuses tools the model cannot call
            prep = dataclasses.replace(prep, tool_calls=(self.tool_calls_id, tools.parallel))
        return prep

    def submit(self, prep: Prepared, sink: Sink) -> Choices:
        """Submit ``prep``'s ``n`` choices to the engine (any thread); choice i's events go to
        ``sink(i, event)``. All or none: if one is refused, those already submitted are cancelled."""
        handles: list[RequestHandle] = []
        try:
            for i in range(prep.n):
                handles.append(self.engine.submit(prep.ids, prep.max_tokens, sink=functools.partial(sink, i),
                                                  want_text=self.generator.tokenizer is not None,
                                                  **prep.choice_options(i)))
        except (EngineBusy, EngineDraining, MtxError) as e:
            Choices(handles).cancel()
            raise api_error(e, "max_tokens") from None
        return Choices(handles)

    # -- /tokenize, /detokenize (on a worker thread) ---------------------------------------------------
    def tokenize(self, raw: bytes) -> dict[str, Any]:
        """``POST /tokenize``: ``{count, max_model_len, tokens}`` of a text prompt or chat messages."""
        body = protocol.parse_tokenize(raw)
        if isinstance(body, TokenizeChatRequest):
            if body.add_special_tokens:
                raise ApiError(400, "add_special_tokens: must be false for messages (the chat template writes "
                               "the special tokens)", "add_special_tokens")
            ids, _ = self.chat_prompt(body, body.add_generation_prompt)
        else:
            protocol.check_model(body, self.model_name)
            if self.generator.tokenizer is None:
                raise ApiError(400, "prompt: this export has no tokenizer", "prompt")
            ids = self.completion_ids(body.prompt, body.add_special_tokens)
        return protocol.tokenize_response(ids, self.position_limit())

    def detokenize(self, raw: bytes) -> dict[str, Any]:
        """``POST /detokenize``: ``{prompt}``, the text of ``tokens`` as generated text reads (special
        tokens skipped)."""
        body = protocol.parse_body(raw, DetokenizeRequest)
        protocol.check_model(body, self.model_name)
        if self.generator.tokenizer is None:
            raise ApiError(400, "tokens: this export has no tokenizer", "tokens")
        vocab = self.generator.config.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"tokens: token id {bad[0]} is out of range for a vocabulary of {vocab}", "tokens")
        return {"prompt": self.generator.decode(body.tokens)}

    def _admit(self, raw: bytes, chat: bool, sink: Sink) -> tuple[SamplingRequest, Prepared, Choices]:
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

    def _check_preparing(self) -> None:
        if self._preparing >= self.max_preparing:
            raise ApiError(429, f"{self._preparing} requests are being prepared; retry later", None,
                           "rate_limit_error", "queue_full")

    async def handle_json(self, request: Request, work: Callable[[bytes], dict[str, Any]]) -> Response:
        """A POST answered by ``work(body)`` (run on the worker pool, counted as a request being prepared)."""
        raw = await self.read_body(request)
        self._check_preparing()
        loop = asyncio.get_running_loop()
        self._preparing += 1
        future = self._pool.submit(work, raw)
        future.add_done_callback(lambda _: _call_soon(loop, self._prepared))
        return JSONResponse(await asyncio.wrap_future(future))

    async def handle(self, request: Request, chat: bool) -> Response:
        """One POST of a completion (``chat``: a chat completion): read, prepare off the loop, run."""
        raw = await self.read_body(request)
        self._check_preparing()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

        def sink(index: int, ev: Event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, (index, ev))
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

    async def run(self, request: Request, body: SamplingRequest, prep: Prepared, handle: Choices,
                  events: asyncio.Queue[tuple[int, Event]], chat: bool) -> Response:
        """Answer a submitted request: an SSE stream, or one JSON object when every choice finished.

        The text is the engine's (the core's one detokenizer: complete characters only, ending before
        the first stop string); this layer only wraps it."""
        env = Envelope(self.model_name, chat, body.stream, body.include_usage)
        if body.stream:
            return _StreamResponse(handle, self._stream(handle, events, env, prep),
                                   media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        watcher = asyncio.create_task(_on_disconnect(request, lambda: events.put_nowait((-1, _GONE))))
        try:
            choices = await self._collect(events, prep)
        finally:
            watcher.cancel()
            handle.cancel()  # no-op once finished; frees the rows if the client went away
        if any(c.reason == "error" for c in choices):
            raise ApiError(500, "the engine failed on this request", None, "server_error")
        out = [self._whole_choice(env, i, c) for i, c in enumerate(choices)]
        return JSONResponse(env.wrap(out, protocol.usage(len(prep.ids), sum(c.tokens for c in choices))))

    def _whole_choice(self, env: Envelope, index: int, c: _Choice) -> dict[str, Any]:
        """Choice ``index`` of a whole response. With tools: content and parsed ``tool_calls``
        (finish reason "tool_calls" where calls parsed and it stopped), and the logprobs of the content
        tokens only (those before ``[TOOL_CALLS]``; all tokens where the call text did not parse and is
        returned as content)."""
        if c.tools is None:
            return env.choice("".join(c.parts), c.reason, index=index, logprobs=self._logprobs(env, c, c.steps))
        content, calls = c.tools.message()
        steps = c.steps[:c.content_steps] if calls and c.content_steps is not None else c.steps
        reason = "tool_calls" if calls and c.reason == "stop" else c.reason
        return env.call_choice(content, calls, reason, index=index, logprobs=self._logprobs(env, c, steps))

    def _logprobs(self, env: Envelope, choice: _Choice, steps: list[tuple[int, Any]]) -> dict[str, Any] | None:
        """The ``logprobs`` object of ``steps`` of ``choice`` (None when not asked; completions: its
        ``text_offset`` continues from the choice's last one)."""
        if not steps:
            return None
        if env.chat:
            return chat_logprobs(self.token_texts, steps)
        obj, choice.offset = completion_logprobs(self.token_texts, steps, choice.offset)
        return obj

    @staticmethod
    async def _collect(events: asyncio.Queue[tuple[int, Event]], prep: Prepared) -> list[_Choice]:
        """Every choice to its end ("cancelled" for those unfinished as soon as the client is gone)."""
        choices = _Choice.all_of(prep)
        left = prep.n
        while left:
            index, ev = await events.get()
            if ev is _GONE:
                for c in choices:
                    c.reason = c.reason or "cancelled"
                return choices
            c = choices[index]
            c.parts.append(ev.text)
            c.push_tools(ev)
            if ev.kind == "token":
                c.tokens += 1
                if ev.logprobs is not None:
                    c.steps.append((int(ev.token), ev.logprobs))  # type: ignore[arg-type]
            else:
                c.reason = ev.finish_reason or "error"
                left -= 1
        return choices

    async def _stream(self, handle: Choices, events: asyncio.Queue[tuple[int, Event]], env: Envelope,
                      prep: Prepared) -> AsyncIterator[str]:
        """The SSE events of one request (its choices' chunks as they come, each with its ``index``);
        always ends with ``[DONE]`` and cancels ``handle``. With tools, a choice's chunks carry content
        or ``tool_calls`` deltas, and logprobs with its content tokens only (none from ``[TOOL_CALLS]`` on)."""
        choices = _Choice.all_of(prep)
        left = prep.n
        try:
            if env.chat:
                for i in range(prep.n):
                    yield sse(env.wrap([env.choice(None, None, role=True, index=i)]))
            while left:
                i, ev = await events.get()
                c = choices[i]
                if ev.kind == "token":
                    c.tokens += 1
                    content, deltas = c.push_tools(ev)
                    lp = None
                    if ev.logprobs is not None and (c.tools is None or c.tools.parser is None):
                        lp = self._logprobs(env, c, [(int(ev.token), ev.logprobs)])  # type: ignore[arg-type]
                    if c.tools is not None:
                        if content or deltas or lp is not None:
                            yield sse(env.wrap([env.call_choice(content, deltas, None, index=i, logprobs=lp)]))
                    elif ev.text or lp is not None:
                        yield sse(env.wrap([env.choice(ev.text, None, index=i, logprobs=lp)]))
                    continue
                left -= 1
                reason = ev.finish_reason
                if reason == "error":
                    yield sse(ApiError(500, f"the engine failed on this request: {ev.message}", None,
                                       "server_error").body())
                    break
                if c.tools is not None:
                    content, deltas = c.push_tools(ev)
                    if content or deltas:
                        yield sse(env.wrap([env.call_choice(content, deltas, None, index=i)]))
                    if reason == "stop" and c.tools.calls():
                        reason = "tool_calls"
                    yield sse(env.wrap([env.choice(None, reason, index=i)]))
                elif env.chat:
                    if ev.text:
                        yield sse(env.wrap([env.choice(ev.text, None, index=i)]))
                    yield sse(env.wrap([env.choice(None, reason, index=i)]))
                else:
                    yield sse(env.wrap([env.choice(ev.text, reason, index=i)]))
            if not left and env.include_usage:
                yield sse(env.wrap([], protocol.usage(len(prep.ids), sum(c.tokens for c in choices))))
            yield SSE_DONE
        finally:
            handle.cancel()  # the client went away (or we are done): free the rows now

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

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        server = get_server()
        return await server.handle_json(request, server.tokenize)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        server = get_server()
        return await server.handle_json(request, server.detokenize)

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
