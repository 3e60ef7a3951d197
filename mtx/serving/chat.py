"""Chat prompts: the export's ``chat_template`` (tokenizer_config.json) rendered as transformers does.

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

from mtx.errors import CheckpointError, UsageError

TOKENIZER_CONFIG = "tokenizer_config.json"
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
        """The template of ``folder/tokenizer_config.json``, or the default one where it has none."""
        path = folder / TOKENIZER_CONFIG
        cfg: dict[str, Any] = {}
        if path.is_file():
            try:
                cfg = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{path}: not a readable JSON file ({e})") from None
            if not isinstance(cfg, dict):
                raise CheckpointError(f"{path}: expected a JSON object")
        # As transformers: only the special tokens the config sets are template variables.
        special = {name: text for name in SPECIAL_TOKENS if (text := _token_text(cfg.get(name)))}
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if template is None:
            return cls(DEFAULT_CHAT_TEMPLATE, {"bos_token": "<s>", "eos_token": "</s>", **special},
                       "the default chat template (mtx.serving.chat)")
        if not isinstance(template, str):
            raise CheckpointError(f"{path}: chat_template must be a string")
        return cls(template, special, f"{path} chat_template")

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               deadline_s: float | None = RENDER_DEADLINE_S) -> str:
        """The prompt text of ``messages``; TemplateError when the template refuses them, fails, or runs
        past ``deadline_s`` seconds (None: no deadline)."""
        import jinja2

        variables = dict(messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens)
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
