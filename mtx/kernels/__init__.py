"""GPU kernels of the two mtx ops, written in Triton (docs/ops.md is the contract).

* :func:`swa_gqa` — ``mtx::SlidingWindowGQA`` over the rolling KV buffer, buffers updated in place
  (same contract as :func:`mtx.models.ops.swa_gqa_inplace`).
* :func:`moe` — ``mtx::MoE`` (same contract as :func:`mtx.models.ops.moe_reference`).
* :func:`enabled` — whether the eager model should use them for tensors on ``device``.

The kernels themselves live in :mod:`mtx.kernels.triton_swa_gqa` and :mod:`mtx.kernels.triton_moe`;
launch rules (tiles, splits, workspace) in :mod:`mtx.kernels.plan`. The same kernels are compiled
ahead of time into ``libmtx_kernels.so`` by ``plugins/`` (CMake).

On CPU tensors the kernels run in the Triton interpreter (``TRITON_INTERPRET=1`` before triton is
imported); that is for tests only — :func:`enabled` is false on CPU.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from mtx.kernels.plan import supports_head_dim

if TYPE_CHECKING:  # torch is imported lazily: the AOT compiler imports mtx.kernels.plan without it
    import torch


def enabled(device: torch.device | str) -> bool:
    """True if ``device`` is a CUDA device of compute capability >= 8.0, triton is importable and not
    in interpreter mode, and ``MTX_KERNELS`` is not ``0``. CPU devices: always false."""
    import torch

    device = torch.device(device)
    if device.type != "cuda" or os.environ.get("MTX_KERNELS", "1") == "0":
        return False
    if not torch.cuda.is_available():
        return False
    try:
        from mtx.kernels import launch
    except ImportError:  # no triton
        return False
    if launch.interpreting():
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def swa_gqa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
            start_pos: torch.Tensor, inv_freq: torch.Tensor, num_heads: int, num_kv_heads: int, window: int,
            scale: float, *, num_splits: int | None = None, block_m: int | None = None) -> torch.Tensor:
    """``mtx::SlidingWindowGQA``; updates k_buf/v_buf in place and returns the output [B, S, Hq*D].

    See :func:`mtx.kernels.launch.swa_gqa` for shapes and dtypes.
    """
    from mtx.kernels import launch
    return launch.swa_gqa(query, key, value, k_buf, v_buf, start_pos, inv_freq, num_heads, num_kv_heads,
                          window, scale, num_splits=num_splits, block_m=block_m)


def moe(x: torch.Tensor, router_weight: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
        top_k: int, *, tokens_per_pass: int | None = None) -> torch.Tensor:
    """``mtx::MoE``: x [..., H], router [E, H], w1/w3 [E, I, H], w2 [E, H, I]; output like x."""
    from mtx.kernels import launch
    return launch.moe(x, router_weight, w1, w3, w2, top_k, tokens_per_pass=tokens_per_pass)


__all__ = ["enabled", "supports_head_dim", "swa_gqa", "moe"]
