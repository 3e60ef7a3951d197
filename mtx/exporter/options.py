"""Options of ``mtx export`` and the output-folder rules, checked before any heavy import or work."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mtx.errors import UsageError
from mtx.manifest import DTYPES, MANIFEST, TARGETS
from mtx.quantize import BLOCK_SIZES, QUANTIZE_BITS, SCHEMES, QuantSpec
from mtx.tokenizer import TOKENIZER_MODES

#: ``accuracy_level`` values of MatMulNBits / QMoE that mtx writes (docs/ops.md §7).
ACCURACY_LEVELS = (0, 4)


@dataclass(frozen=True)
class ExportOptions:
    """Options of ``mtx export`` (see ``mtx export --help``)."""

    target: str = "onnxruntime"
    dtype: str = "float32"
    cache_capacity: int | None = None  # default: the sliding window, or max_position_embeddings
    max_batch: int = 8
    max_position: int | None = None  # onnxruntime target: rows of the rotary tables
    force: bool = False
    allow_nonfinite: bool = False  # export weights holding NaN or Inf (refused by default)
    quantize: str | None = None  # "int8" | "int4": weight-only quantisation (docs/ops.md §7)
    block_size: int = 128  # elements per quantisation block along the input dimension
    quantize_lm_head: bool = True  # the output projection in lm_head_bits
    quantize_embedding: bool = True  # the embedding table in embedding_bits (tied: lm_head_bits), docs/ops.md §7
    embedding_bits: int = 8  # 8 (default) or 4
    lm_head_bits: int = 8  # 8 (default) or 4
    quant_scheme: str = "asymmetric"  # or "symmetric"
    accuracy_level: int = 4  # onnxruntime target: 4 = int8 activations (fast), 0 = float activations (exact)
    tokenizer_mode: str = "auto"  # "hf", "mistral" or "auto" (mtx.tokenizer.tokenizer_mode)

    @property
    def quant_spec(self) -> QuantSpec | None:
        """The block rule of the projections and experts, or None for float weights."""
        if self.quantize is None:
            return None
        return QuantSpec(QUANTIZE_BITS[self.quantize], self.block_size, self.quant_scheme)

    def validate(self) -> None:
        """Raise UsageError naming the option for any value that cannot work, whatever the checkpoint."""
        if self.target not in TARGETS:
            raise UsageError(f"target: unknown target {self.target!r}; expected one of {', '.join(TARGETS)}",
                             params=("target",))
        if self.dtype not in DTYPES:
            raise UsageError(f"dtype: unknown dtype {self.dtype!r}; expected one of {', '.join(DTYPES)}", params=("dtype",))
        for opt, value in (("cache_capacity", self.cache_capacity), ("max_batch", self.max_batch),
                           ("max_position", self.max_position)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UsageError(f"{opt}: expected a positive integer, got {value!r}", params=(opt,))
        if self.quantize is not None and self.quantize not in QUANTIZE_BITS:
            raise UsageError(f"quantize: unknown weight format {self.quantize!r}; expected one of "
                             f"{', '.join(QUANTIZE_BITS)}", params=("quantize",))
        if isinstance(self.block_size, bool) or self.block_size not in BLOCK_SIZES:
            raise UsageError(f"block_size: expected one of {', '.join(map(str, BLOCK_SIZES))}, got "
                             f"{self.block_size!r}", params=("block_size",))
        for opt in ("lm_head_bits", "embedding_bits"):
            value = getattr(self, opt)
            if isinstance(value, bool) or value not in (4, 8):
                raise UsageError(f"{opt}: expected 4 or 8, got {value!r}", params=(opt,))
        if self.quant_scheme not in SCHEMES:
            raise UsageError(f"quant_scheme: expected one of {', '.join(SCHEMES)}, got {self.quant_scheme!r}",
                             params=("quant_scheme",))
        if isinstance(self.accuracy_level, bool) or self.accuracy_level not in ACCURACY_LEVELS:
            raise UsageError(f"accuracy_level: expected one of {', '.join(map(str, ACCURACY_LEVELS))}, got "
                             f"{self.accuracy_level!r}", params=("accuracy_level",))
        if self.tokenizer_mode not in TOKENIZER_MODES:
            raise UsageError(f"tokenizer_mode: expected one of {', '.join(TOKENIZER_MODES)}, got "
                             f"{self.tokenizer_mode!r}", params=("tokenizer_mode",))
        if self.quantize is not None and self.dtype == "bfloat16":
            raise UsageError("quantize: quantised exports take dtype float32 or float16 (ONNX Runtime's "
                             "MatMulNBits has no bfloat16 CPU kernel)", params=("quantize", "dtype"))
        if self.max_position is not None and self.target != "onnxruntime":
            raise UsageError(f"max_position: applies to target onnxruntime only (the rotary tables of "
                             f"GroupQueryAttention), not to {self.target}", params=("max_position", "target"))


def check_out(out: Path, force: bool) -> None:
    """Refuse to replace anything without --force, and never replace a file with a folder.

    An absent or empty folder is fine; an earlier export or any other non-empty folder needs --force.
    """
    resolved, here = out.resolve(), Path.cwd().resolve()
    if resolved == here or resolved in here.parents:
        raise UsageError(f"out {out}: is the current folder or a folder above it; name a folder of its own",
                         params=("out",))
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UsageError(f"out {out}: exists and is not a folder", params=("out",))
    if out.is_dir() and any(out.iterdir()) and not force:
        what = "an mtx export" if (out / MANIFEST).is_file() else "a folder that is not an mtx export (no mtx.json)"
        raise UsageError(f"out {out}: already exists and is {what}; pass force to replace it", params=("out", "force"))
