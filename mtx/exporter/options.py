"""Options of ``mtx export`` and the output-folder rules, checked before any heavy import or work."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mtx.errors import UsageError
from mtx.manifest import DTYPES, MANIFEST, TARGETS


@dataclass(frozen=True)
class ExportOptions:
    """Options of ``mtx export`` (see ``mtx export --help``)."""

    target: str = "onnxruntime"
    dtype: str = "float32"
    cache_capacity: int | None = None  # default: the sliding window, or max_position_embeddings
    max_batch: int = 8
    max_position: int | None = None  # onnxruntime target: rows of the rotary tables
    force: bool = False
    allow_nonfinite: bool = False  # export weights holding NaN or Inf (refused by default)

    def validate(self) -> None:
        """Raise UsageError naming the option for any value that cannot work, whatever the checkpoint."""
        if self.target not in TARGETS:
            raise UsageError(f"target: unknown target {self.target!r}; expected one of {', '.join(TARGETS)}",
                             params=("target",))
        if self.dtype not in DTYPES:
            raise UsageError(f"dtype: unknown dtype {self.dtype!r}; expected one of {', '.join(DTYPES)}", params=("dtype",))
        for opt, value in (("cache_capacity", self.cache_capacity), ("max_batch", self.max_batch),
                           ("max_position", self.max_position)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UsageError(f"{opt}: expected a positive integer, got {value!r}", params=(opt,))
        if self.max_position is not None and self.target != "onnxruntime":
            raise UsageError(f"max_position: applies to target onnxruntime only (the rotary tables of "
                             f"GroupQueryAttention), not to {self.target}", params=("max_position", "target"))


def check_out(out: Path, force: bool) -> None:
    """Refuse to replace anything without --force, and never replace a file with a folder.

    An absent or empty folder is fine; an earlier export or any other non-empty folder needs --force.
    """
    resolved, here = out.resolve(), Path.cwd().resolve()
    if resolved == here or resolved in here.parents:
        raise UsageError(f"out {out}: is the current folder or a folder above it; name a folder of its own",
                         params=("out",))
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UsageError(f"out {out}: exists and is not a folder", params=("out",))
    if out.is_dir() and any(out.iterdir()) and not force:
        what = "an mtx export" if (out / MANIFEST).is_file() else "a folder that is not an mtx export (no mtx.json)"
        raise UsageError(f"out {out}: already exists and is {what}; pass force to replace it", params=("out", "force"))
