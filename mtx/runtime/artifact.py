"""Load an export folder (``mtx.json`` + ``model.onnx`` + tokenizer) into a :class:`Generator`.

An export is verified (mtx.integrity), opened, and run once (:func:`warm_up`) before it is handed
out: what cannot run is refused at load, in one line naming the file.

torch is imported only for the ``torch`` backend (the PyTorch reference of the export's checkpoint).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtx.config import generation_eos_ids
from mtx.errors import UsageError
from mtx.integrity import verify_export
from mtx.manifest import Manifest, ManifestError, read_manifest
from mtx.runtime.generator import Generator
from mtx.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from mtx.runtime.torch_backend import TorchBackend


def load_artifact(root: Path, backend: str | None, *, device: str | None = None, threads: int | None = None,
                  prefill_chunk: int = 256, max_batch: int | None = None, verify: bool = True,
                  prefix_cache_bytes: int | None = None, spin: bool = False) -> Generator:
    """``verify``: recompute the files' sha256 (weights once per file state, mtx.integrity); ``spin``:
    ONNX Runtime's intra-op spin-wait (onnxruntime backend only)."""
    manifest = read_manifest(root)
    verify_export(root, manifest, verify)
    target = manifest.target
    name = backend or ("tensorrt" if target == "tensorrt" and manifest.engine else "onnxruntime")
    if name == "onnxruntime":
        from mtx.runtime.ort_backend import OrtBackend

        be: Any = OrtBackend(root, manifest, threads=threads, device=device, max_batch=max_batch, spin_wait=spin)
    elif name == "tensorrt":
        if not manifest.engine:
            raise UsageError(f"{root}: no TensorRT engine in this export ({manifest.engine_status}); "
                             f"use backend onnxruntime, or export again with target tensorrt on a TensorRT host",
                             params=("backend",))
        from mtx.runtime.trt_backend import TrtBackend

        be = TrtBackend(root, manifest, max_batch=max_batch)
    elif name == "torch":
        be = _torch_backend(root, manifest, threads=threads, device=device, max_batch=max_batch)
    else:
        raise UsageError(f"unknown backend {name!r}; expected onnxruntime, tensorrt or torch")
    if name == "onnxruntime":
        warm_up(be)
    eos = generation_eos_ids(root, be.config.eos_token_ids)
    return Generator(be, load_tokenizer(root), prefill_chunk=prefill_chunk, eos_token_ids=eos,
                     prefix_cache_bytes=prefix_cache_bytes)


def warm_up(be: Any) -> None:
    """One call of one token at position 0 on a one-row state, so that a graph ONNX Runtime loads but
    cannot run (a manifest or graph at odds with itself) is refused at load, never by a serving request.
    The backend raises MtxError naming the graph."""
    import numpy as np

    state = be.new_state(1)
    logits = be.run(state, slice(0, 1), np.zeros((1, 1), dtype=np.int64), np.zeros(1, dtype=np.int64), True)
    if logits.shape != (1, 1, be.config.vocab_size):
        raise ManifestError(f"{be.root / be.manifest.model}: logits of shape {list(logits.shape)} for one token; "
                            f"expected [1, 1, {be.config.vocab_size}]")


def _torch_backend(root: Path, manifest: Manifest, *, threads: int | None, device: str | None,
                   max_batch: int | None) -> TorchBackend:
    """The PyTorch reference of an export: the source checkpoint recorded in the manifest."""
    from mtx.runtime.torch_backend import TorchBackend

    ckpt = Path(manifest.checkpoint["path"])
    if not ckpt.is_dir():
        raise UsageError(f"{root}/mtx.json: the torch backend needs the source checkpoint {ckpt}, which is gone; "
                         f"pass the checkpoint folder itself to mtx.load")
    return TorchBackend.from_checkpoint(ckpt, manifest.dtype, capacity=manifest.reference_plan,
                                        max_batch=max_batch or manifest.max_batch, threads=threads,
                                        device=device, quantization=manifest.quantization)
