"""What ``mtx parity`` runs, one engine call at a time, on a single sequence (batch row 0).

Every runner takes a chunk ``ids`` [S] int64 at absolute position ``start`` and returns a
:class:`StepOutput`: float32 logits [S, V] and, where the runner can expose them, the residual
stream of every layer [L, 2, S, H] float32 (index 0: after attention, 1: after the block). Each
runner keeps its own KV state between calls (docs/ops.md §1).

* :class:`TorchRunner` — an eager :class:`mtx.models.Transformer`: the float32 reference (built
  from CKPT, independent of the artifact) or the ``torch`` backend (the export's dtype and capacity).
  It also measures the router's top-k margin per MoE layer and token (the gap between the k-th and
  (k+1)-th expert probability, float32), which the diagnosis uses.
* :class:`BackendRunner` — any :class:`mtx.runtime.Backend` (onnxruntime, tensorrt): logits, and the
  layers where the backend fetches the export's ``layer_outputs`` (onnxruntime's ``extra_outputs``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from mtx.models import ops
from mtx.models.transformer import Transformer
from mtx.rolling_kv import KVPlan


@dataclass
class StepOutput:
    """One call's results: ``logits`` [S, V] float32; ``layers`` [L, 2, S, H] float32 or None;
    ``router_margin`` [L, S] float32 (MoE layers; NaN for dense) or None."""

    logits: np.ndarray
    layers: np.ndarray | None = None
    router_margin: np.ndarray | None = None


class Runner(Protocol):
    name: str
    has_layers: bool

    def run(self, ids: np.ndarray, start: int) -> StepOutput: ...


class TorchRunner:
    """An eager Transformer over its own rolling buffers (batch 1): ``capacity`` slots, or a KV plan's."""

    has_layers = True

    def __init__(self, name: str, model: Transformer, capacity: int | KVPlan, router_margins: bool = False) -> None:
        self.name = name
        self.model = model
        self.kv = model.new_kv(1, capacity)
        self.router_margins = router_margins and model.cfg.is_moe
        self._moe_inputs: list[torch.Tensor | None] = []
        if self.router_margins:
            for i, layer in enumerate(model.layers):
                layer.moe.register_forward_hook(self._keep_input(i))

    def _keep_input(self, index: int):
        def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            self._moe_inputs[index] = args[0]
        return hook

    def run(self, ids: np.ndarray, start: int) -> StepOutput:
        after_attention: list[torch.Tensor] = []
        after_block: list[torch.Tensor] = []
        self._moe_inputs = [None] * len(self.model.layers)
        with torch.no_grad():
            logits = self.model(torch.from_numpy(np.asarray(ids, dtype=np.int64))[None],
                                torch.tensor([start], dtype=torch.long), self.kv,
                                hidden_states=after_block, attention_states=after_attention)
            layers = torch.stack([torch.stack([a[0], b[0]]) for a, b in zip(after_attention, after_block)])
            margin = self._margins(len(ids)) if self.router_margins else None
        return StepOutput(logits[0].float().numpy(), layers.float().numpy(), margin)

    def _margins(self, seq: int) -> np.ndarray:
        """[L, S]: p_(k) - p_(k+1) of the float32 router softmax (docs/ops.md §3) at each token."""
        out = np.full((len(self.model.layers), seq), np.nan, dtype=np.float32)
        for i, (layer, x) in enumerate(zip(self.model.layers, self._moe_inputs)):
            moe = layer.moe
            if x is None or moe.top_k >= moe.w1.shape[0]:
                continue
            probs = ops.router_probs(x.reshape(-1, x.shape[-1]), moe.gate.weight)
            top = torch.topk(probs, moe.top_k + 1, dim=-1).values
            out[i] = (top[:, -2] - top[:, -1]).numpy()
        return out


class BackendRunner:
    """A runtime backend (``mtx.runtime.Backend``) driven on row 0 of a one-row state.

    ``layer_names``: per layer the ``after_attention`` and ``after_block`` value names the backend
    fetches as extra outputs into ``state.extra`` (onnxruntime); empty for logits only.
    """

    def __init__(self, name: str, backend: Any, layer_names: list[tuple[str, str]] | None = None) -> None:
        self.name = name
        self.backend = backend
        self.state = backend.new_state(1)
        self.layer_names = layer_names or []
        self.has_layers = bool(self.layer_names)

    def run(self, ids: np.ndarray, start: int) -> StepOutput:
        logits = self.backend.run(self.state, slice(0, 1), np.asarray(ids, dtype=np.int64)[None],
                                  np.asarray([start], dtype=np.int64), last_only=False)
        layers = None
        if self.layer_names:
            extra = self.state.extra
            layers = np.stack([np.stack([extra[a][0], extra[b][0]]) for a, b in self.layer_names])
        return StepOutput(np.asarray(logits[0], dtype=np.float32),
                          None if layers is None else layers.astype(np.float32, copy=False))
