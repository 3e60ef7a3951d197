"""A row's KV state at a position, detached from any buffer: what a prefix cache hit or a saved prefix
state seeds a row with (docs/ops.md §1 rules 10-11), and its file (docs/ops.md §6, "Prefix state files").

Only the live positions ``[first, position)`` are held (``first = max(0, position - W)``), in position
order, whatever the layout the row uses: a backend writes them where its layout puts them
(:func:`mtx.rolling_kv.slot_at`).

The file is a safetensors file (no pickle): tensors ``key.{l}`` and ``value.{l}`` [Hkv, n, D] in the
export dtype, and string metadata pinning the export (:func:`export_digest`, dtype, capacity, window)
and the sequence (position, first, tokens). The C++ runtime (``cpp/src/prefix_state.cpp``) reads and
writes the same files and refuses the same ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtx.errors import MtxError
from mtx.manifest import Manifest
from mtx.names import numpy_dtype
from mtx.rolling_kv import context_limit, effective_window

FORMAT = "mtx-prefix-state"
VERSION = "1"
#: The metadata keys of a version 1 file, all strings; no other key is allowed.
METADATA_KEYS = ("format", "version", "export_sha256", "dtype", "capacity", "window", "position", "first",
                 "tokens")
#: safetensors' dtype names of the export dtypes.
SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
#: Roles of the files whose bytes determine the keys and values an export computes.
PINNED_ROLES = ("model", "weights", "checkpoint-weights")


class PrefixStateError(MtxError):
    """A prefix state file that cannot seed this export: one line naming the file and the field (exit 2)."""


@dataclass(frozen=True)
class PrefixState:
    """``tokens``: the ids at positions ``0 .. position-1``; ``keys``/``values``: [L, Hkv, n, D] in the
    export dtype, the live positions ``first .. position-1`` in order (``n = position - first``)."""

    tokens: tuple[int, ...]
    first: int
    keys: np.ndarray
    values: np.ndarray

    @property
    def position(self) -> int:
        return len(self.tokens)

    @property
    def nbytes(self) -> int:
        return int(self.keys.nbytes + self.values.nbytes)


def export_digest(manifest: Manifest) -> str:
    """Hex sha256 of the lines ``"ROLE PATH SHA256\\n"`` of the manifest's files of roles model, weights
    and checkpoint-weights, in manifest order: it changes whenever the graph or a weight does."""
    text = "".join(f"{f.role} {f.path} {f.sha256}\n" for f in manifest.files if f.role in PINNED_ROLES)
    return hashlib.sha256(text.encode()).hexdigest()


def _window(manifest: Manifest, path: Path) -> int:
    """W of the export; PrefixStateError for an export with per-layer windows (no prefix state files, §6)."""
    if not manifest.kv_plan.uniform:
        raise PrefixStateError(f"{path}: this export's layers differ in KV window or capacity (windows "
                               f"{[x.window for x in manifest.layers]}); prefix state files need one window for "
                               f"every layer (docs/ops.md §6)")
    return effective_window(manifest.window or None, manifest.capacity)


def save_prefix_state(path: str | os.PathLike, state: PrefixState, manifest: Manifest) -> None:
    """Write ``state`` of the export ``manifest`` describes to ``path`` (a temporary file in the same
    folder, renamed into place: a reader never sees half a file). The state must be consistent with the
    export (the checks :func:`load_prefix_state` applies to the file's fields)."""
    from safetensors.numpy import save_file

    path = Path(path)
    window = _window(manifest, path)
    cfg = manifest.model_config
    position, first = state.position, state.first
    shape = (cfg.num_layers, cfg.num_kv_heads, position - first, cfg.head_dim)
    dtype = numpy_dtype(manifest.dtype)
    if position < 1 or first != max(0, position - window):
        raise PrefixStateError(f"{path}: position {position} and first {first} are not a state of this export "
                               f"(first = max(0, position - W), position >= 1)")
    for name, a in (("keys", state.keys), ("values", state.values)):
        if a.shape != shape or a.dtype != dtype:
            raise PrefixStateError(f"{path}: {name} are {a.dtype} {list(a.shape)}, the export's state is "
                                   f"{manifest.dtype} {list(shape)}")
    tensors: dict[str, np.ndarray] = {}
    for layer in range(cfg.num_layers):
        tensors[f"key.{layer}"] = np.ascontiguousarray(state.keys[layer])
        tensors[f"value.{layer}"] = np.ascontiguousarray(state.values[layer])
    metadata = {"format": FORMAT, "version": VERSION, "export_sha256": export_digest(manifest),
                "dtype": manifest.dtype, "capacity": str(manifest.capacity), "window": str(manifest.window),
                "position": str(position), "first": str(first), "tokens": json.dumps([int(t) for t in state.tokens])}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _count(value: str) -> int:
    """A whole non-negative decimal of at most 18 digits, or -1 (as the C++ reader)."""
    return int(value) if re.fullmatch(r"[0-9]{1,18}", value) else -1


def load_prefix_state(path: str | os.PathLike, manifest: Manifest) -> PrefixState:
    """Read a prefix state file written for the export ``manifest`` describes.

    Refuses, with :class:`PrefixStateError` naming the file and the field, anything inconsistent: not a
    safetensors file (``header``), another format or version, another export (``export_sha256``,
    ``dtype``, ``capacity``, ``window``), a position outside 1..the export's limit, ``first`` other than
    max(0, position - W), tokens not ``position`` ids of the vocabulary, metadata keys or tensors other
    than those of the format, a tensor of another dtype or shape.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    _window(manifest, path)

    def fail(key: str, what: str) -> PrefixStateError:
        return PrefixStateError(f"{path}: {key}: {what}"[:600])

    if not path.is_file():
        raise fail("file", "no such file" if not path.exists() else "not a regular file")
    cfg = manifest.model_config
    try:
        with safe_open(str(path), framework="numpy") as f:
            md = f.metadata()
            names = list(f.keys())
            specs = {n: (f.get_slice(n).get_dtype(), list(f.get_slice(n).get_shape())) for n in names}
            md = md if md is not None else {}

            def field(key: str) -> str:
                if key not in md:
                    raise fail(key, "missing")
                return md[key]

            def expect(key: str, want: str, why: str = "") -> None:
                got = field(key)
                if got != want:
                    raise fail(key, f"expected {json.dumps(want)}, got {json.dumps(got)[:80]}{why}")

            if "format" not in md:
                raise fail("format", "missing (no __metadata__)")
            expect("format", FORMAT)
            expect("version", VERSION, " (written by another mtx version)")
            expect("export_sha256", export_digest(manifest), " (written for another export)")
            expect("dtype", manifest.dtype, " (another export's dtype)")
            expect("capacity", str(manifest.capacity), " (another export's capacity)")
            expect("window", str(manifest.window), " (another export's window)")
            position = _count(field("position"))
            if position < 1:
                raise fail("position", f"expected an integer >= 1, got {json.dumps(field('position'))[:80]}")
            limit = context_limit(manifest.window or None, manifest.capacity, manifest.max_position)
            if limit is not None and position > limit:
                raise fail("position", f"{position} exceeds the {limit} positions this export can hold")
            window = _window(manifest, path)
            first = _count(field("first"))
            if first != max(0, position - window):
                raise fail("first", f"expected max(0, position - W) = {max(0, position - window)} (W = {window}), "
                                    f"got {json.dumps(field('first'))[:80]}")
            try:
                tokens = json.loads(field("tokens"))
            except (ValueError, RecursionError):
                raise fail("tokens", "not a JSON list of token ids") from None
            if not isinstance(tokens, list):
                raise fail("tokens", "not a JSON list of token ids")
            if len(tokens) != position:
                raise fail("tokens", f"{len(tokens)} ids for position {position}")
            for t in tokens:
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < cfg.vocab_size:
                    raise fail("tokens", f"id {json.dumps(t)[:40]} is not in the vocabulary of {cfg.vocab_size}")
            for key in md:
                if key not in METADATA_KEYS:
                    raise fail("header", f"metadata key {key!r} is not part of {FORMAT} version {VERSION}")
            wanted = [f"{kind}.{layer}" for layer in range(cfg.num_layers) for kind in ("key", "value")]
            for name in sorted(names):
                if name not in wanted:
                    raise fail(name, f"not a tensor of a prefix state of this {cfg.num_layers}-layer export")
            shape = [cfg.num_kv_heads, position - first, cfg.head_dim]
            st_dtype = SAFETENSORS_DTYPES[manifest.dtype]
            for name in wanted:
                if name not in specs:
                    raise fail(name, "missing")
                dtype, got = specs[name]
                if dtype != st_dtype:
                    raise fail(name, f"dtype {dtype}, the export's is {st_dtype} ({manifest.dtype})")
                if got != shape:
                    raise fail(name, f"shape {json.dumps(got)}, expected [Hkv, position - first, D] = "
                                     f"{json.dumps(shape)}")
            np_dtype = numpy_dtype(manifest.dtype)
            keys = np.stack([f.get_tensor(f"key.{layer}").view(np_dtype) for layer in range(cfg.num_layers)])
            values = np.stack([f.get_tensor(f"value.{layer}").view(np_dtype) for layer in range(cfg.num_layers)])
    except SafetensorError as e:
        raise fail("header", f"not a valid safetensors file ({str(e).splitlines()[0][:200] if str(e) else 'error'})"
                   ) from None
    except OSError as e:
        raise fail("file", f"cannot read it ({e.strerror or e})") from None
    return PrefixState(tuple(tokens), first, keys, values)
