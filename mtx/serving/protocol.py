"""The OpenAI protocol, free of any engine or server: request bodies, their validation into engine
options, response envelopes, and OpenAI's error JSON.

* Requests: :class:`CompletionRequest`, :class:`ChatRequest` (pydantic, strict types; unknown fields
  ignored). :func:`prepare` turns a body and its prompt ids into a :class:`Prepared` request — the
  keyword options of ``Engine.submit`` — or raises :class:`ApiError`.
* Responses: every response and stream chunk is built by :meth:`Envelope.wrap` (``id``, ``object``,
  ``created``, ``model``, ``choices``, ``usage``); :func:`sse` frames one for server-sent events.
* Errors: ``{"error": {"message", "type", "param", "code"}}`` built by :meth:`ApiError.body` only;
  :func:`api_error` maps an exception to its status: 400 for a bad request (a validation error, an
  :class:`MtxError`), 429 when the waiting queue is full, 503 while shutting down.
* Limits (each bounds the work one request can cause before it is refused): the body's bytes
  (:data:`DEFAULT_MAX_REQUEST_BYTES`, 413), JSON nesting (Python's recursion limit, 400),
  :data:`MAX_MESSAGES` messages and as many content parts, :data:`MAX_STOP_STRINGS` stop strings of
  at most :data:`MAX_STOP_CHARS` characters, and the chat roles of :data:`CHAT_ROLES`.
  :func:`parse_body` applies them before pydantic sees the body.

Fields (OpenAI's meanings unless said):

* Supported: ``model``, ``temperature`` (default 1), ``top_p``, ``seed``, ``stop``, ``max_tokens``
  (completions default 16; chat default: up to 256 or the positions left), ``max_completion_tokens``
  (chat; an alias of ``max_tokens``: both given and different is a 400), ``presence_penalty`` and
  ``frequency_penalty`` (in [-2, 2]; ``logit[j] -= frequency_penalty * count[j] + presence_penalty *
  (count[j] > 0)`` over the generated tokens), ``n`` (1 to the server's ``--max-queue``), ``stream``,
  ``stream_options.include_usage``, ``logprobs`` (chat: true/false with ``top_logprobs`` 0..20;
  completions: 0..20), ``user`` (accepted, unused), and the vLLM-style extensions ``top_k``,
  ``repetition_penalty``, ``stop_token_ids``, ``ignore_eos``, ``speculative``.
* Structured output and tools, checked in :mod:`mtx.serving.tools`: ``response_format``
  (``json_object``, ``json_schema``), vLLM's ``guided_json`` / ``guided_regex`` / ``guided_choice`` /
  ``guided_grammar`` (at most one of these), ``tools``, ``tool_choice``, ``parallel_tool_calls``
  (chat), and in messages a ``tool`` message's ``tool_call_id`` and an assistant's ``tool_calls``.
* ``n``: the choices are separate requests in the engine (the prefix cache shares their prompt).
  Choice i samples with ``TokenRng(seed, stream=i)`` — with a ``seed`` exactly row i of
  ``generate([prompt] * n, seed=seed)`` offline; without one each choice draws its own random seed.
  Each choice runs its own copy of the grammar's matcher. Stream chunks carry their choice's
  ``index``; usage counts the prompt once and every choice's tokens.
* ``logprobs``: log-softmax of the raw logits before penalties, temperature, filters and any grammar
  mask (OpenAI's definition), in OpenAI's shapes (:mod:`mtx.serving.logprobs`); computed only when
  asked. With tools, they cover the content tokens only (OpenAI's ``logprobs.content``): the tokens
  from ``[TOOL_CALLS]`` on, which become ``tool_calls``, have none (a call-only choice: null; call
  text that does not parse is content, with its tokens' entries).
* Refused with 400: ``echo``, ``suffix``, ``best_of`` other than 1, several completion prompts,
  ``logprobs``/``top_logprobs`` above 20, ``top_logprobs`` without ``logprobs: true``; an invalid or
  too large grammar or schema, more than one of ``response_format`` / ``guided_*``, a forced tool call
  with one of them, and ``tools`` for a tokenizer without ``[TOOL_CALLS]`` (or with Mistral's v11
  call format), each naming its field.
* Refused too: a non-empty ``logit_bias`` (not implemented; it would change the output) and the
  deprecated ``functions`` / ``function_call`` (use ``tools``).
* Ignored: unknown fields (OpenAI platform fields such as ``metadata``, ``store``, ``service_tier``).
  Known fields of the wrong type are refused.

Also ``POST /tokenize`` and ``POST /detokenize`` (vLLM's shapes): :class:`TokenizeCompletionRequest`,
:class:`TokenizeChatRequest` (its ``tools`` are in the prompt as a chat completion's are),
:class:`DetokenizeRequest`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, Union

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from mtx.errors import MtxError
from mtx.serving.engine import EngineBusy, EngineDraining

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's legacy completions default
DEFAULT_CHAT_MAX_TOKENS = 256
#: Python parameter names of mtx errors -> the request field they concern.
FIELD_OF_PARAM = {"max_new_tokens": "max_tokens", "prompt": "prompt", "max_position": "max_tokens",
                  "cache_capacity": "max_tokens"}
#: The most alternatives ``logprobs`` (completions) and ``top_logprobs`` (chat) may ask for.
MAX_TOP_LOGPROBS = 20
#: The last event of every stream.
SSE_DONE = "data: [DONE]\n\n"
#: Bytes a request body may have (``mtx serve --max-request-bytes``): 2 MiB holds a 128K-token prompt
#: as token ids, and parses (json.loads, on a worker thread but holding the GIL) in well under 100 ms.
DEFAULT_MAX_REQUEST_BYTES = 2 * 1024 * 1024
#: Seconds a client may take to send its request body (``mtx serve --body-timeout``; then 408).
DEFAULT_BODY_TIMEOUT_S = 30.0
#: Messages of one chat request, and text parts over all its messages.
MAX_MESSAGES = 2048
#: OpenAI's limit on stop strings, and mtx's on each one's length (matching is O(length^2) per token).
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 1024
#: The chat roles accepted (OpenAI's, less the deprecated "function").
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
#: Roles whose ``content`` may be null (OpenAI: an assistant message that only calls tools).
NULL_CONTENT_ROLES = ("assistant",)


# -- request bodies ---------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class SamplingRequest(_Strict):
    """The fields common to both routes."""

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
    # known, not implemented, and each would change the output: refused rather than ignored
    logit_bias: dict[str, float] | None = None
    functions: list[Any] | None = None
    function_call: Union[str, dict[str, Any], None] = None
    # extensions (vLLM's names)
    top_k: int | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    # prompt-lookup speculative decoding: {"method": "ngram", "num_tokens": k} (vLLM's field names where
    # it has them: num_speculative_tokens, prompt_lookup_max, prompt_lookup_min)
    speculative: dict[str, Any] | None = None
    # structured output (mtx.serving.tools): OpenAI's response_format, and vLLM's guided decoding fields
    response_format: dict[str, Any] | None = None
    guided_json: Union[str, dict[str, Any], None] = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk (and every chunk carries ``usage``)."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingRequest):
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
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool result's call


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: bool | None = None
    top_logprobs: int | None = None


class TokenizeCompletionRequest(_Strict):
    """``POST /tokenize`` of a text (vLLM's shape)."""

    model: str
    prompt: str
    add_special_tokens: bool = True


class TokenizeChatRequest(ChatRequest):
    """``POST /tokenize`` of chat messages (vLLM's shape): the chat prompt a chat completion would get.
    ``add_special_tokens`` must be false (the template writes the special tokens)."""

    add_generation_prompt: bool = True
    add_special_tokens: bool = False


class DetokenizeRequest(_Strict):
    """``POST /detokenize`` (vLLM's shape)."""

    model: str
    tokens: list[int]


_T = TypeVar("_T", bound=BaseModel)


# -- errors -------------------------------------------------------------------------------------------
class ApiError(Exception):
    """An HTTP error in OpenAI's shape; :meth:`body` is the only builder of the error JSON."""

    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content=self.body())


