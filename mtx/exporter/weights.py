"""Give the traced graph its weights without holding them in RAM twice, and hold each one once on disk.

Invariant (docs/ops.md §6): the folder stores every initializer of the graph exactly once and no
other weight bytes, so the weight files' sizes are the initializers' bytes plus each checkpoint
file's safetensors header.

* A checkpoint file every tensor of which the graph reads exactly as stored (``Source.is_plain``,
  in the export dtype) is brought into the output folder as it is, and those initializers become
  external data at their tensors' byte offsets in it (safetensors data is raw little-endian, which is
  what ONNX external data means by offset and length). The file is cloned copy-on-write where the
  filesystem can (``FICLONE``: btrfs, XFS, ...; no data is copied) and otherwise streamed in chunks
  while its sha256 is computed. It is never hard-linked: onnx (checker and loader) rejects external
  data files with several hard links as a possible "hardlink attack", so a hard-linked export would
  fail ``onnx.checker.check_model``.
* A file holding any tensor the graph does not read as stored (q/k/v beside the packed QKV,
  per-expert tensors, weights replaced by quantised codes) is not brought in: the tensors the graph
  reads from it are written to :data:`DATA_FILE`.
* Every other tensor (dtype change, stacked experts, mistral-inference q/k permutation, tensors that
  lowering derives, ``inv_freq``) is a lazy tensor: it is produced one at a time while
  :data:`DATA_FILE` is written (back to back, no padding), and freed before the next.
"""

from __future__ import annotations

import errno
import hashlib
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir
import torch
from onnx_ir.tensor_adapters import TorchTensor, from_torch_dtype

from mtx.exporter.progress import Progress
from mtx.manifest import sha256_file
from mtx.models.checkpoint import SAFETENSORS_DTYPES, Checkpoint, TensorRef, check_finite

#: The output folder's own external data file (converted and derived tensors).
DATA_FILE = "model.onnx.data"


def lazy(name: str, shape: tuple[int, ...], dtype: torch.dtype, make: Callable[[], torch.Tensor]) -> ir.LazyTensor:
    """An initializer value computed only when it is written (``make`` returns it on the CPU)."""
    def evaluate() -> ir.TensorProtocol:
        t = make()
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise AssertionError(f"{name}: produced {t.dtype} {list(t.shape)}, expected {dtype} {list(shape)}")
        return TorchTensor(t.contiguous(), name=name)
    return ir.LazyTensor(evaluate, dtype=from_torch_dtype(dtype), shape=ir.Shape(shape), name=name)


@dataclass
class WeightReport:
    """What :func:`attach_weights` did: checkpoint files cloned or copied, and bytes referenced or written."""

    files: dict[str, str] = field(default_factory=dict)  # checkpoint file name in OUT -> "reflink" | "copy"
    sha256: dict[str, str] = field(default_factory=dict)  # of those files, computed while bringing them in
    referenced_bytes: int = 0  # initializer bytes that point into checkpoint files
    written_bytes: int = 0  # initializer bytes written to DATA_FILE
    referenced: int = 0  # number of initializers referencing checkpoint bytes
    written: int = 0  # number of initializers written to DATA_FILE

    def manifest_entry(self) -> dict[str, object]:
        """The manifest's ``weights`` object (docs/ops.md §5)."""
        return {"referenced_bytes": self.referenced_bytes, "written_bytes": self.written_bytes,
                "referenced_tensors": self.referenced, "written_tensors": self.written,
                "checkpoint_files": self.files}


FICLONE = 0x40049409  # linux/fs.h _IOW(0x94, 9, int); fcntl.FICLONE from Python 3.12
CHUNK = 16 << 20


def _reflink(src: Path, dst: Path) -> bool:
    """Copy-on-write clone of ``src`` at ``dst`` (no data copied). False (and no ``dst``) where unsupported."""
    if sys.platform != "linux":
        return False
    import fcntl

    with open(src, "rb") as fin, open(dst, "wb") as fout:
        try:
            fcntl.ioctl(fout.fileno(), FICLONE, fin.fileno())
            return True
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.EPERM, errno.ENOSYS):
                raise
    dst.unlink()
    return False


def _copy_hashing(src: Path, dst: Path, advance: Callable[[int], None]) -> str:
    """sha256 of ``src``, copying it to ``dst`` on the way (one chunk in memory at a time)."""
    h = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while block := fin.read(CHUNK):
            fout.write(block)
            h.update(block)
            advance(len(block))
    shutil.copystat(src, dst)
    return h.hexdigest()


