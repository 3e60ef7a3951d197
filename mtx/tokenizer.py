"""The tokenizer files of a checkpoint or export folder, loaded and checked under mtx's error handling.

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

from mtx.config import GENERATION_CONFIG, generation_eos_ids, read_json_object
from mtx.errors import CheckpointError

TOKENIZER_JSON = "tokenizer.json"
#: Files an export copies from its checkpoint when present (role "tokenizer" in mtx.json).
TOKENIZER_FILES = (TOKENIZER_JSON, "tokenizer_config.json", "special_tokens_map.json", GENERATION_CONFIG,
                   "tokenizer.model")
JSON_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json")


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


def load_tokenizer(folder: Path) -> Any | None:
    """``folder/tokenizer.json`` as a ``tokenizers.Tokenizer``, or None where there is none."""
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


def check_side_files(folder: Path, default_eos: tuple[int, ...]) -> None:
    """Check every tokenizer-side file present in ``folder`` (at export and again at load)."""
    load_tokenizer(folder)
    generation_eos_ids(folder, default_eos)
    for name in JSON_SIDE_FILES:
        if (folder / name).is_file():
            read_json_object(folder / name, CheckpointError)


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
