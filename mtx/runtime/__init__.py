"""mtx.runtime: serve an exported model (or a checkpoint, through the PyTorch reference).

    import mtx
    gen = mtx.load("OUT")                      # backend from the manifest: onnxruntime / tensorrt
    gen.generate(["def fib(n):"], max_new_tokens=32)
    s = gen.session(); s.append("x = 1"); s.generate(8)
"""

from __future__ import annotations

from pathlib import Path

from mtx.runtime.backends import Backend, TorchBackend
from mtx.runtime.generator import Generator, Session, load_tokenizer
from mtx.runtime.sampling import SamplingParams

__all__ = ["Backend", "Generator", "SamplingParams", "Session", "TorchBackend", "load"]


def load(path: str | Path | None = None, backend: str | None = None, *, device: str | None = None,
         threads: int | None = None, prefill_chunk: int = 256, max_batch: int | None = None,
         capacity: int | None = None, dtype: str | None = None) -> Generator:
    """A :class:`Generator` for an export folder (``mtx.json`` inside) or a checkpoint folder.

    ``backend``: ``onnxruntime``, ``tensorrt`` or ``torch`` (the reference). Default: the export's
    target, or ``torch`` for a checkpoint folder. ``threads`` sets intra-op threads (CPU).
    """
    from mtx.assets import resolve_checkpoint
    from mtx.errors import UsageError
    from mtx.manifest import MANIFEST

    root = resolve_checkpoint(path)
    if not root.exists():
        raise UsageError(f"{root}: no such folder")
    if (root / MANIFEST).is_file():
        from mtx.runtime.artifact import load_artifact

        return load_artifact(root, backend, device=device, threads=threads, prefill_chunk=prefill_chunk,
                             max_batch=max_batch)
    if backend not in (None, "torch"):
        raise UsageError(f"{root}: not an mtx export (no mtx.json); backend {backend!r} needs `mtx export` output")
    from mtx.config import generation_eos_ids

    be = TorchBackend.from_checkpoint(root, dtype or "float32", capacity=capacity, max_batch=max_batch or 8,
                                      threads=threads, device=device)
    return Generator(be, load_tokenizer(root), prefill_chunk=prefill_chunk,
                     eos_token_ids=generation_eos_ids(root, be.config.eos_token_ids))
