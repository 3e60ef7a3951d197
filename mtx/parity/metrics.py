"""Error measures between an artifact's rows and the reference's, one value per position.

All inputs are float32 arrays whose last axis is the compared vector (vocabulary for logits, hidden
size for layer values); reductions run in float64. ``rel`` is ``||a - r|| / ||r||`` (L2), ``cosine``
is ``a·r / (||a|| ||r||)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TOP_K = 5


@dataclass
class RowErrors:
    """Per-row measures of ``a`` against ``r`` (arrays shaped like the inputs without the last axis)."""

    max_abs: np.ndarray
    mean_abs: np.ndarray
    rel: np.ndarray
    ref_max: np.ndarray  # max |r| of the row: the scale of the rtol term

    @classmethod
    def of(cls, a: np.ndarray, r: np.ndarray) -> RowErrors:
        return cls(*_row_errors(a.astype(np.float64), r.astype(np.float64)))


def _row_errors(a64: np.ndarray, r64: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(max_abs, mean_abs, rel, ref_max) of float64 rows."""
    diff = np.abs(a64 - r64)
    rel = np.linalg.norm(diff, axis=-1) / np.maximum(np.linalg.norm(r64, axis=-1), 1e-30)
    return diff.max(-1), diff.mean(-1), rel, np.abs(r64).max(-1)


@dataclass
class LogitErrors(RowErrors):
    """Logit rows [S, V]: also cosine similarity, top-1 agreement, top-5 overlap (0..5) and both argmaxes."""

    cosine: np.ndarray = None  # type: ignore[assignment]
    top1: np.ndarray = None  # type: ignore[assignment]
    top5_overlap: np.ndarray = None  # type: ignore[assignment]
    reference_token: np.ndarray = None  # type: ignore[assignment]
    artifact_token: np.ndarray = None  # type: ignore[assignment]

    @classmethod
    def of(cls, a: np.ndarray, r: np.ndarray) -> LogitErrors:
        a64, r64 = a.astype(np.float64), r.astype(np.float64)
        cosine = (a64 * r64).sum(-1) / np.maximum(np.linalg.norm(a64, axis=-1) * np.linalg.norm(r64, axis=-1), 1e-30)
        k = min(TOP_K, a.shape[-1])
        top_a = np.argpartition(-a, k - 1, axis=-1)[..., :k].reshape(-1, k)
        top_r = np.argpartition(-r, k - 1, axis=-1)[..., :k].reshape(-1, k)
        overlap = np.array([len(set(x) & set(y)) for x, y in zip(top_a, top_r)]).reshape(a.shape[:-1])
        tok_a, tok_r = a.argmax(-1), r.argmax(-1)  # ties: the lower id, as greedy decoding
        return cls(*_row_errors(a64, r64), cosine, tok_a == tok_r, overlap, tok_r, tok_a)
