"""The tokenizer files of a checkpoint or export folder, loaded and checked under mtx's error handling.

**Two kinds of tokenizer** (``tokenizer_mode``, vLLM's name):

* ``hf``: Hugging Face's ``tokenizer.json`` (the ``tokenizers`` library) with its side files
  (tokenizer_config.json, the chat template files, ...); chat prompts come from the chat template
  (mtx.serving.chat).
* ``mistral``: Mistral's own file, ``tekken.json`` or ``tokenizer.model.v<N>`` (a bare
  ``tokenizer.model`` of a mistral-format checkpoint is v1), read by ``mistral_common``; chat prompts
  come from its ``encode_chat_completion``. :class:`MistralTextTokenizer` gives it the interface mtx
  uses of a ``tokenizers.Tokenizer``.

``auto`` (:func:`tokenizer_mode`) is ``mistral`` for a mistral-format checkpoint (params.json, no
config.json) or a folder whose only tokenizer is Mistral's, else ``hf``. An export carries one kind
only (:func:`tokenizer_files`; Mistral's file under its canonical name), so ``auto`` on the export
folder finds the mode it was exported with, and the runtime needs no other record of it.

Every failure (unreadable, not UTF-8, not JSON, a tokenizer the ``tokenizers`` library rejects or
panics on) is a :class:`mtx.errors.CheckpointError` naming the file, never a traceback. A panic in
the Rust library (a pre-tokenizer regex that exhausts Oniguruma's backtracking limit, say) would print
its message and backtrace on stderr before that one line: :func:`_rust_stderr_held` keeps it off.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mtx.config import GENERATION_CONFIG, HF_CONFIG, MISTRAL_PARAMS, generation_eos_ids, read_json_object
from mtx.errors import CheckpointError, UsageError

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
#: Chat template files, in transformers' order of precedence (then tokenizer_config.json's chat_template).
CHAT_TEMPLATE_JINJA = "chat_template.jinja"
CHAT_TEMPLATE_JSON = "chat_template.json"
#: Files an ``hf`` export copies from its checkpoint when present (role "tokenizer" in mtx.json).
TOKENIZER_FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG, "special_tokens_map.json", GENERATION_CONFIG,
                   "tokenizer.model", CHAT_TEMPLATE_JINJA, CHAT_TEMPLATE_JSON)
JSON_SIDE_FILES = (TOKENIZER_CONFIG, "special_tokens_map.json", CHAT_TEMPLATE_JSON)
TOKENIZER_MODES = ("auto", "hf", "mistral")
TEKKEN_JSON = "tekken.json"
#: Mistral's SentencePiece files: tokenizer.model.v3, tokenizer.model.v7m1, ...
_MISTRAL_SPM = re.compile(r"tokenizer\.model\.v(\d+)(m\d+)?")


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


_STDERR_LOCK = threading.Lock()
_CAUGHT: list[Any] = []  # the one temporary file that catches fd 2 (made on first use)
#: The first line of a Rust panic report ("thread '<unnamed>' (123) panicked at src/lib.rs:1:2:").
_PANIC_LINE = re.compile(rb"^thread '.*' (\(\d+\) )?panicked at ", re.MULTILINE)


@contextlib.contextmanager
def _rust_stderr_held() -> Iterator[None]:
    """Run the body with file descriptor 2 going to a temporary file, then write what it caught to
    the real stderr, less any Rust panic report (the caller turns the panic into one line).

    fd 2 is process-wide, so bodies run one at a time (a lock); another thread's stderr written
    meanwhile is delayed, not lost (unless it follows a panic report). Where fd 2 cannot be
    redirected the body runs as it is.
    """
    with _STDERR_LOCK:
        saved: int | None = None
        try:
            sys.stderr.flush()
            if not _CAUGHT:
                _CAUGHT.append(tempfile.TemporaryFile())
            saved = os.dup(2)
        except (OSError, ValueError, AttributeError):
            pass
        if saved is None:
            yield
            return
        caught = _CAUGHT[0]
        try:
            os.dup2(caught.fileno(), 2)
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            text = caught.read()
            caught.seek(0)
            caught.truncate()
            panic = _PANIC_LINE.search(text)
            if panic is not None:  # Rust starts the report on a fresh line: drop that newline too
                text = text[:panic.start()]
                text = b"" if text == b"\n" else text[:-1] if text.endswith(b"\n\n") else text
            if text:
                os.write(2, text)


def _is_mistral_format(folder: Path) -> bool:
    """A mistral-inference checkpoint: params.json and no config.json (which mtx would read first)."""
    return (folder / MISTRAL_PARAMS).is_file() and not (folder / HF_CONFIG).is_file()


def mistral_tokenizer_file(folder: Path) -> tuple[Path, str] | None:
    """Mistral's tokenizer file in ``folder`` and its canonical name in an export, or None.

    ``tekken.json`` first; else the ``tokenizer.model.v<N>[m<M>]`` of the highest version; else, in a
    mistral-format checkpoint, a bare ``tokenizer.model`` (mistral_common reads it as v1, so an export
    names it ``tokenizer.model.v1``)."""
    if (folder / TEKKEN_JSON).is_file():
        return folder / TEKKEN_JSON, TEKKEN_JSON
    versioned = []
    if folder.is_dir():
        versioned = [(int(m.group(1)), m.group(2) or "", p.name) for p in folder.iterdir()
                     if (m := _MISTRAL_SPM.fullmatch(p.name)) and p.is_file()]
    if versioned:
        name = max(versioned)[2]
        return folder / name, name
    if _is_mistral_format(folder) and (folder / "tokenizer.model").is_file():
        return folder / "tokenizer.model", "tokenizer.model.v1"
    return None


def tokenizer_mode(folder: Path, requested: str = "auto") -> str:
    """``hf`` or ``mistral``: the kind of tokenizer ``folder`` is read with (module docstring).

    ``requested`` ``mistral`` needs Mistral's file and ``hf`` a tokenizer.json (UsageError otherwise);
    ``auto`` never fails (``hf`` where there is no tokenizer at all)."""
    if requested not in TOKENIZER_MODES:
        raise UsageError(f"tokenizer_mode: expected one of {', '.join(TOKENIZER_MODES)}, got {requested!r}",
                         params=("tokenizer_mode",))
    mistral = mistral_tokenizer_file(folder)
    if requested == "mistral" and mistral is None:
        raise UsageError(f"tokenizer_mode mistral: {folder} has no Mistral tokenizer file ({TEKKEN_JSON} or "
                         f"tokenizer.model.v<N>)", params=("tokenizer_mode",))
    if requested == "hf" and not (folder / TOKENIZER_JSON).is_file():
        raise UsageError(f"tokenizer_mode hf: {folder} has no {TOKENIZER_JSON}", params=("tokenizer_mode",))
    if requested != "auto":
        return requested
    if mistral is not None and (_is_mistral_format(folder) or not (folder / TOKENIZER_JSON).is_file()):
        return "mistral"
    return "hf"


def tokenizer_files(folder: Path, mode: str) -> dict[str, Path]:
    """The tokenizer files an export of ``folder`` carries in ``mode``: {name in the export: source}.

    ``mistral``: Mistral's file and generation_config.json (its EOS ids) only, so that the export
    holds one kind of tokenizer; ``hf``: those of :data:`TOKENIZER_FILES` present."""
    if mode == "mistral":
        found = mistral_tokenizer_file(folder)
        assert found is not None, "tokenizer_mode checked the file"
        files = {found[1]: found[0]}
        names: tuple[str, ...] = (GENERATION_CONFIG,)
    else:
        files, names = {}, TOKENIZER_FILES
    files.update({name: folder / name for name in names if (folder / name).is_file()})
    return files


def load_tokenizer(folder: Path, mode: str = "auto") -> Any | None:
    """The tokenizer of ``folder`` in ``mode`` (:func:`tokenizer_mode`): a ``tokenizers.Tokenizer``
    (``hf``), a :class:`MistralTextTokenizer` (``mistral``), or None where there is none."""
    return _load(folder, tokenizer_mode(folder, mode))


def _load(folder: Path, mode: str) -> Any | None:
    """:func:`load_tokenizer` of a resolved mode (``hf`` or ``mistral``)."""
    if mode == "mistral":
        found = mistral_tokenizer_file(folder)
        assert found is not None
        return MistralTextTokenizer(found[0])
    path = folder / TOKENIZER_JSON
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        with _rust_stderr_held():
            return Tokenizer.from_file(str(path))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - tokenizers raises Exception, or PanicException (a BaseException)
        raise CheckpointError(f"{path}: not a tokenizer the tokenizers library can load ({_first_line(e)})") from None


def check_side_files(folder: Path, default_eos: tuple[int, ...], mode: str = "auto") -> str:
    """Check every tokenizer-side file ``folder`` holds for ``mode`` (at export, and by ``mtx
    inspect``): the tokenizer loads, the JSON files parse, and an ``hf`` chat template compiles in the
    renderer that serves it. Returns the resolved mode."""
    mode = tokenizer_mode(folder, mode)
    _load(folder, mode)
    generation_eos_ids(folder, default_eos)
    if mode == "hf":
        for name in JSON_SIDE_FILES:
            if (folder / name).is_file():
                read_json_object(folder / name, CheckpointError)
        from mtx.serving.chat import ChatTemplate

        ChatTemplate.for_folder(folder)  # reads the template where transformers finds it, and compiles it
    return mode


def chat_template_source(folder: Path) -> tuple[str, str] | None:
    """(template text, origin) of ``folder``'s chat template, looked up where transformers looks:
    ``chat_template.jinja``, ``chat_template.json``'s ``chat_template``, then tokenizer_config.json's
    ``chat_template``; a JSON value is a string or a list of ``{"name", "template"}`` of which the one
    named ``default`` is taken. None where there is none; CheckpointError naming the file for a
    malformed one."""
    jinja = folder / CHAT_TEMPLATE_JINJA
    if jinja.is_file():
        try:
            return jinja.read_bytes().decode("utf-8"), str(jinja)
        except OSError as e:
            raise CheckpointError(f"{jinja}: cannot read ({e.strerror or e})") from None
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{jinja}: not UTF-8 text (byte {e.start})") from None
    for name, required in ((CHAT_TEMPLATE_JSON, True), (TOKENIZER_CONFIG, False)):
        path = folder / name
        if not path.is_file():
            continue
        value = read_json_object(path, CheckpointError).get("chat_template")
        if value is None:
            if required:
                raise CheckpointError(f"{path}: expected a 'chat_template' key (a string)")
            continue
        origin = f"{path} chat_template"
        if isinstance(value, list):
            named = [t for t in value if isinstance(t, dict) and t.get("name") == "default"]
            if not named:
                raise CheckpointError(f"{origin}: a list of named templates needs one named 'default'")
            value, origin = named[0].get("template"), f"{origin} 'default'"
        if not isinstance(value, str):
            raise CheckpointError(f"{origin}: expected a string, got {type(value).__name__}")
        return value, origin
    return None


class _Encoding:
    """What mtx reads of a ``tokenizers.Encoding``: ``ids``."""

    __slots__ = ("ids",)

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids


class MistralTextTokenizer:
    """``mistral_common``'s tokenizer (Tekken or SentencePiece) with the interface mtx uses of a
    ``tokenizers.Tokenizer``: ``encode``/``encode_batch`` (``.ids``), ``decode``, ``id_to_token``.

    ``mistral`` is the ``MistralTokenizer`` itself (chat prompts: ``encode_chat_completion``), loaded in
    ``ValidationMode.test``, the default of its ``from_file``.
    Invariants: ``encode(text)`` is mistral_common's ``encode(text, bos=add_special_tokens, eos=False)``
    (text is plain text: control tokens are never parsed from it); ``decode(ids, skip_special_tokens=True)``
    is mistral_common's decode with ``SpecialTokenPolicy.IGNORE``. With ``skip_special_tokens=False``
    each control token reads as its own text between the decodes of the runs of ordinary ids.
    """

    def __init__(self, path: Path) -> None:
        try:
            from mistral_common.protocol.instruct.validator import ValidationMode
            from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
            from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
        except ImportError as e:
            raise CheckpointError(f"{path}: reading Mistral's tokenizer needs the mistral-common package "
                                  f"({_first_line(e)}); pip install mistral-common") from None
        self.path = path
        try:
            self.mistral = MistralTokenizer.from_file(str(path), mode=ValidationMode.test)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 - mistral_common and sentencepiece raise many kinds
            raise CheckpointError(f"{path}: not a tokenizer mistral_common can load ({_first_line(e)})") from None
        self._raw = self.mistral.instruct_tokenizer.tokenizer
        self._ignore = SpecialTokenPolicy.IGNORE
        self._special = frozenset(int(i) for i in self._raw.special_ids)
        self.bos_id, self.eos_id = int(self._raw.bos_id), int(self._raw.eos_id)

    def get_vocab_size(self) -> int:
        return int(self._raw.n_words)

    def encode(self, text: str, add_special_tokens: bool = True) -> _Encoding:
        return _Encoding(self._raw.encode(text, bos=add_special_tokens, eos=False))

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[_Encoding]:
        return [self.encode(t, add_special_tokens) for t in texts]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; ids outside the vocabulary read as nothing (as HF tokenizers' decode)."""
        size = self.get_vocab_size()
        ids = [i for i in map(int, ids) if 0 <= i < size]
        if skip_special_tokens or not any(i in self._special for i in ids):
            return self._raw.decode(ids, special_token_policy=self._ignore)
        parts: list[str] = []
        run: list[int] = []
        for i in ids + [-1]:
            if i == -1 or i in self._special:
                if run:
                    parts.append(self._raw.decode(run, special_token_policy=self._ignore))
                    run = []
                if i != -1:
                    parts.append(self._raw.id_to_piece(i))
            else:
                run.append(i)
        return "".join(parts)

    def id_to_token(self, token: int) -> str | None:
        """The token's piece (``<0x0A>`` for SentencePiece's byte fallback), or None outside the vocabulary."""
        if not 0 <= int(token) < self.get_vocab_size():
            return None
        return self._raw.id_to_piece(int(token))


def encode_checked(tokenizer: Any, text: str, origin: str, add_special_tokens: bool = True,
                   release_gil: bool = False) -> list[int]:
    """``tokenizer.encode(text).ids`` with a tokenizer failure (a panic) as one line naming ``origin``.

    ``add_special_tokens=False``: no BOS/EOS from the post-processor (text rendered by a chat
    template already holds them, as transformers' apply_chat_template assumes). ``release_gil``:
    encode through ``encode_batch``, which releases the GIL while it works (``encode`` holds it for
    the whole text: ~1 s per MB), for callers on a worker thread beside an event loop; same ids. Such
    callers run concurrently, so their stderr is not redirected (:func:`_rust_stderr_held` is
    process-wide and serialises): the request still fails with one line, but the server's log may
    show the Rust panic report."""
    try:
        if release_gil:  # a server's worker thread: no process-wide fd 2 redirect (a panic report may reach the log)
            return list(tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids)
        with _rust_stderr_held():
            return list(tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - see load_tokenizer
        raise CheckpointError(f"{origin}: the tokenizer failed on this text ({_first_line(e)})") from None
