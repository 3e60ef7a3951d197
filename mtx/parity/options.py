"""Options of ``mtx parity`` and the default tolerances per export dtype.

Tolerance rule (one per position, for logits and, with ``--per-layer``, for each layer's residual
stream): the artifact's row ``a`` matches the reference row ``r`` when
``max|a - r| <= atol + rtol * max|r|``. The reference is always the float32 PyTorch model, so for a
float16/bfloat16 export the tolerance must cover the export dtype's own rounding of every weight and
activation; it scales with the size of the row (``rtol * max|r|``) because a rounding error in a
logit is proportional to the hidden state and the output row, not to that logit's own value.

Defaults (see :data:`DEFAULT_TOLERANCES`):

* float32 — ``atol 1e-4``, ``rtol 0``: the artifact computes the same float32 math in another order;
  correct exports differ by ~1e-6, while a wrong window, buffer or router moves logits by >= 1e-2.
* float16 — ``atol 1e-2``, ``rtol 1e-2``: float16 keeps 11 significant bits (unit roundoff
  u = 2^-11 = 4.9e-4). Every weight and every activation is rounded to T, and the errors add up over
  the layers, so logits typically move by a few tens of u relative to the logit scale; 1e-2 relative
  (20 u) plus 1e-2 absolute leaves room for deep models while an off-by-one window or a flipped
  expert (errors of the order of the logits themselves) still fails.
* bfloat16 — ``atol 8e-2``, ``rtol 8e-2``: the same budget scaled by bfloat16's 8x coarser roundoff
  (8 significant bits, u = 2^-8 = 3.9e-3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mtx.errors import UsageError
from mtx.names import BACKENDS


#: dtype -> (atol, rtol) of the per-position rule ``max|a - r| <= atol + rtol * max|r|``.
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float32": (1e-4, 0.0),
    "float16": (1e-2, 1e-2),
    "bfloat16": (8e-2, 8e-2),
}


@dataclass(frozen=True)
class Tolerance:
    """``max|a - r| <= atol + rtol * max|r|`` per position; ``source`` says where the values came from."""

    atol: float
    rtol: float
    source: str

    def limit(self, ref_max: Any) -> Any:
        """The allowed max abs error for ``ref_max`` (a float or an array of per-position maxima)."""
        return self.atol + self.rtol * ref_max


#: Quantised exports with ``accuracy_level 4`` (int8 activations inside ONNX Runtime's MatMulNBits):
#: each activation block is rounded to 1/254 of its largest value before every product, which moves
#: logits by a few percent of their scale (measured up to 3.2% on the test models); 0.1 relative
#: still fails a wrong window or buffer, which moves them by the order of the logits themselves.
INT8_ACTIVATION_TOLERANCE = (1e-4, 0.1)


def tolerance_for(dtype: str, atol: float | None, rtol: float | None, int8_activations: bool = False) -> Tolerance:
    """The dtype's defaults (or :data:`INT8_ACTIVATION_TOLERANCE`), each overridden by ``atol`` / ``rtol``."""
    d_atol, d_rtol = DEFAULT_TOLERANCES[dtype]
    if int8_activations:
        d_atol, d_rtol = max(d_atol, INT8_ACTIVATION_TOLERANCE[0]), max(d_rtol, INT8_ACTIVATION_TOLERANCE[1])
        dtype = f"{dtype} with int8 activations (accuracy_level 4)"
    if atol is None and rtol is None:
        source = f"default for {dtype}"
    elif atol is not None and rtol is not None:
        source = "--atol/--rtol"
    else:
        source = f"{'--atol' if atol is not None else '--rtol'}, other value default for {dtype}"
    return Tolerance(d_atol if atol is None else atol, d_rtol if rtol is None else rtol, source)


@dataclass(frozen=True)
class ParityOptions:
    """What ``mtx parity`` runs. ``None`` means "choose from the export" (see each field).

    * ``backends``: artifact backends; default onnxruntime, plus tensorrt when the export has an engine.
    * ``prompt``: prefill text (tokenized with OUT's tokenizer); else ``prompt_len`` random ids from ``seed``.
    * ``prompt_len``, ``steps``, ``chunk``: defaults derived from the window W and capacity C
      (:func:`mtx.parity.schedule.plan_schedule`).
    * ``atol``, ``rtol``: override the dtype's default tolerance.
    """

    backends: tuple[str, ...] | None = None
    prompt: str | None = None
    prompt_len: int | None = None
    steps: int | None = None
    chunk: int | None = None
    per_layer: bool = False
    atol: float | None = None
    rtol: float | None = None
    seed: int = 0

    def validate(self) -> None:
        """Raise UsageError naming the option for values that can never work."""
        if self.backends is not None:
            if not self.backends:
                raise UsageError(f"backends: give at least one of {', '.join(BACKENDS)}", params=("backends",))
            for name in self.backends:
                if name not in BACKENDS:
                    raise UsageError(f"backends: unknown backend {name!r}; expected a comma-separated list of "
                                     f"{', '.join(BACKENDS)}", params=("backends",))
            if len(set(self.backends)) != len(self.backends):
                raise UsageError(f"backends: {','.join(self.backends)} names a backend twice", params=("backends",))
        if self.prompt is not None and self.prompt_len is not None:
            raise UsageError("prompt and prompt_len: give one of them (text, or a number of random ids)",
                             params=("prompt", "prompt_len"))
        if self.prompt is not None and not self.prompt.strip():
            raise UsageError("prompt: empty text", params=("prompt",))
        for opt, value, low in (("prompt_len", self.prompt_len, 1), ("steps", self.steps, 0),
                                ("chunk", self.chunk, 1)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise UsageError(f"{opt}: expected an integer >= {low}, got {value!r}", params=(opt,))
        for opt, value in (("atol", self.atol), ("rtol", self.rtol)):
            if value is not None and not (isinstance(value, (int, float)) and value >= 0 and value == value):
                raise UsageError(f"{opt}: expected a number >= 0, got {value!r}", params=(opt,))
