"""``OUT/polygraphy_data_loader.py``: a Polygraphy data loader script written into every export.

    polygraphy run OUT/model.onnx --onnxrt --data-loader-script OUT/polygraphy_data_loader.py

The script's ``load_data()`` yields the feeds of a *first call* of the exported graph (docs/ops.md
§4, §6): ``input_ids`` int64 [1, S] in the vocabulary (seeded), ``start_pos`` int64 zeros [1], every
``past_*`` zeros [1, Hkv, C, D] in the export dtype. S defaults to 1 — Polygraphy's value for every
dynamic axis of a TensorRT profile nobody specified — so ``--trt`` works without shape options; the
environment variable ``MTX_POLYGRAPHY_SEQ`` asks for longer chunks (with matching
``--trt-*-shapes``). The script needs numpy only (ml_dtypes for bfloat16).
"""

from __future__ import annotations

from pathlib import Path

DATA_LOADER_FILE = "polygraphy_data_loader.py"

_TEMPLATE = '''"""Polygraphy data loader for the mtx export in this folder (written by `mtx export`; docs/ops.md §6).

    polygraphy run model.onnx --onnxrt --data-loader-script polygraphy_data_loader.py

load_data() yields {iterations} feed dict(s) of a first call: input_ids int64 [1, S] (token ids < {vocab}),
start_pos int64 [0], and every past_* zeros of its shape [1, Hkv, C_l, D] ({dtype}). S is 1 unless the environment variable
MTX_POLYGRAPHY_SEQ says otherwise (1 <= S <= {capacity}); TensorRT then needs a matching profile:
--trt-min-shapes/--trt-opt-shapes/--trt-max-shapes input_ids:[1,S] (see the mtx README).
"""

import os

import numpy as np

VOCAB_SIZE = {vocab}
CAPACITY = {capacity}
KV_DTYPE = "{dtype}"
KV_SHAPES = {kv_shapes}
ITERATIONS = {iterations}
SEED = 0


def _kv_dtype():
    if KV_DTYPE == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(KV_DTYPE)


def load_data():
    seq = int(os.environ.get("MTX_POLYGRAPHY_SEQ", "1"))
    if not 1 <= seq <= CAPACITY:
        raise ValueError(f"MTX_POLYGRAPHY_SEQ={{seq}}: expected 1 <= S <= {{CAPACITY}} "
                         f"(a first call must fit the buffer)")
    rng = np.random.default_rng(SEED)
    for _ in range(ITERATIONS):
        feed = {{"input_ids": rng.integers(0, VOCAB_SIZE, size=(1, seq), dtype=np.int64),
                 "start_pos": np.zeros((1,), dtype=np.int64)}}
        for name, shape in KV_SHAPES.items():
            feed[name] = np.zeros(shape, dtype=_kv_dtype())
        yield feed
'''


def data_loader_source(*, vocab_size: int, capacity: int, kv_shapes: dict[str, tuple[int, ...]], dtype: str,
                       iterations: int = 2) -> str:
    """Source text of the data loader for one export; ``kv_shapes`` maps each past_* input to [1, Hkv, C_l, D],
    ``capacity`` is the smallest C_l (a first call must fit every layer's buffer)."""
    shapes = {name: tuple(shape) for name, shape in kv_shapes.items()}
    return _TEMPLATE.format(vocab=vocab_size, capacity=capacity, kv_shapes=repr(shapes), dtype=dtype,
                            iterations=iterations)


def write_data_loader(folder: Path, **kw) -> Path:
    """Write :data:`DATA_LOADER_FILE` into ``folder`` (keyword arguments of :func:`data_loader_source`)."""
    path = folder / DATA_LOADER_FILE
    path.write_text(data_loader_source(**kw))
    return path
