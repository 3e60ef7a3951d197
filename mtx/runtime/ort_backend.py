"""ONNX Runtime backend: one InferenceSession, KV buffers bound with IOBinding (never copied per step).

The manifest's ``kv`` section (docs/ops.md §5) says how state passes between calls:
* ``past_present = "shared"``: ``past_*`` and ``present_*`` are bound to the same buffer, which the
  graph updates in place (GroupQueryAttention's shared cache).
* ``past_present = "separate"``: the graph (an mtx function body) writes ``present_*`` as new tensors,
  so each state has two buffer sets used in turn; each row remembers which set holds its state.
* ``multi_token_batch = "first_call_only"``: a multi-token call on several rows not all at position 0
  runs one row at a time.
Buffers are allocated once per state at ``[batch, Hkv, C, D]``; a call on rows ``a:b`` binds views
(pointer offsets) into them, so rows can be prefilled one at a time and decoded together.

ONNX Runtime's errors, at session creation and at each call, are one line naming the graph
(:func:`ort_error`): :class:`OrtModelError` (exit 2) for a graph that does not load or run, and
:class:`mtx.errors.ResourceError` (exit 1) where memory ran out.

``extra_outputs`` names values inside the graph (``mtx.json`` ``layer_outputs``) to fetch as well:
the session is then opened on an in-memory copy of the graph with those values as outputs (external
data resolved against the export folder, which is never modified), and each call leaves them in
``state.extra``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mtx.errors import MtxError, ResourceError, UsageError
from mtx.integrity import external_data_folder, read_graph
from mtx.manifest import Manifest
from mtx.names import ONNX_ELEMENT_TYPES, numpy_dtype
from mtx.runtime.memory import keep_freed_buffers_unmapped
from mtx.runtime.backends import Backend, HostRow

#: Dtypes whose exports ONNX Runtime's CPU and CUDA providers run.
ORT_DTYPES = ("float32", "float16")
#: ONNX Runtime's type of the logits output -> the numpy dtype of the buffer bound for it.
LOGITS_DTYPES: dict[str, type] = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
EXTERNAL_DATA_FOLDER = "session.model_external_initializers_file_folder_path"
ALLOW_SPINNING = "session.intra_op.allow_spinning"


@dataclass
class OrtKV:
    """KV buffers of ``batch`` rows: ``sets[s][2*l]`` keys, ``sets[s][2*l+1]`` values of layer l."""

    sets: list[list[Any]]
    current: np.ndarray  # [batch] index of the set holding each row's state (always 0 when shared)
    row_bytes: list[int]  # bytes of one row of layer l's key (or value) buffer
    batch: int
    device: str
    bindings: dict[tuple[int, int, int], Any] = field(default_factory=dict)  # (row0, row1, src set) -> IOBinding
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # extra_outputs of the last call [b, S, ...]


#: Phrases of ONNX Runtime's messages that mean memory ran out (the machine's fault, not the graph's).
OUT_OF_MEMORY = ("bad_alloc", "failed to allocate", "out of memory", "cannot allocate memory")


class OrtModelError(MtxError):
    """ONNX Runtime refused to load or run an export's graph (exit 2: a bad artifact)."""


