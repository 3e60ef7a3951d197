"""mtx export: PyTorch checkpoint -> ONNX with the mtx custom ops -> ONNX Runtime / TensorRT.

    from mtx.exporter import ExportOptions, export, read_manifest
    result = export("path/to/checkpoint", "out", ExportOptions(target="onnxruntime"))
    manifest = read_manifest("out")

Names are imported on first use, so reading a manifest (``read_manifest``, ``Manifest``) or
checking options does not import torch or onnx.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MANIFEST": "mtx.exporter.manifest", "Manifest": "mtx.exporter.manifest",
    "ManifestError": "mtx.exporter.manifest", "read_manifest": "mtx.exporter.manifest",
    "ExportOptions": "mtx.exporter.options",
    "ExportError": "mtx.exporter.core", "ExportResult": "mtx.exporter.core", "Progress": "mtx.exporter.core",
    "export": "mtx.exporter.core",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mtx.exporter' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
