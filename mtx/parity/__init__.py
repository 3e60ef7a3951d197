"""mtx parity: check an export against the PyTorch reference before shipping it (issue #6).

    from mtx.parity import ParityOptions, run_parity
    report = run_parity("CKPT", "OUT", ParityOptions(per_layer=True))
    report.passed, report.exit_code          # within tolerance at every position?
    mtx.parity.report.to_json(report)        # per-step records, summary, diagnosis

The reference is the float32 PyTorch model built from CKPT; the artifact runs through the runtime's
backends (onnxruntime, tensorrt, or torch in the export dtype). See :mod:`mtx.parity.core`.
"""

from __future__ import annotations

from mtx.parity.core import ParityReport, run_parity
from mtx.parity.options import DEFAULT_TOLERANCES, ParityOptions

__all__ = ["DEFAULT_TOLERANCES", "ParityOptions", "ParityReport", "run_parity"]
