"""mtx export: PyTorch checkpoint -> ONNX with the mtx custom ops -> ONNX Runtime / TensorRT.

    from mtx.exporter import ExportOptions, export, read_manifest
    result = export("path/to/checkpoint", "out", ExportOptions(target="onnxruntime"))
    manifest = read_manifest("out")
"""

from mtx.exporter.core import ExportError, ExportOptions, ExportResult, Progress, export
from mtx.exporter.manifest import MANIFEST, Manifest, ManifestError, read_manifest

__all__ = ["MANIFEST", "ExportError", "ExportOptions", "ExportResult", "Manifest", "ManifestError", "Progress",
           "export", "read_manifest"]
