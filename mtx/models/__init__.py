"""The PyTorch reference of the Mistral family: model, reference ops and checkpoint loading."""

from mtx.models.checkpoint import Checkpoint, build_model
from mtx.models.transformer import KVBuffers, Transformer

__all__ = ["Checkpoint", "KVBuffers", "Transformer", "build_model"]
