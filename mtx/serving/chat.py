"""Chat prompts: OpenAI messages -> prompt ids, the one path every chat request takes (:func:`chat_encoder`).

* ``hf`` tokenizers (:class:`TemplateChat`): the export's chat template (where transformers finds it:
  :func:`mtx.tokenizer.chat_template_source`) rendered as transformers does, then tokenized.
* ``mistral`` tokenizers (:class:`MistralChat`): mistral_common's ``encode_chat_completion`` of the
  request :func:`mistral_request` builds — Mistral's reference encoding.

**Text a client sends is never a control token** (``[INST]``, ``</s>``, ... typed in a message are
encoded as plain text, as mistral_common does). For a template this takes a second render: every
client string is wrapped in two markers (Unicode noncharacters, outside its leading and trailing
whitespace so that ``trim`` acts as before), and the rendered text is cut at them into the template's
own text and the client's. The template's text is tokenized with its control tokens parsed; the
client's with none parsed — in one encode call over the whole prompt, so merges, byte fallback and
SentencePiece's leading ``▁`` are those of the unmarked prompt, whose ids (transformers'
``apply_chat_template(..., tokenize=True)``) it equals wherever no client string holds a control
token's text. Where the marked render cannot be trusted (it differs from the unmarked one once the
markers are removed, a marked span is not one client string, or a client string holds a
noncharacter), the unmarked prompt is tokenized as it is, and a request with a control token's text
in a client string is refused (400): never is such text turned into a control token. (What such a
template makes of a client's text, ``upper`` of ``[inst]`` say, is the template's own doing and is
not tracked.) The render that counts, and the one whose errors the client sees, is the unmarked one;
both share one deadline (the marked one giving up means the unmarked path).

transformers renders with jinja2's ``ImmutableSandboxedEnvironment(trim_blocks=True,
lstrip_blocks=True)`` and the loop-controls extension, a ``tojson`` filter that keeps non-ASCII
text, the globals ``raise_exception`` and ``strftime_now``, and the variables ``messages``,
``add_generation_prompt`` and the special tokens (``bos_token``, ``eos_token``, ...). The rendered
text already holds its special tokens, so it is tokenized without adding any.

Special tokens of tokenizer_config.json that tokenizer.json does not list as added tokens are matched
as single tokens in the rendered text (as transformers, which adds them, does).

**Bounded rendering.** The template is the export's, the messages the client's: rendering runs
on a worker thread (never the event loop) under :data:`RENDER_DEADLINE_S`. A Python thread cannot be
killed, so the bound is enforced from inside it: while rendering, a trace function
(``sys.settrace``, this thread only) checks the deadline at every line of the compiled template and
every Python call it makes, and raises :class:`TemplateTimeout` once it has passed — so nested loops
(``range`` is capped at jinja2's ``MAX_RANGE`` = 100000 by the sandbox) give up within a few
milliseconds of the deadline. A single C operation cannot be interrupted by the trace, so the ones a
template can make arbitrarily large are checked before they run against :data:`MAX_TEMPLATE_VALUE`
characters (or bits): ``*``, ``**`` and ``%`` (format widths), the ``int`` filter's digits, the
``center``/``indent``/``replace`` filters and the ``center``/``ljust``/``rjust``/``zfill``/``expandtabs``/
``replace``/``join`` string methods. The output is bounded by the same limit. This bounds what a
client's messages can make a template do; a template that is itself written to exhaust the machine
(it is the export's file) may still find a C call not listed here.

Exports without a template (the built-in models, the synthetic test checkpoints) get
:data:`DEFAULT_CHAT_TEMPLATE`, a plain one written here: ``<s>`` then, per message,
``<|role|>\\ncontent</s>\\n``, and ``<|assistant|>\\n`` to prompt the reply.
"""

from __future__ import annotations

import json
import re
import sys
import time
from datetime import datetime
from types import FrameType
from functools import lru_cache
from pathlib import Path
from typing import Any

from mtx.config import read_json_object
from mtx.errors import CheckpointError, UsageError
from mtx.runtime.request import check_utf8
from mtx.tokenizer import TOKENIZER_CONFIG, MistralTextTokenizer, chat_template_source, encode_checked

#: Seconds a chat template may take to render one request's messages (then HTTP 400).
RENDER_DEADLINE_S = 2.0
#: Characters (strings, lists) or bits (integers) a template's ``*`` / ``**`` may produce, and the
#: longest rendered prompt.
MAX_TEMPLATE_VALUE = 16 * 1024 * 1024
#: The filename jinja2 gives code compiled from a string (the lines the deadline is checked at).
_TEMPLATE_FILENAME = "<template>"
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class TemplateError(UsageError):
    """The chat template refused the messages (its raise_exception) or failed to render."""