def ort_error(path: Path, e: BaseException, when: str) -> MtxError:
    """One line naming ``path`` for an exception ONNX Runtime raised ``when`` ("load" / "run")."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()] or [type(e).__name__]
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", lines[0])
    text = re.sub(r"/onnxruntime_src/\S+:\d+ ", "", text)[:300]
    doing = "cannot load" if when == "load" else "failed to run"
    if isinstance(e, MemoryError) or any(k in text.lower() for k in OUT_OF_MEMORY):
        return ResourceError(f"{path}: ONNX Runtime {doing} it: out of memory ({text or 'MemoryError'})")
    return OrtModelError(f"{path}: ONNX Runtime {doing} it ({text})")


def graph_with_outputs(root: Path, manifest: Manifest, names: Sequence[str]) -> Any:
    """``root/model.onnx`` (a ModelProto without its external data) with ``names`` appended to the
    graph outputs.

    Each is declared ``[batch, seq, H]`` in the export dtype. Raises MtxError if a name is not a
    value of the main graph.
    """
    import onnx

    path = root / manifest.model
    model = read_graph(root, manifest)
    produced = {out for node in model.graph.node for out in node.output}
    hidden = manifest.model_config.hidden_size
    for name in names:
        if name not in produced:
            raise MtxError(f"{path}: value {name!r} (mtx.json layer_outputs) is not computed in the graph; "
                           f"the export and its manifest disagree")
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, ONNX_ELEMENT_TYPES[manifest.dtype],
                                                                     ["batch", "seq", hidden]))
    return model


def session_model(root: Path, manifest: Manifest, extra_outputs: Sequence[str]) -> tuple[Any, str | None]:
    """What to open an InferenceSession on, and the folder of its external data (None: beside it).

    The graph's path, unless values are added as outputs or its external data are symlinks out of
    the folder (ONNX Runtime refuses those; their sha256 in mtx.json pins their bytes): then the
    serialised graph, its locations relative to the folder holding every resolved file.
    """
    proto = read_graph(root, manifest)
    moved = external_data_folder(root, proto)
    if not extra_outputs and moved is None:
        return str(root / manifest.model), None
    if extra_outputs:
        proto = graph_with_outputs(root, manifest, extra_outputs)
    folder = root.resolve()
    if moved is not None:
        folder, locations = moved
        for t in proto.graph.initializer:
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = locations[entry.value]
    return proto.SerializeToString(), str(folder)


class OrtBackend(Backend):
    name = "onnxruntime"

    def __init__(self, root: Path, manifest: Manifest, threads: int | None = None,
                 device: str | None = None, max_batch: int | None = None,
                 extra_outputs: Sequence[str] = (), spin_wait: bool = True) -> None:
        """``spin_wait``: ``session.intra_op.allow_spinning`` (False: intra-op threads sleep when out of
        work instead of spinning; ``mtx.load`` passes its ``spin``, default off)."""
        import onnxruntime as ort

        self.root = root
        self.manifest = manifest
        self.config = manifest.model_config
        self.kv_plan = manifest.kv_plan
        self.max_batch = max_batch or manifest.max_batch
        self.max_position = manifest.max_position
        self.shared = manifest.ort_aliases_past_present
        self.multi_token_batch = manifest.kv.multi_token_batch
        self.rerun_safe = "ort_window" not in self.kv_plan.layouts
        dtype = manifest.dtype
        if dtype not in ORT_DTYPES:
            raise UsageError(f"{root}: the onnxruntime backend runs {' and '.join(ORT_DTYPES)} exports, "
                             f"this one is {dtype}")
        self.np_dtype = numpy_dtype(dtype)
        self.extra_outputs = list(extra_outputs)
        self.device = device or "cpu"
        providers = ["CPUExecutionProvider"]
        if self.device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise UsageError("device cuda needs onnxruntime-gpu (CUDAExecutionProvider is not available)",
                                 params=("device",))
            providers.insert(0, "CUDAExecutionProvider")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.inter_op_num_threads = 1
        if threads:
            so.intra_op_num_threads = threads
        so.log_severity_level = 4  # failures surface as exceptions, reported in one line
        so.add_session_config_entry(ALLOW_SPINNING, "1" if spin_wait else "0")
        model, folder = session_model(root, manifest, self.extra_outputs)
        if folder is not None:
            so.add_session_config_entry(EXTERNAL_DATA_FOLDER, folder)
        self.path = root / manifest.model
        keep_freed_buffers_unmapped()  # no freed initializer copies left resident (mtx.runtime.memory)
        try:
            self.session = ort.InferenceSession(model, so, providers=providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime's pybind errors share no useful base class
            raise ort_error(self.path, e, "load") from None
        names = {i.name for i in self.session.get_inputs()}
        self.layers = self.config.num_layers
        self.past = [(f"past_key.{l}", f"past_value.{l}") for l in range(self.layers)]
        self.present = [(f"present_key.{l}", f"present_value.{l}") for l in range(self.layers)]
        missing = [n for pair in self.past for n in pair if n not in names] + \
                  [n for n in ("input_ids", "start_pos") if n not in names]
        if missing:
            raise UsageError(f"{root / manifest.model}: graph input {missing[0]!r} missing (docs/ops.md §4)")
        self.kv_shapes = [(self.config.num_kv_heads, c, self.config.head_dim) for c in self.kv_plan.capacities]
        logits_type = {o.name: o.type for o in self.session.get_outputs()}.get("logits")
        if logits_type not in LOGITS_DTYPES:
            raise UsageError(f"{root / manifest.model}: graph output 'logits' is {logits_type or 'missing'}; "
                             f"expected float32 or float16 (docs/ops.md §4)")
        self.logits_dtype = LOGITS_DTYPES[logits_type]
        self._ort = ort

    def new_state(self, batch: int) -> OrtKV:
        if batch > self.max_batch:
            raise UsageError(f"batch {batch} exceeds the maximum batch {self.max_batch}")
        shapes = [(batch, *s) for s in self.kv_shapes for _ in range(2)]  # 2*l key, 2*l+1 value
        n_sets = 1 if self.shared else 2
        try:
            sets = self._allocate(shapes, n_sets)
        except MemoryError:
            raise ResourceError(f"out of memory for the KV buffers of {batch} rows "
                                f"({n_sets} x {self.layers} layers x 2 x {list(shapes[0])}, capacities "
                                f"{sorted(set(self.kv_plan.capacities))} {self.manifest.dtype})") from None
        row_bytes = [int(np.prod(s)) * np.dtype(self.np_dtype).itemsize for s in self.kv_shapes]
        return OrtKV(sets, np.zeros(batch, dtype=np.int64), row_bytes, batch, self.device)

    def _allocate(self, shapes: list[tuple[int, ...]], n_sets: int) -> list[list[Any]]:
        """``n_sets`` sets of zeroed buffers of ``shapes`` (2 * layers of them; host or device)."""
        sets: list[list[Any]] = []
        for _ in range(n_sets):
            if self.device == "cpu":
                sets.append([np.zeros(s, dtype=self.np_dtype) for s in shapes])
            else:
                sets.append([self._ort.OrtValue.ortvalue_from_numpy(np.zeros(s, dtype=self.np_dtype), "cuda", 0)
                             for s in shapes])
        return sets

    def state_nbytes(self, state: OrtKV) -> int:
        return len(state.sets) * 2 * state.batch * sum(state.row_bytes)

    def row_buffers(self, state: OrtKV, row: int) -> list[Any]:
        """Views of ``row`` in the set holding its state; device buffers through a host copy."""
        bufs = state.sets[int(state.current[row])]
        if state.device == "cpu":
            return [b[row] for b in bufs]

        def write_back(buf: Any) -> Any:
            def put(host_row: np.ndarray) -> None:
                host = buf.numpy()
                host[row] = host_row
                buf.update_inplace(host)
            return put

        return [HostRow(b.numpy()[row].copy(), write_back(b)) for b in bufs]

    def _ptr(self, buf: Any, row: int, row_bytes: int) -> int:
        base = buf.ctypes.data if isinstance(buf, np.ndarray) else buf.data_ptr()
        return base + row * row_bytes

    def _align_rows(self, state: OrtKV, rows: slice) -> int:
        """Separate buffers: make every row of ``rows`` live in the same set (copy once if needed)."""
        cur = state.current[rows]
        target = int(np.bincount(cur, minlength=2).argmax())
        for r in np.nonzero(cur != target)[0] + rows.start:
            for src, dst in zip(state.sets[1 - target], state.sets[target]):
                if isinstance(dst, np.ndarray):
                    dst[r] = src[r]
                else:  # device buffers: a row copy through host, only after per-row prefill
                    host_src, host_dst = src.numpy(), dst.numpy()
                    host_dst[r] = host_src[r]
                    dst.update_inplace(host_dst)
            state.current[r] = target
        return target

    def _bind_kv(self, state: OrtKV, rows: slice, src: int) -> Any:
        """An IOBinding with logits (bound first), this row range's past/present buffer views, then
        the extra outputs (last): get_outputs() follows binding order."""
        io = self.session.io_binding()
        io.bind_output("logits", "cpu")
        dst = src if self.shared else 1 - src
        dev = "cpu" if state.device == "cpu" else "cuda"
        for l in range(self.layers):
            shape = [rows.stop - rows.start, *self.kv_shapes[l]]
            for j in range(2):
                io.bind_input(self.past[l][j], dev, 0, self.np_dtype, shape,
                              self._ptr(state.sets[src][2 * l + j], rows.start, state.row_bytes[l]))
                io.bind_output(self.present[l][j], dev, 0, self.np_dtype, shape,
                               self._ptr(state.sets[dst][2 * l + j], rows.start, state.row_bytes[l]))
        for name in self.extra_outputs:
            io.bind_output(name, "cpu")
        return io

    def run(self, state: OrtKV, rows: slice, input_ids: np.ndarray, start_pos: np.ndarray,
            last_only: bool) -> np.ndarray:
        b = rows.stop - rows.start
        if input_ids.shape[1] > 1 and b > 1 and self.multi_token_batch == "first_call_only" and np.any(start_pos != 0):
            parts = [self.run(state, slice(r, r + 1), input_ids[i:i + 1], start_pos[i:i + 1], last_only)
                     for i, r in enumerate(range(rows.start, rows.stop))]
            return np.concatenate(parts)
        src = 0 if self.shared else self._align_rows(state, rows)
        io = state.bindings.get((rows.start, rows.stop, src))
        if io is None:  # KV views of these rows, bound once and reused by every later call on them
            try:
                io = self._bind_kv(state, rows, src)
            except Exception as e:  # noqa: BLE001 - a graph whose names or types do not bind
                raise ort_error(self.path, e, "run") from None
            state.bindings[(rows.start, rows.stop, src)] = io
        try:
            io.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
            io.bind_cpu_input("start_pos", np.ascontiguousarray(start_pos, dtype=np.int64))
            if self.extra_outputs:
                logits = None
                io.bind_output("logits", "cpu")  # rebinding keeps its place and lets ORT size it anew
                for name in self.extra_outputs:
                    io.bind_output(name, "cpu")
            else:  # written in place: no OrtValue per output to wrap and copy after the call
                logits = np.empty((b, input_ids.shape[1], self.config.vocab_size), dtype=self.logits_dtype)
                io.bind_output("logits", "cpu", 0, self.logits_dtype, list(logits.shape), logits.ctypes.data)
            self.session.run_with_iobinding(io)
        except Exception as e:  # noqa: BLE001 - onnxruntime's pybind errors share no useful base class
            raise ort_error(self.path, e, "run") from None
        if not self.shared:
            state.current[rows] = 1 - src
        if logits is None:
            outputs = io.get_outputs()
            logits = outputs[0].numpy()
            extra = outputs[len(outputs) - len(self.extra_outputs):]
            state.extra = {name: v.numpy() for name, v in zip(self.extra_outputs, extra)}
        if last_only:
            logits = logits[:, -1:]
        return logits.astype(np.float32, copy=False)
