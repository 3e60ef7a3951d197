"""Torch launchers of the Triton kernels: argument checks, workspace tensors, grids (see plan.py).

CUDA tensors run the compiled kernels; CPU tensors run them in the Triton interpreter, which must be
switched on (``TRITON_INTERPRET=1``) before triton is first imported — that is how the tests check
the kernels on machines without a GPU.
"""

from __future__ import annotations

import torch

from mtx import rolling_kv
from mtx.kernels import plan as P
from mtx.kernels import triton_moe as KM
from mtx.kernels import triton_swa_gqa as KA

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOG2E = 1.4426950408889634


def interpreting() -> bool:
    """True when the kernels were defined in Triton's CPU interpreter (TRITON_INTERPRET=1 when triton
    was imported): they are then InterpretedFunction objects, not compiled JIT functions."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(KA.swa_gqa_attn_kernel, InterpretedFunction)


def _check_device(*tensors: torch.Tensor) -> None:
    dev = tensors[0].device
    for t in tensors:
        if t.device != dev:
            raise ValueError(f"all tensors must be on one device, got {t.device} and {dev}")
    if dev.type == "cpu":
        if not interpreting():
            raise RuntimeError("mtx.kernels on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
                               "before triton is imported")
        from mtx.kernels import _interpreter
        _interpreter.patch()
    elif dev.type != "cuda":
        raise ValueError(f"mtx.kernels runs on CUDA tensors (or CPU under TRITON_INTERPRET=1), got {dev}")


def _last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.stride(-1) != 1:
        raise ValueError(f"{name}: the last dimension must be contiguous (stride 1), got strides {t.stride()}")


def swa_gqa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
            start_pos: torch.Tensor, inv_freq: torch.Tensor, num_heads: int, num_kv_heads: int, window: int,
            scale: float, *, num_splits: int | None = None, block_m: int | None = None) -> torch.Tensor:
    """``mtx::SlidingWindowGQA`` with the buffers updated in place; returns output [B, S, Hq*D].

    Same contract as :func:`mtx.models.ops.swa_gqa_inplace`: query [B, S, Hq*D], key/value
    [B, S, Hkv*D] (pre-RoPE), k_buf/v_buf [B, Hkv, C, D] of post-RoPE keys (views with any batch,
    head and slot strides, last dim contiguous), start_pos [B] int64, inv_freq [D/2] float32;
    ``window`` is the op attribute (0 = full attention). ``num_splits`` / ``block_m`` override the
    variant plan.swa_gqa_plan picks (tests use them to run both kernels on small shapes).
    """
    _check_device(query, key, value, k_buf, v_buf, start_pos, inv_freq)
    b, s, qw = query.shape
    if k_buf.dim() != 4 or v_buf.shape != k_buf.shape:
        raise ValueError(f"k_buf/v_buf must both be [B, Hkv, C, D], got {tuple(k_buf.shape)} and {tuple(v_buf.shape)}")
    _, hkv, cap, d = k_buf.shape
    dtype = query.dtype
    if dtype not in DTYPES or any(t.dtype != dtype for t in (key, value, k_buf, v_buf)):
        raise ValueError("query, key, value and the buffers must share one dtype of float32/float16/bfloat16")
    if hkv != num_kv_heads or num_heads % num_kv_heads or qw != num_heads * d:
        raise ValueError(f"inconsistent heads: query width {qw}, num_heads {num_heads}, num_kv_heads {num_kv_heads}, "
                         f"buffers {tuple(k_buf.shape)}")
    if key.shape != (b, s, hkv * d) or value.shape != (b, s, hkv * d) or k_buf.shape[0] != b:
        raise ValueError(f"key/value must be [B, S, Hkv*D] = {(b, s, hkv * d)}, buffers [B, ...]")
    if not P.supports_head_dim(d):
        raise ValueError(f"head size {d} is not supported by the Triton kernels (a power of two >= 16)")
    if start_pos.dtype != torch.int64 or start_pos.shape != (b,):
        raise ValueError(f"start_pos must be int64 [B], got {start_pos.dtype} {tuple(start_pos.shape)}")
    if inv_freq.dtype != torch.float32 or inv_freq.shape != (d // 2,):
        raise ValueError(f"inv_freq must be float32 [D/2], got {inv_freq.dtype} {tuple(inv_freq.shape)}")
    for name, t in (("query", query), ("key", key), ("value", value), ("k_buf", k_buf), ("v_buf", v_buf)):
        _last_dim_contiguous(name, t)
    if k_buf.stride() != v_buf.stride():
        raise ValueError("k_buf and v_buf must have the same strides")
    w = rolling_kv.effective_window(window, cap)
    out = torch.empty_like(query)
    if b == 0 or s == 0:
        return out
    start_pos = start_pos.contiguous()
    inv_freq = inv_freq.contiguous()
    arch = 90
    if query.is_cuda:
        major, minor = torch.cuda.get_device_capability(query.device)
        arch = major * 10 + minor
    pl = P.swa_gqa_plan(b, s, num_heads, hkv, d, w, query.element_size(), num_splits, block_m, arch=arch)
    dev = query.device
    q_rot = torch.empty((b, s, num_heads, d), dtype=dtype, device=dev)
    k_rot = torch.empty((b, s, hkv, d), dtype=dtype, device=dev)
    opts = dict(num_warps=pl.num_warps)

    KA.swa_gqa_rope_kernel[(P.cdiv(s, P.ATTN_BLOCK_T), b)](
        query, key, q_rot, k_rot, start_pos, inv_freq, s, num_heads, hkv,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1),
        HEAD_DIM=d, BLOCK_T=P.ATTN_BLOCK_T, num_warps=P.ATTN_ROPE_NUM_WARPS)
    if pl.split:
        part_acc = torch.empty((b * hkv, pl.num_splits, pl.rows, d), dtype=torch.float32, device=dev)
        part_ml = torch.empty((b * hkv, pl.num_splits, pl.rows, 2), dtype=torch.float32, device=dev)
    else:
        part_acc = part_ml = q_rot  # unused (SPLIT=False); any pointer of the right kind
    KA.swa_gqa_attn_kernel[(pl.m_blocks, b * hkv, pl.num_splits)](
        q_rot, k_rot, value, k_buf, v_buf, start_pos, out, part_acc, part_ml,
        s, cap, w, hkv, pl.group, pl.num_splits, float(scale) * LOG2E,
        value.stride(0), value.stride(1),
        k_buf.stride(0), k_buf.stride(1), k_buf.stride(2),
        out.stride(0), out.stride(1),
        HEAD_DIM=d, BLOCK_M=pl.block_m, BLOCK_N=pl.block_n, SPLIT=pl.split,
        num_stages=pl.num_stages, **opts)
    if pl.split:
        KA.swa_gqa_combine_kernel[(P.cdiv(pl.rows, P.ATTN_COMBINE_BLOCK_R), b * hkv)](
            part_acc, part_ml, out, s, hkv, pl.group, pl.num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=d, BLOCK_R=P.ATTN_COMBINE_BLOCK_R, num_warps=P.ATTN_COMBINE_NUM_WARPS)
    # docs/ops.md §1 rule 5: the write is a separate launch after attention on the same stream;
    # rule 6: it writes the last min(S, C) tokens.
    written = rolling_kv.written_tokens(s, cap)
    n_write = written.stop - written.start
    KA.swa_gqa_write_kernel[(P.cdiv(n_write, P.ATTN_BLOCK_T), b)](
        k_rot, value, k_buf, v_buf, start_pos, s, cap, hkv, n_write,
        value.stride(0), value.stride(1), k_buf.stride(0), k_buf.stride(1), k_buf.stride(2),
        HEAD_DIM=d, BLOCK_T=P.ATTN_BLOCK_T, num_warps=P.ATTN_WRITE_NUM_WARPS)
    return out


def moe(x: torch.Tensor, router_weight: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
        top_k: int, *, tokens_per_pass: int | None = None) -> torch.Tensor:
    """``mtx::MoE``: x [..., H]; router_weight [E, H]; w1, w3 [E, I, H]; w2 [E, H, I]. Output like x.

    Tokens run in passes of at most ``tokens_per_pass`` (default plan.MOE_TOKENS_PER_PASS).
    """
    _check_device(x, router_weight, w1, w3, w2)
    dtype = x.dtype
    if dtype not in DTYPES or any(t.dtype != dtype for t in (router_weight, w1, w3, w2)):
        raise ValueError("x, router_weight, w1, w3 and w2 must share one dtype of float32/float16/bfloat16")
    h = x.shape[-1]
    e = router_weight.shape[0]
    if router_weight.shape != (e, h) or w1.dim() != 3 or w1.shape[0] != e or w1.shape[2] != h:
        raise ValueError(f"router_weight must be [E, H] and w1 [E, I, H]; got {tuple(router_weight.shape)}, "
                         f"{tuple(w1.shape)} for H={h}")
    inter = w1.shape[1]
    if w3.shape != w1.shape or w2.shape != (e, h, inter):
        raise ValueError(f"w3 must be [E, I, H] = {tuple(w1.shape)} and w2 [E, H, I] = {(e, h, inter)}")
    if not 1 <= top_k <= e:
        raise ValueError(f"top_k must be in 1..{e}, got {top_k}")
    shape = x.shape
    flat = x.reshape(-1, h)
    _last_dim_contiguous("x", flat)
    router_weight, w1, w3, w2 = (t.contiguous() for t in (router_weight, w1, w3, w2))
    out = torch.empty_like(flat)
    n_all = flat.shape[0]
    chunk = tokens_per_pass or P.MOE_TOKENS_PER_PASS
    for n0 in range(0, n_all, chunk):
        xs, os_ = flat[n0:n0 + chunk], out[n0:n0 + chunk]
        _moe_pass(xs, router_weight, w1, w3, w2, top_k, os_)
    return out.reshape(shape)


def _moe_pass(x: torch.Tensor, router_weight: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
              top_k: int, out: torch.Tensor) -> None:
    n, h = x.shape
    e, inter, _ = w1.shape
    pl = P.moe_plan(n, h, inter, e, top_k, x.element_size())
    dev = x.device
    i32 = dict(dtype=torch.int32, device=dev)
    topk_weight = torch.empty(pl.pairs, dtype=torch.float32, device=dev)
    topk_ids = torch.empty(pl.pairs, **i32)
    sorted_pair = torch.empty(pl.pairs, **i32)
    tile_expert = torch.empty(pl.max_tiles, **i32)
    tile_start = torch.empty(pl.max_tiles, **i32)
    tile_end = torch.empty(pl.max_tiles, **i32)
    act = torch.empty((pl.pairs, inter), dtype=x.dtype, device=dev)
    y = torch.empty((pl.pairs, h), dtype=x.dtype, device=dev)

    KM.moe_router_kernel[(P.cdiv(n, P.MOE_ROUTER_BLOCK_T),)](
        x, router_weight, topk_weight, topk_ids, n, h, e, top_k, x.stride(0),
        BLOCK_T=P.MOE_ROUTER_BLOCK_T, BLOCK_E=pl.router_block_e, BLOCK_H=pl.router_block_h,
        BLOCK_K=pl.router_block_k, num_warps=pl.router_num_warps)
    KM.moe_align_kernel[(1,)](
        topk_ids, sorted_pair, tile_expert, tile_start, tile_end, pl.pairs, e, pl.max_tiles, pl.tile_m,
        BLOCK_P=pl.align_block_p, BLOCK_E=pl.router_block_e, num_warps=P.MOE_ALIGN_NUM_WARPS)
    KM.moe_gemm13_kernel[(pl.max_tiles, P.cdiv(inter, pl.block_n))](
        x, w1, w3, act, sorted_pair, tile_expert, tile_start, tile_end, h, inter, top_k, x.stride(0),
        BLOCK_M=pl.tile_m, BLOCK_N=pl.block_n, BLOCK_K=pl.block_k, num_warps=pl.num_warps,
        num_stages=pl.num_stages)
    KM.moe_gemm2_kernel[(pl.max_tiles, P.cdiv(h, pl.block_n))](
        act, w2, y, sorted_pair, topk_weight, tile_expert, tile_start, tile_end, h, inter,
        BLOCK_M=pl.tile_m, BLOCK_N=pl.block_n, BLOCK_K=pl.block_k, num_warps=pl.num_warps,
        num_stages=pl.num_stages)
    KM.moe_combine_kernel[(P.cdiv(n, P.MOE_COMBINE_BLOCK_T), P.cdiv(h, P.MOE_COMBINE_BLOCK_H))](
        y, topk_ids, out, n, h, e, top_k, out.stride(0), BLOCK_T=P.MOE_COMBINE_BLOCK_T, BLOCK_H=P.MOE_COMBINE_BLOCK_H, num_warps=P.MOE_COMBINE_NUM_WARPS)


def moe_route_and_group(x: torch.Tensor, router_weight: torch.Tensor, top_k: int, tile_m: int
                        ) -> dict[str, torch.Tensor]:
    """Only the router and grouping launches (1–2) of one pass, for tests of the bookkeeping.

    Returns topk_weight [N*k] float32, topk_ids [N*k] int32, sorted_pair [N*k], tile_expert,
    tile_start, tile_end [max_tiles] (int32).
    """
    _check_device(x, router_weight)
    n, h = x.shape
    e = router_weight.shape[0]
    pl = P.moe_plan(n, h, 16, e, top_k, x.element_size(), tile_m=tile_m)
    max_tiles = pl.max_tiles
    dev = x.device
    r = {name: torch.empty(pl.pairs, dtype=torch.int32, device=dev) for name in ("topk_ids", "sorted_pair")}
    r["topk_weight"] = torch.empty(pl.pairs, dtype=torch.float32, device=dev)
    for name in ("tile_expert", "tile_start", "tile_end"):
        r[name] = torch.empty(max_tiles, dtype=torch.int32, device=dev)
    KM.moe_router_kernel[(P.cdiv(n, P.MOE_ROUTER_BLOCK_T),)](
        x, router_weight.contiguous(), r["topk_weight"], r["topk_ids"], n, h, e, top_k, x.stride(0),
        BLOCK_T=P.MOE_ROUTER_BLOCK_T, BLOCK_E=pl.router_block_e, BLOCK_H=pl.router_block_h,
        BLOCK_K=pl.router_block_k, num_warps=pl.router_num_warps)
    KM.moe_align_kernel[(1,)](
        r["topk_ids"], r["sorted_pair"], r["tile_expert"], r["tile_start"], r["tile_end"], pl.pairs, e,
        max_tiles, tile_m, BLOCK_P=pl.align_block_p, BLOCK_E=pl.router_block_e, num_warps=P.MOE_ALIGN_NUM_WARPS)
    return r


__all__ = ["swa_gqa", "moe", "moe_route_and_group", "interpreting"]