class TemplateTimeout(TemplateError):
    """Rendering passed its deadline."""


def _token_text(value: Any) -> str:
    if isinstance(value, dict):  # AddedToken serialised as {"content": ...}
        value = value.get("content")
    return value if isinstance(value, str) else ""


class ChatTemplate:
    """A compiled template with the special tokens of its tokenizer_config.json."""

    def __init__(self, source: str, special_tokens: dict[str, str], origin: str) -> None:
        self.source = source
        self.special_tokens = special_tokens
        self.origin = origin
        self._template = _compile(source, origin)

    @classmethod
    def default(cls) -> ChatTemplate:
        return cls(DEFAULT_CHAT_TEMPLATE, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "", "pad_token": ""},
                   "the default chat template (mtx.serving.chat)")

    @classmethod
    def for_folder(cls, folder: Path) -> ChatTemplate:
        """``folder``'s chat template (:func:`mtx.tokenizer.chat_template_source`), compiled, with the
        special tokens of its tokenizer_config.json; the default template where it has none."""
        path = folder / TOKENIZER_CONFIG
        cfg = read_json_object(path, CheckpointError) if path.is_file() else {}
        # As transformers: only the special tokens the config sets are template variables.
        special = {name: text for name in SPECIAL_TOKENS if (text := _token_text(cfg.get(name)))}
        found = chat_template_source(folder)
        if found is None:
            return cls(DEFAULT_CHAT_TEMPLATE, {"bos_token": "<s>", "eos_token": "</s>", **special},
                       "the default chat template (mtx.serving.chat)")
        return cls(found[0], special, found[1])

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               deadline_s: float | None = RENDER_DEADLINE_S, tools: list[dict[str, Any]] | None = None) -> str:
        """The prompt text of ``messages`` (and ``tools``, the template variable transformers passes, only
        when given); TemplateError when the template refuses them, fails, or runs past ``deadline_s``
        seconds (None: no deadline)."""
        import jinja2

        variables = dict(messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens)
        if tools is not None:
            variables["tools"] = tools
        try:
            if deadline_s is None:
                text = self._template.render(**variables)
            else:
                with _Deadline(deadline_s, self.origin):
                    text = self._template.render(**variables)
        except TemplateError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, OverflowError,
                MemoryError, RecursionError) as e:
            raise TemplateError(f"messages: {self.origin} failed to render ({e})", params=("messages",)) from None
        if len(text) > MAX_TEMPLATE_VALUE:
            raise TemplateError(f"messages: {self.origin} rendered more than {MAX_TEMPLATE_VALUE} characters",
                                params=("messages",))
        return text


class _Deadline:
    """While entered, the current thread raises :class:`TemplateTimeout` at the first template line or
    Python call after ``seconds`` (a ``sys.settrace`` hook of this thread; the previous one restored)."""

    def __init__(self, seconds: float, origin: str) -> None:
        self.seconds, self.origin = seconds, origin
        self.end = 0.0
        self._previous: Any = None

    def _check(self) -> None:
        if time.monotonic() > self.end:
            raise TemplateTimeout(f"messages: {self.origin} did not render within {self.seconds:g} s",
                                  params=("messages",))

    def _line(self, frame: FrameType, event: str, arg: Any) -> Any:
        self._check()
        return self._line

    def _call(self, frame: FrameType, event: str, arg: Any) -> Any:
        self._check()
        # Line events only in the compiled template (its loops); other frames are checked per call.
        return self._line if frame.f_code.co_filename == _TEMPLATE_FILENAME else None

    def __enter__(self) -> _Deadline:
        self.end = time.monotonic() + self.seconds
        self._previous = sys.gettrace()
        sys.settrace(self._call)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(self._previous)


def chat_tokenizer(tokenizer: Any, special_tokens: dict[str, str]) -> Any:
    """A copy of ``tokenizer`` that matches the template's special tokens (bos, eos, ...) in the
    rendered text as single tokens, as a transformers tokenizer loaded from the folder does."""
    from tokenizers import AddedToken, Tokenizer

    present = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    missing = [t for t in special_tokens.values() if t and t not in present and tokenizer.token_to_id(t) is not None]
    if not missing:
        return tokenizer
    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    return copy


#: Unicode noncharacters ("for a program's internal use"): the markers around client text in the
#: marked render, and the brackets of the sentinels that stand for the template's control tokens.
_OPEN, _CLOSE, _SENTINEL_OPEN, _SENTINEL_CLOSE = "\ufdd0", "\ufdd1", "\ufdd2", "\ufdd3"
_RESERVED = re.compile("[\ufdd0-\ufdef]")


