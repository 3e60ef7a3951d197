"""mtx export: PyTorch checkpoint -> ONNX with the mtx custom ops -> ONNX Runtime / TensorRT.

    from mtx.exporter.core import export
    from mtx.exporter.options import ExportOptions
    result = export("path/to/checkpoint", "out", ExportOptions(target="onnxruntime"))

(or ``mtx.export(...)``). The artifact it writes is read with :func:`mtx.manifest.read_manifest`.
This package imports nothing by itself, so ``mtx.exporter.options`` checks options without torch.
"""
