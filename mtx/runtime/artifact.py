"""Load an export folder (``mtx.json`` + ``model.onnx`` + tokenizer) into a :class:`Generator`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mtx.errors import UsageError
from mtx.runtime.generator import Generator, load_tokenizer


def read_manifest(root: Path) -> dict[str, Any]:
    from mtx.exporter import read_manifest as read

    return read(root)


def load_artifact(root: Path, backend: str | None, *, device: str | None = None, threads: int | None = None,
                  prefill_chunk: int = 256, max_batch: int | None = None) -> Generator:
    manifest = read_manifest(root)
    target = manifest["target"]
    name = backend or ("tensorrt" if target == "tensorrt" and manifest.get("engine") else "onnxruntime")
    if name == "onnxruntime":
        from mtx.runtime.ort_backend import OrtBackend

        be: Any = OrtBackend(root, manifest, threads=threads, device=device, max_batch=max_batch)
    elif name == "tensorrt":
        if not manifest.get("engine"):
            raise UsageError(f"{root}: no TensorRT engine in this export ({manifest['engine_status']}); "
                             f"use --backend onnxruntime or re-export with --target tensorrt on a TensorRT host")
        from mtx.runtime.trt_backend import TrtBackend

        be = TrtBackend(root, manifest, max_batch=max_batch)
    elif name == "torch":
        be = _torch_backend(root, manifest, threads=threads, device=device, max_batch=max_batch)
    else:
        raise UsageError(f"unknown backend {name!r}; expected onnxruntime, tensorrt or torch")
    eos = _eos_ids(root, manifest)
    return Generator(be, load_tokenizer(root), prefill_chunk=prefill_chunk, eos_token_ids=eos)


def _eos_ids(root: Path, manifest: dict[str, Any]) -> list[int]:
    import json

    ids = list(manifest["config"].get("eos_token_ids", []))
    gc = root / "generation_config.json"
    if gc.is_file():
        try:
            value = json.loads(gc.read_text()).get("eos_token_id")
        except json.JSONDecodeError:
            value = None
        if isinstance(value, int):
            ids = [value]
        elif isinstance(value, list):
            ids = [int(v) for v in value]
    return ids


def _torch_backend(root: Path, manifest: dict[str, Any], *, threads: int | None, device: str | None,
                   max_batch: int | None) -> Any:
    """The PyTorch reference of an export: the source checkpoint recorded in the manifest."""
    import torch

    from mtx.models import build_model
    from mtx.runtime.backends import TorchBackend

    ckpt = Path(manifest["checkpoint"]["path"])
    if not ckpt.is_dir():
        raise UsageError(f"{root}/mtx.json: the torch backend needs the source checkpoint {ckpt}, which is gone; "
                         f"pass the checkpoint folder itself to mtx.load")
    if threads:
        torch.set_num_threads(threads)
    model = build_model(ckpt, manifest["dtype"], device=device or "cpu")
    return TorchBackend(model, capacity=int(manifest["capacity"]), max_batch=max_batch or int(manifest["max_batch"]),
                        device=device or "cpu")
