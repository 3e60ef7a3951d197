"""ONNX Runtime for ``mtx parity``, with the export's per-layer values as extra outputs for ``--per-layer``.

The export records in ``mtx.json`` (``layer_outputs``, docs/ops.md §5) the names of the values
inside ``model.onnx`` that hold each layer's residual stream after attention and after the block.
:func:`probed_model_bytes` adds them as graph outputs in an in-memory copy of the graph (external
data not loaded; OUT is never modified) and :class:`ParityOrtBackend` opens the session from those
bytes, resolving external data against OUT with the session option
``session.model_external_initializers_file_folder_path``. :class:`ParityOrtBackend` is the
onnxruntime backend of ``mtx parity`` with or without these extra outputs.

Everything else — KV buffers, ``past_present`` sharing, row splitting, binding — is the runtime's
:class:`mtx.runtime.ort_backend.OrtBackend`, used as it is: its session is wrapped so that each
``run_with_iobinding`` also binds the probe outputs (after the backend's own outputs, so the
backend's output indices are unchanged) and keeps their values for the caller.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mtx.errors import MtxError
from mtx.exporter.manifest import Manifest
from mtx.runtime.ort_backend import OrtBackend

EXTERNAL_DATA_FOLDER = "session.model_external_initializers_file_folder_path"
NO_SPINNING = "session.intra_op.allow_spinning"
_ONNX_DTYPES = {"float32": 1, "float16": 10, "bfloat16": 16}  # onnx.TensorProto element types


def probe_names(manifest: Manifest) -> list[str]:
    """Per layer ``after_attention`` then ``after_block`` value names, layer 0 first."""
    return [name for lo in manifest.layer_outputs for name in (lo.after_attention, lo.after_block)]


def probed_model_bytes(root: Path, manifest: Manifest, names: list[str]) -> bytes:
    """``root/model.onnx`` (without its external data) with ``names`` appended to the graph outputs.

    Each is declared ``[batch, seq, H]`` in the export dtype. Raises MtxError if a name is not a
    value of the main graph.
    """
    import onnx

    path = root / manifest.model
    model = onnx.load(str(path), load_external_data=False)
    produced = {out for node in model.graph.node for out in node.output}
    hidden = int(manifest.config["hidden_size"])
    for name in names:
        if name not in produced:
            raise MtxError(f"{path}: value {name!r} (mtx.json layer_outputs) is not computed in the graph; "
                           f"the export and its manifest disagree")
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, _ONNX_DTYPES[manifest.dtype],
                                                                     ["batch", "seq", hidden]))
    return model.SerializeToString()


class _ProbingSession:
    """An InferenceSession whose IOBinding runs also fetch ``names`` (to CPU) into :attr:`values`.

    Not thread-safe (one run at a time): ``mtx parity`` drives one sequence.
    """

    def __init__(self, session: Any, names: list[str]) -> None:
        self._session = session
        self.names = names
        self.values: dict[str, np.ndarray] = {}

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._session, attr)

    def run_with_iobinding(self, binding: Any, *args: Any, **kwargs: Any) -> None:
        for name in self.names:
            binding.bind_output(name, "cpu")
        self._session.run_with_iobinding(binding, *args, **kwargs)
        outputs = binding.get_outputs()
        probed = outputs[len(outputs) - len(self.names):]
        self.values = {name: value.numpy() for name, value in zip(self.names, probed)}


class ParityOrtBackend(OrtBackend):
    """:class:`OrtBackend` as ``mtx parity`` runs it, between eager PyTorch calls in the same process.

    Its threads do not spin-wait after a run (``session.intra_op.allow_spinning = 0``): spinning
    threads would take the cores from the reference model running in between. With ``probe``, the
    session is opened on an in-memory copy of the model whose per-layer values are outputs, and
    after each :meth:`run`, :meth:`layer_values` returns them as [L, 2, b, S, H] float32
    (index 0: after attention, 1: after the block).
    """

    def __init__(self, root: Path, manifest: Manifest, probe: bool = False, **kw: Any) -> None:
        self._probe_names = probe_names(manifest) if probe else []
        self._probe_bytes = probed_model_bytes(root, manifest, self._probe_names) if probe else None
        super().__init__(root, manifest, **kw)

    def _open_session(self, options: Any, providers: list[str]) -> Any:
        import onnxruntime as ort

        options.add_session_config_entry(NO_SPINNING, "0")
        options.log_severity_level = 4  # a failing kernel is reported by mtx parity, in one line
        if self._probe_bytes is None:
            return super()._open_session(options, providers)
        options.add_session_config_entry(EXTERNAL_DATA_FOLDER, str(self.root.resolve()))
        session = ort.InferenceSession(self._probe_bytes, options, providers=providers)
        self._probe_bytes = None
        return _ProbingSession(session, self._probe_names)

    def layer_values(self) -> np.ndarray:
        values = self.session.values
        layers = [np.stack([values[a], values[b]]) for a, b in zip(self._probe_names[0::2], self._probe_names[1::2])]
        return np.stack(layers).astype(np.float32, copy=False)
