"""Built-in default checkpoints: a small Mistral (sliding window) and a Mixtral variant.

Both were trained for a few minutes on CPU on Python's standard-library sources by
``scripts/make_default_model.py``, which remakes them.
"""

from __future__ import annotations

from pathlib import Path

from mtx.errors import UsageError

ROOT = Path(__file__).parent
DEFAULT_MODELS = ("mistral", "mixtral")


def default_checkpoint(name: str = "mistral") -> Path:
    """Folder of the built-in checkpoint ``name`` ("mistral" or "mixtral")."""
    if name not in DEFAULT_MODELS:
        raise UsageError(f"unknown built-in model {name!r}; expected one of {', '.join(DEFAULT_MODELS)}")
    path = ROOT / f"default-{name}"
    if not (path / "config.json").is_file():
        raise UsageError(f"built-in model {name!r} is missing at {path}; run scripts/make_default_model.py")
    return path


def resolve_checkpoint(arg: str | Path | None) -> Path:
    """A checkpoint argument: a folder, ``builtin:NAME``, or None for the default Mistral."""
    if arg is None:
        return default_checkpoint("mistral")
    text = str(arg)
    if text.startswith("builtin:"):
        return default_checkpoint(text.split(":", 1)[1])
    return Path(arg)
