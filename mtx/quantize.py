"""Round-to-nearest block quantisation of weights (docs/ops.md §7): the one home of the rule.

A weight ``w`` [..., N, K] (K the input dimension) is quantised row by row in blocks of ``bs``
elements along K (the last block of a row may be short). :func:`quantize` returns the unsigned codes
``u``, the scales ``s`` (in the model dtype T) and zero points ``z``; ``ŵ = float32(u - z) ·
float32(s)`` rounded to T is :func:`dequantize`. The ONNX Runtime layouts (MatMulNBits / QMoE
packing) and the DequantizeLinear form are derived from the same :class:`Quantized` value, and the
PyTorch reference uses :func:`fake_quantize`, so the graph and its oracle can only agree.

Rows are independent, so leading dimensions (experts) flatten into rows, and quantising the row
blocks of a concatenated or interleaved tensor equals quantising its parts one by one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

#: ``--quantize`` names -> code width of the projections and experts.
QUANTIZE_BITS: dict[str, int] = {"int8": 8, "int4": 4}
BLOCK_SIZES = (32, 64, 128)
SCHEMES = ("asymmetric", "symmetric")
LM_HEAD_BITS = 8  # the output projection's default code width (docs/ops.md §7)
EMBEDDING_BITS = 8  # the embedding table's default code width (docs/ops.md §7)
ROWS_PER_CHUNK = 4096  # rows quantised at once: bounds the float32 temporaries (~16 * rows * K bytes)


@dataclass(frozen=True)
class QuantSpec:
    """``bits`` 4 or 8, ``block_size`` along K, ``scheme`` asymmetric | symmetric."""

    bits: int
    block_size: int
    scheme: str = "asymmetric"

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def default_zero_point(self) -> int:
        return 1 << (self.bits - 1)


@dataclass
class Quantized:
    """``codes`` uint8 [..., N, kb, bs] (short last block padded with the zero point), ``scales``
    [..., N, kb] in T, ``zero_points`` uint8 [..., N, kb]; ``k`` the logical input size."""

    codes: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor
    k: int
    spec: QuantSpec

    @property
    def blocks(self) -> int:
        return self.codes.shape[-2]


def _quantize_rows(w: torch.Tensor, spec: QuantSpec, scale_dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [R, K] float32 -> codes [R, kb, bs] uint8, scales [R, kb] scale_dtype, zero points [R, kb] uint8."""
    rows, k = w.shape
    bs = spec.block_size
    kb = math.ceil(k / bs)
    pad = kb * bs - k
    blocks = torch.nn.functional.pad(w, (0, pad)).reshape(rows, kb, bs)
    if pad:
        valid = torch.ones(kb * bs, dtype=torch.bool)
        valid[k:] = False
        valid = valid.reshape(1, kb, bs)
        lo_src = torch.where(valid, blocks, torch.inf)
        hi_src = torch.where(valid, blocks, -torch.inf)
    else:
        valid, lo_src, hi_src = None, blocks, blocks
    if spec.scheme == "asymmetric":
        lo = torch.clamp(lo_src.amin(-1), max=0.0)
        hi = torch.clamp(hi_src.amax(-1), min=0.0)
        s = ((hi - lo) / spec.qmax).to(scale_dtype).to(torch.float32)
        safe = torch.where(s > 0, s, 1.0)
        z = torch.where(s > 0, torch.clamp(torch.round(-lo / safe), 0, spec.qmax), 0.0)
        u = torch.clamp(torch.round(blocks / safe[..., None]) + z[..., None], 0, spec.qmax)
    else:
        half = spec.default_zero_point - 1
        amax = torch.maximum(hi_src.amax(-1), -lo_src.amin(-1)) if valid is not None else blocks.abs().amax(-1)
        s = (amax / half).to(scale_dtype).to(torch.float32)
        safe = torch.where(s > 0, s, 1.0)
        z = torch.full_like(s, spec.default_zero_point)
        u = torch.clamp(torch.round(blocks / safe[..., None]), -half, half) + z[..., None]
    u = torch.where(s[..., None] > 0, u, z[..., None])
    if valid is not None:
        u = torch.where(valid, u, z[..., None])
    return u.to(torch.uint8), s.to(scale_dtype), z.to(torch.uint8)


