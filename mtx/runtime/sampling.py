"""Token selection from logits: greedy, temperature, top-k, top-p, repetition penalty (HF semantics),
presence and frequency penalties (OpenAI's definitions), and the log-probabilities a request asks for.

Seeded sampling is portable: :class:`TokenRng` is SplitMix64, and a token is drawn by inverse CDF over
the filtered float64 probabilities in token-id order, so the C++ runtime draws the same tokens.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np

from mtx.errors import UsageError


@dataclass(frozen=True)
class SamplingParams:
    """``temperature == 0`` is greedy. ``top_k == 0`` and ``top_p == 1`` disable those filters.

    ``presence_penalty`` / ``frequency_penalty`` in [-2, 2] (OpenAI's range; 0 disables them): token j's
    logit loses ``frequency_penalty * count[j] + presence_penalty * (count[j] > 0)``, ``count`` over the
    generated tokens only (not the prompt). Applied after the repetition penalty, before temperature."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @property
    def counts_generated(self) -> bool:
        """Whether selection needs the generated ids (a presence or frequency penalty is set)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0

    def validate(self) -> None:
        for name in ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
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
        for name in ("presence_penalty", "frequency_penalty"):
            if not -MAX_PENALTY <= getattr(self, name) <= MAX_PENALTY:
                raise UsageError(f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {getattr(self, name)}",
                                 params=(name,))


#: OpenAI's bound on |presence_penalty| and |frequency_penalty|.
MAX_PENALTY = 2.0
#: The most alternatives a request may ask log-probabilities of (OpenAI's ``top_logprobs`` limit).
MAX_LOGPROBS = 20

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _mix64(z: int) -> int:
    """SplitMix64's output function on a 64-bit integer."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


class TokenRng:
    """Uniform draws in [0, 1) for one sequence: SplitMix64 with state ``mix64(seed) ^ stream``.

    Stream ``r`` is row ``r`` of a batch; a sequence generated alone (a session, a served request)
    is stream 0, so its tokens do not depend on what else runs. ``seed=None`` picks a random seed.
    """

    def __init__(self, seed: int | None, stream: int = 0) -> None:
        if seed is None:
            seed = secrets.randbits(63)
        self.state = _mix64(seed & _MASK64) ^ (stream & _MASK64)

    def next_u64(self) -> int:
        """The next SplitMix64 output."""
        self.state = (self.state + _GOLDEN) & _MASK64
        return _mix64(self.state)

    def uniform(self) -> float:
        """The next draw: the top 53 bits of the next output, times 2**-53."""
        return (self.next_u64() >> 11) * (1.0 / (1 << 53))


def check_seed(seed: object) -> None:
    """A sampling seed is None or an integer in [0, 2**63)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 63):
        raise UsageError(f"seed must be an integer in [0, 2**63), got {seed!r}", params=("seed",))


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """Divide positive / multiply negative logits of already-seen token ids by ``penalty``."""
    if penalty == 1.0 or seen.size == 0:
        return logits
    out = logits.copy()
    ids = np.unique(seen)
    vals = out[ids]
    out[ids] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def apply_presence_frequency(logits: np.ndarray, generated: np.ndarray, presence: float,
                             frequency: float) -> np.ndarray:
    """``logits[j] - frequency * count[j] - presence * (count[j] > 0)``, ``count`` of j in ``generated``
    (OpenAI's formula), computed in float64 and returned as float32; ``logits`` itself is not changed."""
    if generated.size == 0 or (presence == 0 and frequency == 0):
        return logits
    ids, counts = np.unique(generated, return_counts=True)
    out = logits.copy()
    out[ids] = (out[ids].astype(np.float64) - (frequency * counts + presence)).astype(np.float32)
    return out


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities at one step, of the model's raw logits (log-softmax before any penalty,
    temperature or filter, as OpenAI documents): ``logprob`` of the chosen token and ``top``, the
    ``(id, logprob)`` of the most likely tokens, most likely first (ties: lower id first)."""

    logprob: float
    top: tuple[tuple[int, float], ...]


def token_logprobs(logits: np.ndarray, token: int, top_n: int) -> TokenLogprobs:
    """The :class:`TokenLogprobs` of ``token`` and the ``top_n`` most likely ids of a logits row [V]
    (float64 log-softmax; infinite logits clamped to the largest float32 as :func:`select_token` does)."""
    big = np.finfo(np.float32).max
    x = np.clip(logits.astype(np.float64), -big, big)
    m = x.max()
    lp = x - (m + np.log(np.exp(x - m).sum()))
    top: tuple[tuple[int, float], ...] = ()
    if top_n > 0:
        n = min(top_n, lp.size)
        cand = np.argpartition(-lp, n - 1)[:n] if n < lp.size else np.arange(lp.size)
        cand = cand[np.lexsort((cand, -lp[cand]))]
        top = tuple((int(i), float(lp[i])) for i in cand)
    return TokenLogprobs(float(lp[token]), top)


def penalised_logits(logits: np.ndarray, params: SamplingParams, seen: np.ndarray | None = None,
                     generated: np.ndarray | None = None) -> np.ndarray:
    """Logits [V] (float32, finite: infinities clamped to the largest float32) after the repetition
    penalty (over ``seen``) and the presence/frequency penalties (over ``generated``); ValueError on NaN."""
    logits = logits.astype(np.float32, copy=False)
    big = np.finfo(np.float32).max
    if not np.isfinite(logits).all():  # one pass over the row in the common, finite case
        if np.isnan(logits).any():
            raise ValueError("the model produced NaN logits for this row")
        logits = np.clip(logits, -big, big)
    if seen is not None and params.repetition_penalty != 1.0:
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
        logits = np.clip(logits, -big, big)
    if generated is not None and params.counts_generated:
        with np.errstate(over="ignore", invalid="ignore"):
            logits = apply_presence_frequency(logits, generated, params.presence_penalty, params.frequency_penalty)
        logits = np.clip(logits, -big, big)
    return logits


def select_token(logits: np.ndarray, params: SamplingParams, rng: TokenRng | None,
                 seen: np.ndarray | None = None, generated: np.ndarray | None = None) -> int:
    """One token id in ``[0, V)`` from a logits row [V]; greedy takes no draw, sampling takes one.

    No option value can produce NaN probabilities: infinite logits and penalised values that overflow
    are clamped to the largest float32, and where ``x / T`` overflows the maximum is subtracted before
    dividing by the temperature (otherwise the arithmetic is the C++ runtime's, draw for draw). NaN
    logits (a broken row) raise ValueError, which fails that request alone. ``seen``: the ids the
    repetition penalty counts (prompt and generated); ``generated``: the generated ids, which the
    presence and frequency penalties count (the C++ runtime has neither penalty).
    """
    logits = penalised_logits(logits, params, seen, generated)
    if params.temperature == 0:
        return int(np.argmax(logits))
    with np.errstate(over="ignore", invalid="ignore"):
        scaled = logits.astype(np.float64) / params.temperature
        if not np.isfinite(scaled.max()):  # a temperature so small that x / T overflows: subtract first
            x = logits.astype(np.float64)
            scaled = (x - x.max()) / params.temperature  # <= 0 everywhere, the maximum exactly 0
            scaled = np.where(np.isnan(scaled), -np.inf, scaled)
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
    cdf = np.cumsum(probs)
    return min(int(np.searchsorted(cdf, rng.uniform() * cdf[-1], side="right")), probs.size - 1)
