"""A minimal ONNX Runtime driver for an export folder: one call at a time, KV buffers held per mtx.json.

This is the check harness of the exporter's tests, not the runtime (mtx.runtime.ort_backend): it
does no sampling, batching policy or device placement. Everything it knows about the buffers comes
from the manifest's ``kv`` section (docs/ops.md §5):

* buffers are numpy arrays ``[batch, Hkv, C, D]`` per layer, allocated once and never grown;
* ``past_present == "shared"`` and the attention runs as an ONNX Runtime op: past and present are
  bound (IOBinding) to the same memory, which ORT updates in place; otherwise ``present_*`` are
  copied back into the buffers (function bodies must not alias, docs/ops.md §4);
* ``multi_token_batch == "first_call_only"``: a call with ``seq > 1`` on several rows not all at
  position 0 is split into one call per row, each on a view of that row's buffers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mtx.exporter.manifest import Manifest, read_manifest

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64}


def _np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return NUMPY_DTYPES[name]


class OrtStepper:
    """Runs ``OUT/model.onnx`` on ONNX Runtime with rolling KV buffers for ``batch`` rows."""

    def __init__(self, out_dir: str | Path, batch: int, providers: list[str] | None = None) -> None:
        import onnxruntime as ort

        self.out_dir = Path(out_dir)
        self.manifest: Manifest = read_manifest(self.out_dir)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.out_dir / self.manifest.model), options,
                                            providers=providers or ["CPUExecutionProvider"])
        self.kv_names = [s.name for s in self.manifest.inputs if s.name.startswith("past_")]
        self.buffers = {s.name: np.zeros([batch, *s.shape[1:]], _np_dtype(s.dtype))
                        for s in self.manifest.inputs if s.name.startswith("past_")}
        self.alias = self.manifest.ort_aliases_past_present
        self.split_rows = self.manifest.kv.multi_token_batch == "first_call_only"

    def __call__(self, input_ids: np.ndarray, start_pos: np.ndarray, rows: slice = slice(None)) -> np.ndarray:
        """Logits [b, S, vocab] for ``input_ids`` [b, S] of buffer rows ``rows`` at ``start_pos`` [b].

        The buffers of those rows are updated as the call's present_* (in place or by copy).
        """
        input_ids = np.asarray(input_ids, np.int64)
        start_pos = np.asarray(start_pos, np.int64)
        first = rows.start or 0
        b, s = input_ids.shape
        if self.split_rows and s > 1 and b > 1 and (start_pos > 0).any():
            return np.concatenate([self._run(input_ids[i:i + 1], start_pos[i:i + 1], slice(first + i, first + i + 1))
                                   for i in range(b)])
        return self._run(input_ids, start_pos, slice(first, first + b))

    def _run(self, input_ids: np.ndarray, start_pos: np.ndarray, rows: slice) -> np.ndarray:
        views = {name: buf[rows] for name, buf in self.buffers.items()}
        if not self.alias:
            feeds = {"input_ids": input_ids, "start_pos": start_pos, **views}
            outputs = self.session.run(None, feeds)
            by_name = dict(zip((o.name for o in self.session.get_outputs()), outputs))
            for name, view in views.items():
                view[...] = by_name[name.replace("past_", "present_", 1)]
            return by_name["logits"]
        import onnxruntime as ort

        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("start_pos", start_pos)
        for name, view in views.items():
            value = ort.OrtValue.ortvalue_from_numpy(view)  # shares the buffer's memory
            binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output(name.replace("past_", "present_", 1), value)
        binding.bind_output("logits")
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[-1].numpy()
