"""Chat prompts: the export's ``chat_template`` (tokenizer_config.json) rendered as transformers does.

transformers renders with jinja2's ``ImmutableSandboxedEnvironment(trim_blocks=True,
lstrip_blocks=True)`` and the loop-controls extension, a ``tojson`` filter that keeps non-ASCII
text, the globals ``raise_exception`` and ``strftime_now``, and the variables ``messages``,
``add_generation_prompt`` and the special tokens (``bos_token``, ``eos_token``, ...). The rendered
text already holds its special tokens, so it is tokenized without adding any.

Special tokens of tokenizer_config.json that tokenizer.json does not list as added tokens are matched
as single tokens in the rendered text (as transformers, which adds them, does).

Exports without a template (the built-in models, the synthetic test checkpoints) get
:data:`DEFAULT_CHAT_TEMPLATE`, a plain one written here: ``<s>`` then, per message,
``<|role|>\\ncontent</s>\\n``, and ``<|assistant|>\\n`` to prompt the reply.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from mtx.errors import CheckpointError, UsageError

TOKENIZER_CONFIG = "tokenizer_config.json"
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

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        import jinja2

        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self.special_tokens)
        except TemplateError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError) as e:
            raise TemplateError(f"messages: {self.origin} failed to render ({e})", params=("messages",)) from None


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


@lru_cache(maxsize=8)
def _compile(source: str, origin: str) -> Any:
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise CheckpointError(f"{origin}: not a valid jinja2 template ({e})") from None