def _is_zero_copy(ck: Checkpoint, name: str, dtype: torch.dtype) -> TensorRef | None:
    src = ck.sources.get(name)
    if src is None or not src.is_plain:
        return None
    ref = src.refs[0]
    return ref if SAFETENSORS_DTYPES[ref.dtype] == dtype else None


def attach_weights(model: ir.Model, ck: Checkpoint, dtype: torch.dtype, out_dir: Path,
                   progress: Progress, allow_nonfinite: bool = False) -> WeightReport:
    """Point every initializer of ``model`` at data under ``out_dir`` (the folder of model.onnx).

    Initializers named after checkpoint tensors come from ``ck`` in ``dtype``; others must already
    hold a value (a lazy tensor from lowering, or a small in-memory tensor). A checkpoint file all of
    whose tensors are initializers stored as they are is cloned (reflink) or copied into ``out_dir``
    and referenced; from any other file, the tensors the graph reads are written to
    :data:`DATA_FILE` like the converted ones (each weight once, docs/ops.md §6). Afterwards every
    initializer is an :class:`onnx_ir.ExternalTensor` relative to ``out_dir``. ``progress`` has
    ``task(description, total) -> advance(n)`` (mtx.exporter.progress.Progress).
    Every checkpoint tensor is checked for NaN and Inf as it is streamed (CheckpointError naming it),
    unless ``allow_nonfinite``.
    """
    def load(name: str) -> torch.Tensor:
        t = ck.load(name, dtype)
        if not allow_nonfinite:
            check_finite(name, t, ck.sources[name].refs[0])
        return t

    report = WeightReport()
    by_file: dict[Path, list[tuple[ir.Value, TensorRef]]] = {}
    to_write: list[tuple[ir.Value, ir.TensorProtocol]] = []
    for name, value in model.graph.initializers.items():
        ref = _is_zero_copy(ck, name, dtype)
        if ref is not None:
            by_file.setdefault(ref.file, []).append((value, ref))
        elif name in ck.sources:
            to_write.append((value, lazy(name, ck.shapes[name], dtype, lambda n=name: load(n))))
        elif value.const_value is not None:
            to_write.append((value, value.const_value))
        else:
            raise AssertionError(f"initializer {name!r} has no source")

    if len({f.name for f in by_file}) != len(by_file) or DATA_FILE in {f.name for f in by_file}:
        raise AssertionError("checkpoint file names collide in the output folder")
    stored: dict[Path, set[str]] = {}
    for key, ref in ck.refs.items():
        stored.setdefault(ref.file, set()).add(key)
    kept: dict[Path, str] = {}
    for src, items in by_file.items():
        read = [ref.key for _, ref in items]
        whole = len(set(read)) == len(read) and set(read) == stored[src] and \
            min(ref.data_offset for _, ref in items) + sum(ref.nbytes for _, ref in items) == src.stat().st_size
        if not whole:
            # the graph does not read every tensor of this file as stored (q/k/v beside the packed QKV,
            # per-expert tensors, quantised weights): placing it would hold unread bytes, so write the
            # tensors it does read instead
            to_write += [(v, lazy(v.name, ref.shape, dtype, lambda n=v.name: load(n))) for v, ref in items]
        elif _reflink(src, out_dir / src.name):
            kept[src] = "reflink"
        else:
            kept[src] = "copy"

    advance = progress.task("checkpoint", sum(src.stat().st_size for src in kept))
    for src, method in kept.items():
        local = src.name
        report.sha256[local] = (sha256_file(out_dir / local, advance) if method == "reflink"
                                else _copy_hashing(src, out_dir / local, advance))
        report.files[local] = method
        for value, ref in by_file[src]:
            if not allow_nonfinite:  # the file's bytes were just read: its tensors come from the page cache
                check_finite(value.name, ck.load(value.name), ref)
            value.const_value = ir.ExternalTensor(local, ref.data_offset, ref.nbytes, from_torch_dtype(dtype),
                                                  shape=ir.Shape(ref.shape), name=value.name, base_dir=str(out_dir))
            report.referenced += 1
            report.referenced_bytes += ref.nbytes

    if to_write:
        advance = progress.task("convert", sum(t.nbytes for _, t in to_write))
        written = ir.external_data.convert_tensors_to_external(
            [t for _, t in to_write], base_dir=str(out_dir), relative_path=DATA_FILE,
            callback=lambda tensor, info: advance(tensor.nbytes))
        for (value, _), ext in zip(to_write, written, strict=True):
            value.const_value = ext
            report.written += 1
            report.written_bytes += ext.nbytes
    return report
