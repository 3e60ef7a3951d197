"""Make the Triton interpreter (TRITON_INTERPRET=1, the CPU test tool) treat bfloat16 like the GPU.

Triton 3.9's interpreter stores bfloat16 as raw uint16 and

* ``tl.dot`` on bfloat16 operands multiplies those integers (garbage results), and
* float32 -> bfloat16 casts truncate instead of rounding to nearest even (the GPU emits cvt.rn).

Both only concern the interpreter; compiled kernels are unaffected. :func:`patch` fixes the two
methods of the interpreter's builder so the bfloat16 kernels can be checked on CPU against the
PyTorch reference. It is applied by :mod:`mtx.kernels` only when the interpreter is active, and is
idempotent.
"""

from __future__ import annotations

import numpy as np


def _bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even), NaN stays NaN; returns uint16 bits."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


def patch() -> None:
    from triton import language as tl
    from triton.runtime import interpreter as interp

    builder = interp.InterpreterBuilder
    if getattr(builder, "_mtx_bf16_patched", False):
        return
    handle = interp.TensorHandle
    orig_dot = builder.create_dot
    orig_cast = builder.cast_impl
    orig_fp_to_fp = builder.create_fp_to_fp

    def as_f32(h):
        if h.dtype.scalar == tl.bfloat16:
            return handle(_bf16_bits_to_f32(h.data), tl.float32)
        return h

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return orig_dot(self, as_f32(a), as_f32(b), d, input_precision, max_num_imprecise_acc)

    def to_bf16(src):
        data = src.data if src.dtype.scalar == tl.float32 else src.data.astype(np.float32)
        return handle(_f32_to_bf16_bits(data), tl.bfloat16)

    def cast_impl(self, src, dst_type):
        if dst_type.scalar == tl.bfloat16 and src.dtype.scalar in (tl.float32, tl.float16):
            return to_bf16(src)
        return orig_cast(self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if dst_type.scalar == tl.bfloat16 and src.dtype.scalar in (tl.float32, tl.float16):
            return to_bf16(src)
        return orig_fp_to_fp(self, src, dst_type, rounding_mode)

    builder.create_dot = create_dot
    builder.cast_impl = cast_impl
    builder.create_fp_to_fp = create_fp_to_fp
    builder._mtx_bf16_patched = True
