"""mtx.runtime: serve an exported model (or a checkpoint, through the PyTorch reference).

    import mtx
    gen = mtx.load("OUT")                      # backend from the manifest: onnxruntime / tensorrt
    gen.generate(["def fib(n):"], max_new_tokens=32)
    s = gen.session(); s.append("x = 1"); s.generate(8)

Importing this package, and loading an export with the onnxruntime backend, does not import torch:
:class:`TorchBackend` (:mod:`mtx.runtime.torch_backend`) is imported on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtx.runtime.backends import Backend
from mtx.runtime.generator import Generator, Session
from mtx.tokenizer import load_tokenizer
from mtx.runtime.sampling import SamplingParams

if TYPE_CHECKING:
    from mtx.runtime.torch_backend import TorchBackend

__all__ = ["Backend", "Generator", "SamplingParams", "Session", "TorchBackend", "load"]


def __getattr__(name: str) -> Any:
    """``mtx.runtime.TorchBackend``, imported on first use (it imports torch)."""
    if name == "TorchBackend":
        from mtx.runtime.torch_backend import TorchBackend

        return TorchBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: ONNX Runtime's intra-op threads spin-wait for work (``session.intra_op.allow_spinning``) unless
#: ``spin`` says otherwise. Off: chosen by measurement (README, "Spinning"; scripts/bench_spin.py).
DEFAULT_SPIN = False


def check_engine_options(backend: str | None, threads: int | None, device: str | None,
                         spin: bool = DEFAULT_SPIN) -> None:
    """Backend a known name, threads within 1..the CPU count, device cpu / cuda / cuda:N, spin a bool."""
    import os
    import re

    from mtx.errors import UsageError
    from mtx.names import BACKENDS

    if backend is not None and backend not in BACKENDS:
        raise UsageError(f"backend: unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}",
                         params=("backend",))
    cpus = os.cpu_count() or 1
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= cpus):
        raise UsageError(f"threads must be an integer from 1 to {cpus} (the CPUs of this machine), got {threads!r}",
                         params=("threads",))
    if device is not None and not (isinstance(device, str) and re.fullmatch(r"cpu|cuda(:\d+)?", device)):
        raise UsageError(f"device: expected cpu, cuda or cuda:N, got {device!r}", params=("device",))
    if not isinstance(spin, bool):
        raise UsageError(f"spin: expected true or false, got {spin!r}", params=("spin",))


def load(path: str | Path | None = None, backend: str | None = None, *, device: str | None = None,
         threads: int | None = None, prefill_chunk: int = 256, max_batch: int | None = None,
         capacity: int | None = None, dtype: str | None = None, verify: bool = True,
         prefix_cache_bytes: int | None = None, spin: bool = DEFAULT_SPIN) -> Generator:
    """A :class:`Generator` for an export folder (``mtx.json`` inside) or a checkpoint folder.

    ``backend``: ``onnxruntime``, ``tensorrt`` or ``torch`` (the reference). Default: the export's
    target, or ``torch`` for a checkpoint folder. ``threads`` sets intra-op threads (CPU).
    ``spin``: ONNX Runtime's intra-op threads spin-wait between pieces of work
    (``session.intra_op.allow_spinning``); off by default, so they sleep and give a shared core back
    (other backends ignore it).
    ``verify``: check an export's files against the sha256 in ``mtx.json`` (:mod:`mtx.integrity`).
    ``prefill_chunk``: the prefill block (canonical chunks). ``prefix_cache_bytes``: bound of the prefix
    cache (0: off; None: the default where the window allows it, see :class:`Generator`).
    The onnxruntime backend fixes glibc's mmap threshold at 1 MiB for the whole process before it opens
    its session (:func:`mtx.runtime.memory.keep_freed_buffers_unmapped`: no freed copies of weights left
    resident in the heap).
    """
    from mtx.assets import resolve_checkpoint
    from mtx.errors import UsageError
    from mtx.manifest import MANIFEST

    check_engine_options(backend, threads, device, spin)
    root = resolve_checkpoint(path)
    if not root.exists():
        raise UsageError(f"{root}: no such folder")
    if (root / MANIFEST).is_file():
        from mtx.runtime.artifact import load_artifact

        return load_artifact(root, backend, device=device, threads=threads, prefill_chunk=prefill_chunk,
                             max_batch=max_batch, verify=verify, prefix_cache_bytes=prefix_cache_bytes,
                             spin=spin)
    if backend not in (None, "torch"):
        raise UsageError(f"{root}: not an mtx export (no mtx.json); backend {backend!r} needs `mtx export` output")
    from mtx.config import generation_eos_ids
    from mtx.runtime.torch_backend import TorchBackend

    be = TorchBackend.from_checkpoint(root, dtype or "float32", capacity=capacity, max_batch=max_batch or 8,
                                      threads=threads, device=device)
    return Generator(be, load_tokenizer(root), prefill_chunk=prefill_chunk,
                     eos_token_ids=generation_eos_ids(root, be.config.eos_token_ids),
                     prefix_cache_bytes=prefix_cache_bytes)