def _client_strings(value: Any, key: str | None = None) -> list[str]:
    """Every string a client sent in ``value`` (messages), except roles (the server checks them)."""
    if isinstance(value, str):
        return [] if key == "role" else [value]
    if isinstance(value, dict):
        return [t for k, v in value.items() for t in _client_strings(v, k)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _client_strings(v)]
    return []


def _dict_keys(value: Any) -> list[str]:
    """Every dict key in ``value`` (nested)."""
    if isinstance(value, dict):
        return [k for k, v in value.items() for k in [str(k), *_dict_keys(v)]]
    if isinstance(value, (list, tuple)):
        return [k for v in value for k in _dict_keys(v)]
    return []


def _marked(value: Any, key: str | None = None) -> Any:
    """``value`` with each client string wrapped as ``leading-space OPEN core CLOSE trailing-space``
    (core = the string stripped as Python's ``strip`` and jinja2's ``trim`` strip it)."""
    if isinstance(value, str):
        if key == "role":
            return value
        core = value.strip()
        lead = value[:len(value) - len(value.lstrip())] if core else value
        return lead + _OPEN + core + _CLOSE + (value[len(lead) + len(core):] if core else "")
    if isinstance(value, dict):
        return {k: _marked(v, k) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_marked(v) for v in value]
    return value


def _split_marked(text: str, cores: set[str]) -> list[tuple[str, bool]] | None:
    """``text`` (a marked render) as [(text, is client text)], or None where the markers are not
    well formed (unbalanced, nested, a stray noncharacter) or a marked span is not one client string."""
    parts: list[tuple[str, bool]] = []
    pos = 0
    while (m := _RESERVED.search(text, pos)) is not None:
        close = text.find(_CLOSE, m.end())
        if m.group() != _OPEN or close < 0:
            return None
        span = text[m.end():close]
        if span not in cores or _RESERVED.search(span):
            return None
        parts += [(text[pos:m.start()], False), (span, True)]
        pos = close + 1
    return parts + [(text[pos:], False)]


class _PlainTextTokenizer:
    """A copy of a chat tokenizer whose control tokens (added tokens marked special) are plain text,
    plus one sentinel per control token (a non-special added token with the same matching flags) that
    stands for it in the template's text: ``encode`` of a sentinel-bearing text gives the ids of the
    text with each sentinel read as its control token."""

    def __init__(self, tokenizer: Any) -> None:
        from tokenizers import AddedToken, Tokenizer

        controls = [t for t in tokenizer.get_added_tokens_decoder().values() if t.special]
        self.tokenizer = Tokenizer.from_str(tokenizer.to_str())
        self.sentinel = {t.content: f"{_SENTINEL_OPEN}{k}{_SENTINEL_CLOSE}" for k, t in enumerate(controls)}
        self.tokenizer.add_tokens([AddedToken(self.sentinel[t.content], special=False, single_word=t.single_word,
                                              lstrip=t.lstrip, rstrip=t.rstrip, normalized=t.normalized)
                                   for t in controls])
        self.tokenizer.encode_special_tokens = True
        self.control_id = {self.tokenizer.token_to_id(self.sentinel[t.content]): tokenizer.token_to_id(t.content)
                           for t in controls}
        texts = sorted(self.sentinel, key=len, reverse=True)  # leftmost-longest, as tokenizers matches
        self.controls = re.compile("|".join(map(re.escape, texts))) if texts else None

    def encode(self, parts: list[tuple[str, bool]], origin: str) -> list[int]:
        """Ids of the concatenated ``parts``, control tokens parsed in the template's parts only."""
        text = "".join(t if client or self.controls is None else
                       self.controls.sub(lambda m: self.sentinel[m.group()], t) for t, client in parts)
        ids = encode_checked(self.tokenizer, text, origin, add_special_tokens=False, release_gil=True)
        return [self.control_id.get(i, i) for i in ids]