def api_error(exc: Exception, param: str | None = None) -> ApiError:
    """The :class:`ApiError` answering ``exc``; ``param`` is the field blamed where ``exc`` names none.

    EngineBusy -> 429, EngineDraining -> 503, MtxError and RequestValidationError -> 400; an ApiError is
    returned as is; anything else is a 500."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, EngineBusy):
        return ApiError(429, str(exc), None, "rate_limit_error", "queue_full")
    if isinstance(exc, EngineDraining):
        return ApiError(503, str(exc), None, "service_unavailable", "shutting_down")
    if isinstance(exc, MtxError):
        return ApiError(400, str(exc), next((FIELD_OF_PARAM.get(p, p) for p in exc.params), param))
    if isinstance(exc, RequestValidationError):
        return _invalid_body(exc)
    return ApiError(500, str(exc), None, "server_error")


def _invalid_body(exc: RequestValidationError) -> ApiError:
    return validation_error(list(exc.errors()))


def validation_error(errs: Sequence[Any]) -> ApiError:
    """The 400 of pydantic's (or FastAPI's) validation errors: the first one, naming its field."""
    e = errs[0] if errs else {}
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    field_ = loc[0] if loc else None
    if e.get("type") == "json_invalid":
        message, field_ = f"request body is not valid JSON ({e.get('ctx', {}).get('error', e.get('msg'))})", None
    elif e.get("type") in ("model_attributes_type", "model_type", "dict_type"):
        message, field_ = "request body must be a JSON object", None
    else:
        message = f"{'.'.join(loc) or 'body'}: {e.get('msg', 'invalid value')}"
    return ApiError(400, message, field_)


def http_error(status: int, detail: Any, method: str, path: str) -> ApiError:
    """The :class:`ApiError` of a Starlette HTTPException (unknown route, method not allowed, ...)."""
    if status == 404:
        return ApiError(404, f"no route {method} {path}; routes: POST /v1/completions, POST /v1/chat/completions, "
                        "POST /tokenize, POST /detokenize, GET /v1/models, /health, /ready, /metrics", None,
                        "invalid_request_error", "not_found")
    if status == 405:
        return ApiError(405, f"method {method} is not allowed on {path}", None, "invalid_request_error",
                        "method_not_allowed")
    return ApiError(status, str(detail), None, "invalid_request_error" if status < 500 else "server_error")


def too_large(limit: int) -> ApiError:
    """413: a request body over ``limit`` bytes."""
    return ApiError(413, f"the request body exceeds this server's limit of {limit} bytes (--max-request-bytes)",
                    None, "invalid_request_error", "request_too_large")


def parse_body(raw: bytes, model: type[_T]) -> _T:
    """The request ``model`` of body ``raw``; ApiError 400 naming what is wrong.

    Invariant: the count limits (:func:`check_limits`) hold before pydantic validates, so validation
    (which holds the GIL) is linear in a bounded body with no large lists of objects."""
    return _validate(load_body(raw), model)


def parse_tokenize(raw: bytes) -> TokenizeChatRequest | TokenizeCompletionRequest:
    """The body of ``POST /tokenize``: chat messages (``messages`` present) or a text prompt."""
    obj = load_body(raw)
    return _validate(obj, TokenizeChatRequest if "messages" in obj else TokenizeCompletionRequest)


def load_body(raw: bytes) -> dict[str, Any]:
    """The JSON object of body ``raw``, within the count limits (:func:`check_limits`); ApiError 400."""
    try:
        obj = json.loads(raw)
    except RecursionError:
        raise ApiError(400, "request body is not valid JSON (nested too deeply)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON ({e})") from None
    except ValueError as e:  # an integer literal of more than 4300 digits (Python's int conversion limit)
        raise ApiError(400, f"request body is not valid JSON ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(obj, dict):
        raise ApiError(400, "request body must be a JSON object")
    check_limits(obj)
    return obj


def _validate(obj: dict[str, Any], model: type[_T]) -> _T:
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise validation_error(e.errors()) from None
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply") from None


def check_limits(obj: dict[str, Any]) -> None:
    """Refuse a raw body past the count limits: messages and their parts, stop strings, and more than
    one completion prompt (cheap: looks at list lengths only)."""
    messages = obj.get("messages")
    if isinstance(messages, list):
        if len(messages) > MAX_MESSAGES:
            raise ApiError(400, f"messages: at most {MAX_MESSAGES} messages per request, got {len(messages)}",
                           "messages")
        parts = sum(len(m["content"]) for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list))
        if parts > MAX_MESSAGES:
            raise ApiError(400, f"messages: at most {MAX_MESSAGES} content parts per request, got {parts}", "messages")
    stop = obj.get("stop")
    if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
        raise ApiError(400, f"stop: up to {MAX_STOP_STRINGS} strings, got {len(stop)}", "stop")
    prompt = obj.get("prompt")
    if isinstance(prompt, list) and len(prompt) > 1 and isinstance(prompt[0], (str, list)):
        raise ApiError(400, f"prompt: one prompt per request is supported, got {len(prompt)}", "prompt")


# -- validation: request body -> engine options -------------------------------------------------------
@dataclass(frozen=True)
class Prepared:
    """A validated request: prompt ``ids``, ``max_tokens`` new tokens at most, ``options`` (the keyword
    arguments of ``Engine.submit``; a ``constraint`` there is compiled once and each choice runs its own
    matcher copy), the ``stop`` strings the text is cut at, and ``n`` choices (:meth:`choice_options`).
    ``logprobs``: alternatives per token (None: no logprobs)."""

    ids: list[int]
    max_tokens: int
    options: dict[str, Any]
    stop: list[str]
    #: The ``[TOOL_CALLS]`` token id and whether parallel calls are kept, where the output is read for
    #: tool calls (mtx.serving.tools.ToolOutput); None otherwise.
    tool_calls: tuple[int, bool] | None = None
    n: int = 1

    @property
    def logprobs(self) -> int | None:
        return self.options.get("logprobs")

    def choice_options(self, index: int) -> dict[str, Any]:
        """The engine options of choice ``index``: its ``TokenRng`` is stream ``index`` of the seed."""
        return {**self.options, "rng_stream": index}


def check_model(req: SamplingRequest | TokenizeCompletionRequest | DetokenizeRequest, served: str) -> None:
    """Refuse a request for a model other than ``served``."""
    if req.model != served:
        raise ApiError(400, f"model: unknown model {req.model!r}; this server serves {served!r}",
                       "model", code="model_not_found")


def completion_prompt(req: CompletionRequest) -> str | list[int]:
    """The one prompt of a completion request (text or token ids); refuses what is not supported."""
    prompt: Any = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise ApiError(400, f"prompt: one prompt per request is supported, got {len(prompt)}", "prompt")
        prompt = prompt[0]
    if req.echo or req.suffix or (req.best_of not in (None, 1)):
        raise ApiError(400, "echo, suffix and best_of are not supported", "echo")
    return prompt


def chat_max_tokens(req: ChatRequest) -> int | None:
    """``max_completion_tokens`` or its alias ``max_tokens``; a 400 when both are given and differ."""
    if req.max_completion_tokens is not None and req.max_tokens is not None and \
            req.max_completion_tokens != req.max_tokens:
        raise ApiError(400, f"max_completion_tokens ({req.max_completion_tokens}) and max_tokens ({req.max_tokens}) "
                       "differ; give one of them", "max_completion_tokens")
    return req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens


def logprobs_count(req: SamplingRequest) -> int | None:
    """Alternatives per token the request asks log-probabilities of (None: no logprobs).

    Chat: ``logprobs`` true/false and ``top_logprobs`` 0..20 (only with ``logprobs: true``);
    completions: ``logprobs`` an integer 0..20."""
    if isinstance(req, ChatRequest):
        if req.logprobs is not None and not isinstance(req.logprobs, bool):
            raise ApiError(400, "logprobs: true or false for chat completions (top_logprobs says how many "
                           "alternatives)", "logprobs")
        top = req.top_logprobs
        if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
            raise ApiError(400, f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top}", "top_logprobs")
        if not req.logprobs:
            if top:
                raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
            return None
        return top or 0
    value = req.logprobs
    if value is None or value is False:
        return None
    if value is True or not 0 <= value <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}] for completions, got "
                       f"{json.dumps(value)}", "logprobs")
    return value


def chat_messages(req: ChatRequest, has_tokenizer: bool) -> list[dict[str, Any]]:
    """The messages as the chat template takes them (``role``, text ``content``; an assistant's
    ``tool_calls``, a tool result's ``tool_call_id``); at least one.

    Roles are those of CHAT_ROLES (a role is written into the prompt by the template, so a free string
    could forge template markers); ``content`` may be null only for an assistant (rendered as "")."""
    if not req.messages:
        raise ApiError(400, "messages: give at least one message", "messages")
    if not has_tokenizer:
        raise ApiError(400, "messages: this export has no tokenizer; use /v1/completions with token ids",
                       "messages")
    messages = []
    for i, m in enumerate(req.messages):
        if m.role not in CHAT_ROLES:
            raise ApiError(400, f"messages[{i}].role: unknown role {m.role[:40]!r}; expected one of "
                           f"{', '.join(CHAT_ROLES)}", f"messages[{i}].role")
        if m.content is None and m.role not in NULL_CONTENT_ROLES:
            raise ApiError(400, f"messages[{i}].content: null content is allowed for assistant messages only",
                           f"messages[{i}].content")
        content = m.content if isinstance(m.content, str) or m.content is None else \
            "".join(p.text for p in m.content)
        message: dict[str, Any] = {"role": m.role, "content": content or ""}
        if m.tool_calls and m.role == "assistant":
            for j, call in enumerate(m.tool_calls):
                fn = call.get("function")
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or \
                        not isinstance(fn.get("arguments", "{}"), (str, dict)):
                    raise ApiError(400, f"messages[{i}].tool_calls[{j}]: expected {{\"id\": ..., \"type\": "
                                   f"\"function\", \"function\": {{\"name\": ..., \"arguments\": ...}}}}",
                                   f"messages[{i}].tool_calls")
            message["tool_calls"] = m.tool_calls
        if m.role == "tool":
            if m.tool_call_id is None:
                raise ApiError(400, f"messages[{i}].tool_call_id: a tool message needs the id of the call it "
                               f"answers", f"messages[{i}].tool_call_id")
            message["tool_call_id"] = m.tool_call_id
            if m.name is not None:
                message["name"] = m.name
        messages.append(message)
    return messages


def prepare(req: SamplingRequest, ids: list[int], *, max_tokens: int | None, default_max: int | None,
            prompt_field: str, position_limit: int | None, eos_token_ids: Sequence[int],
            max_n: int | None = None) -> Prepared:
    """Validate the sampling fields of ``req`` for prompt ``ids``.

    ``max_tokens`` is the request's own (None: ``default_max``; None too: up to DEFAULT_CHAT_MAX_TOKENS
    within the positions left); ``position_limit`` bounds prompt + new tokens (None: unbounded);
    ``prompt_field`` is the field blamed for a prompt too long; ``max_n`` bounds ``n`` (None: 1).
    Penalties and the other sampling values are checked where the engine prepares the request
    (:func:`mtx.runtime.request.prepare_request`, the one home; 400 naming the field)."""
    if req.logit_bias:
        raise ApiError(400, "logit_bias: not supported by this server", "logit_bias")
    for name in ("functions", "function_call"):
        if getattr(req, name) is not None:
            raise ApiError(400, f"{name}: deprecated by OpenAI and not supported; use tools and tool_choice", name)
    left = position_limit
    if left is not None and len(ids) > left:
        raise ApiError(400, f"{prompt_field}: the prompt of {len(ids)} tokens exceeds the {left} positions "
                       f"of this model", prompt_field, code="context_length_exceeded")
    limit_n = 1 if max_n is None else max_n
    if not 1 <= req.n <= limit_n:
        raise ApiError(400, f"n must be in [1, {limit_n}] on this server (its --max-queue), got {req.n}", "n")
    logprobs = logprobs_count(req)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
        raise ApiError(400, f"stop: up to {MAX_STOP_STRINGS} non-empty strings", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise ApiError(400, f"stop: each stop string may have at most {MAX_STOP_CHARS} characters, got "
                       f"{max(len(s) for s in stop)}", "stop")
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
        stop_ids = list(eos_token_ids) + list(stop_ids)
    options = dict(temperature=1.0 if req.temperature is None else req.temperature,
                   top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
                   repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                   seed=req.seed, stop=stop or None, stop_token_ids=stop_ids)
    if req.speculative is not None:
        options["speculative"] = req.speculative
    if req.presence_penalty or req.frequency_penalty:
        options.update(presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty)
    if logprobs is not None:
        options["logprobs"] = logprobs
    return Prepared(ids, max_tokens, options, stop, n=req.n)


# -- responses ----------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass(frozen=True)
class Envelope:
    """The envelope of one request's responses: every whole response and stream chunk of a request
    carries the same ``id``, ``created`` and ``model``; ``object`` names the route and the mode.

    Whole responses always carry ``usage``; stream chunks carry it (null but in the last chunk) only
    with ``include_usage``."""

    model: str
    chat: bool
    stream: bool
    include_usage: bool = False
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if not self.id:
            object.__setattr__(self, "id", f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}")

    @property
    def object(self) -> str:
        if not self.chat:
            return "text_completion"
        return "chat.completion.chunk" if self.stream else "chat.completion"

    def wrap(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> dict[str, Any]:
        """The response (or chunk) of ``choices``: the one builder of OpenAI's response envelope."""
        obj: dict[str, Any] = {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                               "choices": choices}
        if not self.stream or self.include_usage:
            obj["usage"] = usage
        return obj

    def call_choice(self, content: str | None, tool_calls: list[dict[str, Any]] | None, finish_reason: str | None,
                    *, index: int, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        """Choice ``index`` of a chat response whose message may call tools, or of a chunk whose delta
        carries ``tool_calls`` deltas (``content`` None there), with the ``logprobs`` of its content
        tokens (:mod:`mtx.serving.logprobs`) or null."""
        choice: dict[str, Any] = {"index": index, "logprobs": logprobs, "finish_reason": finish_reason}
        if self.stream:
            delta: dict[str, Any] = {"content": content} if content else {}
            if tool_calls:
                delta["tool_calls"] = tool_calls
            choice["delta"] = delta
        else:
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if tool_calls:
                message["tool_calls"] = tool_calls
            choice["message"] = message
        return choice

    def choice(self, text: str | None, finish_reason: str | None, role: bool = False, *, index: int,
               logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        """Choice ``index``: the whole text (a response) or a text delta (a chunk; ``role`` opens a chat
        stream), with its ``logprobs`` object (:mod:`mtx.serving.logprobs`) or null."""
        choice: dict[str, Any] = {"index": index, "logprobs": logprobs, "finish_reason": finish_reason}
        if not self.chat:
            choice["text"] = text or ""
        elif not self.stream:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice["delta"] = delta
        return choice


def sse(obj: dict[str, Any]) -> str:
    """One server-sent event of ``obj``."""
    return f"data: {json.dumps(obj)}\n\n"


def tokenize_response(ids: list[int], max_model_len: int | None) -> dict[str, Any]:
    """``POST /tokenize``'s answer (vLLM's shape)."""
    return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids}


def models_response(model: str, created: int, max_model_len: int | None) -> dict[str, Any]:
    """``GET /v1/models``: the one model served."""
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "mtx",
                                        "max_model_len": max_model_len}]}
