"""Triton kernels of ``mtx::MoE`` (docs/ops.md §3). Kernels only: no torch here.

One pass over a block of N tokens is five launches on one stream:

1. :func:`moe_router_kernel`   logits = x·router^T (fp32 accumulation, rounded to T), softmax in
                                fp32, top-k (ties -> lower expert index), renormalise in fp32, round
                                the weights to T. Writes ``topk_weight`` [N*k] (float32 holding
                                T-rounded values) and ``topk_ids`` [N*k] int32. Pair ``n*k + j`` is the
                                j-th expert of token n.
2. :func:`moe_align_kernel`    one program: groups the N*k pairs by expert (a stable counting sort:
                                within an expert, pairs keep their order) into ``sorted_pair``, and
                                cuts every expert's run of rows into tiles of ``tile_m`` rows:
                                ``tile_expert`` (-1 past the last tile), ``tile_start``, ``tile_end``.
                                Experts with no pair get no tile.
3. :func:`moe_gemm13_kernel`   grouped GEMM, one tile of one expert per program row: the same x tile
                                feeds both w1 and w3 products (fused), epilogue silu(w1 x)*(w3 x).
                                Writes ``act`` [N*k, I] in sorted-row order.
4. :func:`moe_gemm2_kernel`    grouped GEMM with w2, times the pair's routing weight; writes ``y``
                                [N*k, H] at the *pair* index, so no two programs touch one row.
5. :func:`moe_combine_kernel`  out[n] = sum_j y[n*k + j] in float32, rounded to T (deterministic,
                                no atomics); NaN for a token with no valid expert (NaN router row).

Rounding follows the PyTorch reference (``mtx.models.ops.moe_reference``): the expert products
w1 x, w3 x, silu(.), their product, the expert output and its product with the weight are each
rounded to T; accumulation is float32 throughout.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def moe_router_kernel(
    x_ptr,                       # [N, H] tokens, last dim contiguous
    router_ptr,                  # [E, H] contiguous
    topk_weight_ptr,             # out [N*k] float32 (values rounded to T)
    topk_ids_ptr,                # out [N*k] int32
    N, H, E, top_k,
    stride_xn,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grid (cdiv(N, BLOCK_T),). Needs E <= BLOCK_E and top_k <= BLOCK_K."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < N
    e = tl.arange(0, BLOCK_E)
    emask = e < E
    hh = tl.arange(0, BLOCK_H)
    acc = tl.zeros([BLOCK_T, BLOCK_E], tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hm = (h0 + hh) < H
        xa = tl.load(x_ptr + t[:, None].to(tl.int64) * stride_xn + (h0 + hh)[None, :],
                     mask=tmask[:, None] & hm[None, :], other=0.0)
        ra = tl.load(router_ptr + e[:, None] * H + (h0 + hh)[None, :], mask=emask[:, None] & hm[None, :], other=0.0)
        acc = tl.dot(xa, tl.trans(ra), acc, input_precision="ieee")
    # §3.1: logits accumulated in float32 and rounded to T; §3.2: softmax of float32(logits) in float32.
    logits = acc.to(x_ptr.dtype.element_ty).to(tl.float32)
    logits = tl.where(emask[None, :], logits, float("-inf"))
    ex = tl.exp(logits - tl.max(logits, 1)[:, None])
    ex = tl.where(emask[None, :], ex, 0.0)
    probs = ex / tl.sum(ex, 1)[:, None]
    # §3.3: top_k largest, ties to the lower expert index (smallest index among the maxima).
    kk = tl.arange(0, BLOCK_K)
    cand = tl.where(emask[None, :], probs, -1.0)
    sel_w = tl.zeros([BLOCK_T, BLOCK_K], tl.float32)
    sel_i = tl.zeros([BLOCK_T, BLOCK_K], tl.int32)
    for j in range(0, top_k):
        best = tl.max(cand, 1)
        idx = tl.min(tl.where(cand == best[:, None], e[None, :], BLOCK_E), 1)
        sel_w = tl.where(kk[None, :] == j, best[:, None], sel_w)
        sel_i = tl.where(kk[None, :] == j, idx[:, None], sel_i)
        cand = tl.where(e[None, :] == idx[:, None], -2.0, cand)
    # §3.4: renormalise in float32 over the selected experts, then round to T.
    w = sel_w / tl.sum(sel_w, 1)[:, None]
    w = w.to(x_ptr.dtype.element_ty).to(tl.float32)
    dst = t[:, None] * top_k + kk[None, :]
    m = tmask[:, None] & (kk[None, :] < top_k)
    tl.store(topk_weight_ptr + dst, w, mask=m)
    tl.store(topk_ids_ptr + dst, sel_i, mask=m)


@triton.jit
def moe_align_kernel(
    topk_ids_ptr,                # [P] int32, P = N*k pairs
    sorted_pair_ptr,             # out [P] int32: pair ids grouped by expert, stable
    tile_expert_ptr,             # out [max_tiles] int32: expert of each tile, -1 for unused tiles
    tile_start_ptr, tile_end_ptr,  # out [max_tiles] int32: row range of the tile in sorted order
    num_pairs, E, max_tiles, tile_m,
    BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """grid (1,): a deterministic counting sort of the pairs by expert (E <= BLOCK_E).

    A pair whose expert id is not in [0, E) (the router's pick for a NaN row) is left out: it gets no
    sorted row and no tile, so it cannot overwrite another pair's slot.
    """
    e = tl.arange(0, BLOCK_E)
    emask = e < E
    pp = tl.arange(0, BLOCK_P)
    counts = tl.zeros([BLOCK_E], tl.int32)
    for p0 in range(0, num_pairs, BLOCK_P):
        ids = tl.load(topk_ids_ptr + p0 + pp, mask=(p0 + pp) < num_pairs, other=-1)
        counts += tl.sum(((ids[:, None] == e[None, :]) & emask[None, :]).to(tl.int32), 0)
    offsets = tl.cumsum(counts, 0) - counts          # first sorted row of each expert
    seen = tl.zeros([BLOCK_E], tl.int32)             # pairs of each expert placed so far
    for p0 in range(0, num_pairs, BLOCK_P):
        p = p0 + pp
        pm = p < num_pairs
        ids = tl.load(topk_ids_ptr + p, mask=pm, other=-1)
        valid = pm & (ids >= 0) & (ids < E)
        onehot = ((ids[:, None] == e[None, :]) & valid[:, None]).to(tl.int32)
        rank = tl.cumsum(onehot, 0) - onehot         # earlier pairs of the same expert in this block
        dest = tl.sum(onehot * (offsets + seen)[None, :] + onehot * rank, 1)
        tl.store(sorted_pair_ptr + dest, p, mask=valid)
        seen += tl.sum(onehot, 0)
    # Tiles: expert e owns tiles [tile_begin[e], tile_stop[e]) covering its rows tile_m at a time.
    tiles = tl.where(emask, (counts + tile_m - 1) // tile_m, 0)
    tile_stop = tl.cumsum(tiles, 0)
    tile_begin = tile_stop - tiles
    for t0 in range(0, max_tiles, BLOCK_P):
        t = t0 + pp
        # expert of tile t = number of experts whose tiles all end at or before t (E if none left)
        te = tl.sum(((tile_stop[None, :] <= t[:, None]) & emask[None, :]).to(tl.int32), 1)
        onehot = (e[None, :] == te[:, None]).to(tl.int32)
        start = tl.sum(onehot * (offsets[None, :] + (t[:, None] - tile_begin[None, :]) * tile_m), 1)
        stop = tl.sum(onehot * (offsets + counts)[None, :], 1)
        valid = te < E
        tm = t < max_tiles
        tl.store(tile_expert_ptr + t, tl.where(valid, te, -1), mask=tm)
        tl.store(tile_start_ptr + t, tl.where(valid, start, 0), mask=tm)
        tl.store(tile_end_ptr + t, tl.where(valid, tl.minimum(start + tile_m, stop), 0), mask=tm)


@triton.jit
def _tile_rows(tile_start_ptr, tile_end_ptr, tile, BLOCK_M: tl.constexpr):
    """Sorted-order rows [start, end) of one expert tile, as BLOCK_M row ids and their mask (end - start <= BLOCK_M)."""
    r0 = tl.load(tile_start_ptr + tile)
    r1 = tl.load(tile_end_ptr + tile)
    rows = r0 + tl.arange(0, BLOCK_M)
    return rows, rows < r1


@triton.jit
def moe_gemm13_kernel(
    x_ptr,                       # [N, H] tokens, last dim contiguous
    w1_ptr, w3_ptr,              # [E, I, H] contiguous
    act_ptr,                     # out [P, I] contiguous, dtype T, rows in sorted order
    sorted_pair_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
    H, I, top_k,
    stride_xn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grid (max_tiles, cdiv(I, BLOCK_N)); BLOCK_M must equal the tile_m given to moe_align_kernel."""
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile)
    if expert < 0:
        return
    rows, rmask = _tile_rows(tile_start_ptr, tile_end_ptr, tile, BLOCK_M)
    tok = tl.load(sorted_pair_ptr + rows, mask=rmask, other=0) // top_k
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < I
    kk = tl.arange(0, BLOCK_K)
    w_base = expert.to(tl.int64) * I * H
    x_rows = x_ptr + tok[:, None].to(tl.int64) * stride_xn
    acc1 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc3 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, H, BLOCK_K):
        km = (k0 + kk) < H
        xa = tl.load(x_rows + (k0 + kk)[None, :], mask=rmask[:, None] & km[None, :], other=0.0)
        woff = w_base + cols[:, None] * H + (k0 + kk)[None, :]
        wm = cmask[:, None] & km[None, :]
        w1t = tl.load(w1_ptr + woff, mask=wm, other=0.0)
        w3t = tl.load(w3_ptr + woff, mask=wm, other=0.0)
        acc1 = tl.dot(xa, tl.trans(w1t), acc1, input_precision="ieee")
        acc3 = tl.dot(xa, tl.trans(w3t), acc3, input_precision="ieee")
    T = act_ptr.dtype.element_ty
    a = acc1.to(T).to(tl.float32)
    u = acc3.to(T).to(tl.float32)
    g = (a * tl.sigmoid(a)).to(T).to(tl.float32)   # silu, rounded to T
    dst = act_ptr + rows[:, None].to(tl.int64) * I + cols[None, :]
    tl.store(dst, (g * u).to(T), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def moe_gemm2_kernel(
    act_ptr,                     # [P, I] contiguous, rows in sorted order
    w2_ptr,                      # [E, H, I] contiguous
    y_ptr,                       # out [P, H] contiguous, dtype T, row = pair id
    sorted_pair_ptr, topk_weight_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
    H, I,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grid (max_tiles, cdiv(H, BLOCK_N)): y[pair] = round_T(round_T(w2_e · act) * w_pair)."""
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile)
    if expert < 0:
        return
    rows, rmask = _tile_rows(tile_start_ptr, tile_end_ptr, tile, BLOCK_M)
    pair = tl.load(sorted_pair_ptr + rows, mask=rmask, other=0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < H
    kk = tl.arange(0, BLOCK_K)
    w_base = expert.to(tl.int64) * H * I
    a_rows = act_ptr + rows[:, None].to(tl.int64) * I
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, I, BLOCK_K):
        km = (k0 + kk) < I
        at = tl.load(a_rows + (k0 + kk)[None, :], mask=rmask[:, None] & km[None, :], other=0.0)
        wt = tl.load(w2_ptr + w_base + cols[:, None] * I + (k0 + kk)[None, :],
                     mask=cmask[:, None] & km[None, :], other=0.0)
        acc = tl.dot(at, tl.trans(wt), acc, input_precision="ieee")
    T = y_ptr.dtype.element_ty
    y = acc.to(T).to(tl.float32)                     # §3.5 expert output, rounded to T
    w = tl.load(topk_weight_ptr + pair, mask=rmask, other=0.0)
    dst = y_ptr + pair[:, None].to(tl.int64) * H + cols[None, :]
    tl.store(dst, (y * w[:, None]).to(T), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def moe_combine_kernel(
    y_ptr,                       # [P, H] contiguous, row n*k + j = weighted output of token n's j-th expert
    topk_ids_ptr,                # [P] int32: the pairs' experts (not in [0, E): the pair was left out)
    out_ptr,                     # [N, H], last dim contiguous
    N, H, E, top_k,
    stride_on,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """grid (cdiv(N, BLOCK_T), cdiv(H, BLOCK_H)): §3.6 output = sum_j w_j y_j, summed in float32, rounded to T.

    A token with a pair the grouping left out (no valid expert: a NaN router row) gets NaN, as the
    reference's NaN weights give; its y rows were never written and are not read.
    """
    n = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    nm = n < N
    m = nm[:, None] & (cols < H)[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_H], tl.float32)
    for j in range(0, top_k):
        pair = n * top_k + j
        ids = tl.load(topk_ids_ptr + pair, mask=nm, other=0)
        valid = (ids >= 0) & (ids < E)
        rows = pair.to(tl.int64) * H
        y = tl.load(y_ptr + rows[:, None] + cols[None, :], mask=m & valid[:, None], other=0.0).to(tl.float32)
        acc += tl.where(valid[:, None], y, float("nan"))
    tl.store(out_ptr + n[:, None].to(tl.int64) * stride_on + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=m)