class TemplateChat:
    """Chat prompts of an ``hf`` tokenizer: its :class:`ChatTemplate` rendered, then tokenized with the
    client's text as plain text (module docstring)."""

    def __init__(self, template: ChatTemplate, tokenizer: Any) -> None:
        self.template = template
        self.tokenizer = chat_tokenizer(tokenizer, template.special_tokens)
        self._plain = _PlainTextTokenizer(self.tokenizer)
        self._unsafe_source = bool(_RESERVED.search(template.source))

    def encode(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Prompt ids of ``messages`` (and ``tools``: client text too, kept plain as the messages' is; a
        tool's key holding a control token's text is refused); TemplateError (400) when the template
        refuses them."""
        from mtx.serving.tools import template_messages

        messages = template_messages(messages)
        strings = _client_strings(messages) + _client_strings(tools)
        for text in strings:
            check_utf8(text, "messages", param="messages")
        if tools is not None and self._plain.controls is not None:
            for key in _dict_keys(tools):
                if (found := self._plain.controls.search(key)) is not None:
                    raise TemplateError(f"tools: {found.group()!r} in a tool's key is text, never a control token; "
                                        f"remove it", params=("tools",))
        end = time.monotonic() + RENDER_DEADLINE_S
        plain = self.template.render(messages, add_generation_prompt, deadline_s=RENDER_DEADLINE_S, tools=tools)
        parts = None
        if not self._unsafe_source and not any(_RESERVED.search(t) for t in strings):
            try:  # within what is left of the one deadline
                marked: str | None = self.template.render(_marked(messages), add_generation_prompt,
                                                          deadline_s=max(0.0, end - time.monotonic()),
                                                          tools=_marked(tools) if tools is not None else None)
            except TemplateError:  # it judged the marked text otherwise, or took too long: the unmarked path
                marked = None
            if marked is not None:
                parts = _split_marked(marked, {t.strip() for t in strings})
                if parts is not None and "".join(t for t, _ in parts) != plain:
                    parts = None
        if parts is not None:
            return self._plain.encode(parts, "chat prompt")
        controls = self._plain.controls
        for text in strings:
            found = controls.search(text) if controls is not None else None
            if found is not None:
                raise TemplateError(f"messages: {found.group()!r} in a message is text, never a control token, and "
                                    f"{self.template.origin} uses message text in a way that cannot keep it apart "
                                    f"from the template's own tokens; remove it from the message",
                                    params=("messages",))
        return encode_checked(self.tokenizer, plain, "chat prompt", add_special_tokens=False, release_gil=True)


def mistral_request(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> Any:
    """The ``mistral_common`` ChatCompletionRequest of OpenAI ``messages`` and ``tools``: the one place
    OpenAI's chat format becomes Mistral's (``developer`` is OpenAI's newer name for ``system``). Built
    by mistral_common's own ``from_openai``, which also reads tools, tool calls and tool results."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    converted = [{**m, "role": "system"} if m.get("role") == "developer" else m for m in messages]
    return ChatCompletionRequest.from_openai(converted, tools=tools or None)


def _mistral_error(e: BaseException) -> str:
    """One line of a mistral_common or pydantic error."""
    errors = getattr(e, "errors", None)
    if callable(errors):
        try:
            first = errors()[0]
            where = ".".join(str(x) for x in first.get("loc", ()))
            return f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
        except Exception:  # noqa: BLE001 - not pydantic's shape after all
            pass
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__


class MistralChat:
    """Chat prompts of a ``mistral`` tokenizer: ``encode_chat_completion`` of :func:`mistral_request`."""

    def __init__(self, tokenizer: MistralTextTokenizer) -> None:
        self.tokenizer = tokenizer

    def encode(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Prompt ids of ``messages`` and ``tools`` (a prompt for the assistant's reply: Mistral's format
        always is one); UsageError (400) naming mistral_common's objection."""
        for text in _client_strings(messages) + _client_strings(tools):
            check_utf8(text, "messages", param="messages")
        try:
            request = mistral_request(messages, tools)
            return list(self.tokenizer.mistral.encode_chat_completion(request).tokens)
        except (KeyboardInterrupt, SystemExit, MemoryError):
            raise
        except Exception as e:  # noqa: BLE001 - mistral_common's validation raises its own and pydantic's
            raise UsageError(f"messages: {self.tokenizer.path.name} (mistral_common) refused these messages "
                             f"({_mistral_error(e)})", params=("messages",)) from None


def chat_encoder(folder: Path | None, tokenizer: Any | None) -> TemplateChat | MistralChat | None:
    """The chat prompt path of a model folder and its loaded tokenizer (None without a tokenizer):
    mistral_common's for a Mistral tokenizer, else the folder's template (the default one where it has
    none, or where there is no folder)."""
    if tokenizer is None:
        return None
    if isinstance(tokenizer, MistralTextTokenizer):
        return MistralChat(tokenizer)
    return TemplateChat(ChatTemplate.for_folder(folder) if folder is not None else ChatTemplate.default(), tokenizer)


def _raise_exception(message: str) -> None:
    raise TemplateError(f"messages: {message}", params=("messages",))


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _too_big(what: str) -> TemplateError:
    return TemplateError(f"messages: the chat template's {what} would build more than {MAX_TEMPLATE_VALUE} "
                         f"characters", params=("messages",))


#: Widths and precisions in a %-format (``%0600000000d``).
_FORMAT_WIDTH = re.compile(r"%[-#0 +]*(\d*)(?:\.(\d+))?")


def _bounded_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse a template's ``*`` / ``**`` / ``%`` whose result would exceed MAX_TEMPLATE_VALUE (before it runs)."""
    if operator == "%" and isinstance(left, str):
        if any(int(n) > MAX_TEMPLATE_VALUE for m in _FORMAT_WIDTH.finditer(left) for n in m.groups() if n):
            raise _too_big("'%' format")
    if operator == "*":
        if isinstance(left, int) and isinstance(right, int) and \
                abs(left).bit_length() + abs(right).bit_length() > MAX_TEMPLATE_VALUE:
            raise _too_big("'*'")
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_TEMPLATE_VALUE:
                raise TemplateError(f"messages: the chat template's '*' would build more than {MAX_TEMPLATE_VALUE} "
                                    "items", params=("messages",))
    elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 \
            and right * left.bit_length() > MAX_TEMPLATE_VALUE:
        raise TemplateError(f"messages: the chat template's '**' would build a number of more than "
                            f"{MAX_TEMPLATE_VALUE} bits", params=("messages",))


def _size_after(name: str, text: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """An upper bound on the characters ``text.name(*args)`` (or the filter ``name``) builds; 0 if unknown."""
    if not isinstance(text, str):
        return 0
    arg = (list(args) + [None])[0]
    if name in ("center", "ljust", "rjust", "zfill"):
        width = kwargs.get("width", arg if arg is not None else 80)
        return width if isinstance(width, int) else 0
    if name == "expandtabs":
        size = kwargs.get("tabsize", arg if arg is not None else 8)
        return len(text) * size if isinstance(size, int) else 0
    if name == "indent":
        width = kwargs.get("width", arg if arg is not None else 4)
        return len(text) + (text.count("\n") + 1) * (width if isinstance(width, int) else len(str(width)))
    if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        return len(text) + (text.count(args[0]) + (1 if args[0] == "" else 0) + len(text) * (args[0] == "")) \
            * len(args[1])
    if name == "join" and isinstance(arg, (list, tuple)):
        return len(text) * len(arg) + sum(len(x) for x in arg if isinstance(x, str))
    if name == "int" and len(text) > 4300:  # Python's own limit on decimal digits, for every base
        return MAX_TEMPLATE_VALUE + 1
    return 0


def _bounded_str_call(obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Refuse a string method call whose result would exceed MAX_TEMPLATE_VALUE (before it runs)."""
    name = getattr(obj, "__name__", "")
    if isinstance(getattr(obj, "__self__", None), str) and _size_after(name, obj.__self__, args, kwargs) \
            > MAX_TEMPLATE_VALUE:
        raise _too_big(f"'{name}'")


def _bounded_filter(filter_: Any, name: str) -> Any:
    """jinja2's filter ``name`` refusing an input whose result would exceed MAX_TEMPLATE_VALUE."""
    def bounded(*args: Any, **kwargs: Any) -> Any:
        values = [a for a in args if not hasattr(a, "environment")]  # pass_environment/eval_context filters
        if values and _size_after(name, values[0], tuple(values[1:]), kwargs) > MAX_TEMPLATE_VALUE:
            raise _too_big(f"'{name}' filter")
        return filter_(*args, **kwargs)

    for attr in ("jinja_pass_arg",):  # keep how jinja2 calls the original (environment, eval context)
        if hasattr(filter_, attr):
            setattr(bounded, attr, getattr(filter_, attr))
    return bounded


@lru_cache(maxsize=8)
def _compile(source: str, origin: str) -> Any:
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Environment(ImmutableSandboxedEnvironment):
        """transformers' sandbox, with ``*`` and ``**`` bounded (see the module's "Bounded rendering")."""

        intercepted_binops = frozenset({"*", "**", "%"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            _bounded_binop(operator, left, right)
            return super().call_binop(context, operator, left, right)

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
            _bounded_str_call(__obj, args, kwargs)
            return super().call(__context, __obj, *args, **kwargs)

    env = Environment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    for name in ("int", "center", "indent", "replace"):
        env.filters[name] = _bounded_filter(env.filters[name], name)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise CheckpointError(f"{origin}: not a valid jinja2 template ({e})") from None
