"""mtx: Mistral and Mixtral from PyTorch to ONNX Runtime and TensorRT.

    import mtx
    gen = mtx.load("OUT")                 # an `mtx export` folder (or a checkpoint: PyTorch reference)
    gen.generate(["def main(argv):"], max_new_tokens=32)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from mtx.runtime import Generator


def load(*args: Any, **kwargs: Any) -> Generator:
    """:func:`mtx.runtime.load` (imported on first use, so ``import mtx`` stays light)."""
    from mtx.runtime import load as _load

    return _load(*args, **kwargs)


def export(*args: Any, **kwargs: Any) -> Any:
    """:func:`mtx.exporter.core.export` (imported on first use)."""
    from mtx.exporter.core import export as _export

    return _export(*args, **kwargs)
