"""mtx: Mistral and Mixtral from PyTorch to ONNX Runtime and TensorRT."""

__version__ = "0.1.0"