def quantize(w: torch.Tensor, spec: QuantSpec, dtype: torch.dtype | None = None) -> Quantized:
    """Quantise ``w`` [..., N, K] per docs/ops.md §7; scales in ``dtype`` (default: ``w``'s dtype).

    The weight is first rounded to ``dtype`` (it is the export's weight in T), then processed in
    float32, :data:`ROWS_PER_CHUNK` rows at a time.
    """
    dtype = dtype or w.dtype
    lead, k = tuple(w.shape[:-1]), int(w.shape[-1])
    flat = w.reshape(-1, k)
    kb = math.ceil(k / spec.block_size)
    codes = torch.empty((flat.shape[0], kb, spec.block_size), dtype=torch.uint8)
    scales = torch.empty((flat.shape[0], kb), dtype=dtype)
    zeros = torch.empty((flat.shape[0], kb), dtype=torch.uint8)
    for r0 in range(0, flat.shape[0], ROWS_PER_CHUNK):
        part = flat[r0:r0 + ROWS_PER_CHUNK].to(dtype).to(torch.float32)
        codes[r0:r0 + len(part)], scales[r0:r0 + len(part)], zeros[r0:r0 + len(part)] = \
            _quantize_rows(part, spec, dtype)
    return Quantized(codes.reshape(*lead, kb, spec.block_size), scales.reshape(*lead, kb),
                     zeros.reshape(*lead, kb), k, spec)


def dequantize(q: Quantized, dtype: torch.dtype) -> torch.Tensor:
    """ŵ [..., N, K] in ``dtype``: float32(u - z) * float32(s), rounded to ``dtype``."""
    lead = tuple(q.codes.shape[:-2])
    w = (q.codes.to(torch.float32) - q.zero_points.to(torch.float32)[..., None]) * q.scales.to(torch.float32)[..., None]
    return w.reshape(*lead, -1)[..., :q.k].to(dtype).contiguous()


def fake_quantize(w: torch.Tensor, spec: QuantSpec, export_dtype: torch.dtype, dtype: torch.dtype | None = None
                  ) -> torch.Tensor:
    """The weight the quantised graph computes with: ``dequantize(quantize(w in export_dtype))`` in ``dtype``."""
    return dequantize(quantize(w, spec, export_dtype), dtype or w.dtype)


def reference_specs(quantization) -> dict[str, QuantSpec]:
    """Canonical tensor -> its block rule, for the fake-quant reference of a quantised export.

    ``quantization`` is the manifest's :class:`mtx.manifest.Quantization` (or None: no tensor)."""
    if quantization is None:
        return {}
    return {src: QuantSpec(t.bits, quantization.block_size, quantization.scheme)
            for t in quantization.tensors for src in t.sources}


# --------------------------------------------------------------------------------------------------
# Storage forms (docs/ops.md §7)


def _pack_nibbles(u: torch.Tensor) -> torch.Tensor:
    """[..., 2m] codes < 16 -> [..., m] bytes, element 2i in the low nibble."""
    return (u[..., 0::2] | (u[..., 1::2] << 4)).to(torch.uint8)


def matmul_nbits_weight(q: Quantized) -> torch.Tensor:
    """MatMulNBits ``B``: uint8 [N, kb, bs·bits/8] (QMoE: reshape to [E, N, kb·bs·bits/8])."""
    return q.codes.contiguous() if q.spec.bits == 8 else _pack_nibbles(q.codes).contiguous()


def matmul_nbits_zero_points(q: Quantized) -> torch.Tensor:
    """Packed zero points uint8 [..., N, ceil(kb·bits/8)] (an odd last nibble is 0)."""
    z = q.zero_points
    if q.spec.bits == 8:
        return z.contiguous()
    if z.shape[-1] % 2:
        z = torch.nn.functional.pad(z, (0, 1))
    return _pack_nibbles(z).contiguous()


def dq_codes(q: Quantized) -> np.ndarray:
    """DequantizeLinear input: codes [..., N, K] as uint8 or ml_dtypes.uint4 (4 bits)."""
    lead = tuple(q.codes.shape[:-2])
    u = q.codes.reshape(*lead, -1)[..., :q.k].contiguous().numpy()
    return _as_bits(u, q.spec.bits)


def dq_zero_points(q: Quantized) -> np.ndarray:
    """DequantizeLinear zero points [..., N, kb] as uint8 or ml_dtypes.uint4."""
    return _as_bits(q.zero_points.contiguous().numpy(), q.spec.bits)


def _as_bits(a: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return a
    import ml_dtypes

    return a.astype(ml_dtypes.uint4)
