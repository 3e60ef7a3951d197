"""The tokenizer files of a checkpoint or export folder, loaded and checked under mtx's error handling.

Every failure (unreadable, not UTF-8, not JSON, a tokenizer the ``tokenizers`` library rejects or
panics on) is a :class:`mtx.errors.CheckpointError` naming the file, never a traceback.
"""

from __future__ import annotations

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


def load_tokenizer(folder: Path) -> Any | None:
    """``folder/tokenizer.json`` as a ``tokenizers.Tokenizer``, or None where there is none."""
    path = folder / TOKENIZER_JSON
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    try:
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
    the whole text: ~1 s per MB), for callers on a worker thread beside an event loop; same ids."""
    try:
        if release_gil:
            return list(tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids)
        return list(tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - see load_tokenizer
        raise CheckpointError(f"{origin}: the tokenizer failed on this text ({_first_line(e)})") from None
