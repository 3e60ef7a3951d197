"""Token selection from logits: greedy, temperature, top-k, top-p, repetition penalty (HF semantics)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mtx.errors import UsageError


@dataclass(frozen=True)
class SamplingParams:
    """``temperature == 0`` is greedy. ``top_k == 0`` and ``top_p == 1`` disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def validate(self) -> None:
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UsageError(f"{name} must be a finite number, got {value!r}", params=(name,))
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise UsageError(f"top_k must be an integer, got {self.top_k!r}", params=("top_k",))
        if self.temperature < 0:
            raise UsageError(f"temperature must be >= 0, got {self.temperature}", params=("temperature",))
        if self.top_k < 0:
            raise UsageError(f"top_k must be >= 0, got {self.top_k}", params=("top_k",))
        if not 0 < self.top_p <= 1:
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p}", params=("top_p",))
        if self.repetition_penalty <= 0:
            raise UsageError(f"repetition_penalty must be > 0, got {self.repetition_penalty}",
                             params=("repetition_penalty",))


def check_seed(seed: object) -> None:
    """A sampling seed is None or an integer >= 0 (numpy's SeedSequence rule)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise UsageError(f"seed must be an integer >= 0, got {seed!r}", params=("seed",))


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """Divide positive / multiply negative logits of already-seen token ids by ``penalty``."""
    if penalty == 1.0 or seen.size == 0:
        return logits
    out = logits.copy()
    ids = np.unique(seen)
    vals = out[ids]
    out[ids] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def select_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator | None,
                 seen: np.ndarray | None = None) -> int:
    """One token id from a float32 logits row [V]."""
    logits = logits.astype(np.float32, copy=False)
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature == 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / params.temperature
    if params.top_k and params.top_k < scaled.size:
        kth = np.partition(scaled, -params.top_k)[-params.top_k]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cum = np.cumsum(probs[order])
        keep = cum - probs[order] < params.top_p  # smallest prefix whose mass reaches top_p
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    assert rng is not None, "sampling needs an rng"
    return int(rng.choice(probs.size, p=probs))
