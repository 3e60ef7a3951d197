"""Triton kernels of ``mtx::SlidingWindowGQA`` (docs/ops.md §1–2). Kernels only: no torch here.

One call is four launches on one stream, which is what makes it read-before-write (§1 rule 5):

1. :func:`swa_gqa_rope_kernel`    RoPE on the chunk's queries and keys, into workspace tensors
                                   ``q_rot`` [B, S, Hq, D] and ``k_rot`` [B, S, Hkv, D] (dtype T).
2. :func:`swa_gqa_attn_kernel`    attention of every query over the resident buffer keys (read only)
                                   and the chunk's own rotated keys. Optionally split over the key
                                   range (flash-decoding): each split writes fp32 partials (m, l, acc).
3. :func:`swa_gqa_combine_kernel` (split runs only) merges the partials into the output.
4. :func:`swa_gqa_write_kernel`   writes the last min(S, C) rotated keys and values into their slots.

Launch 4 starts after launches 2–3 finish (stream order), so no query observes a slot overwritten by
the same call, also with C = W and S >= 2, and with the outputs aliased to the buffers (in place).

Grouped-query attention without repeated KV heads: one program of launch 2 owns one KV head and a
block of BLOCK_M *rows*, row r = (chunk token r // G, query head hk*G + r % G). Each K/V tile it loads
serves all G query heads of that KV head.

Positions are int32 inside the kernels (start_pos is loaded as int64 and narrowed): contexts must stay
below 2**31 tokens. ``HEAD_DIM`` is a power of two.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def swa_gqa_rope_kernel(
    q_ptr, k_ptr,                # query [B, S, Hq*D], key [B, S, Hkv*D] (pre-RoPE), last dim contiguous
    q_rot_ptr, k_rot_ptr,        # out: [B, S, Hq, D], [B, S, Hkv, D] contiguous, dtype T
    start_pos_ptr,               # [B] int64
    inv_freq_ptr,                # [D/2] float32
    S, num_heads, num_kv_heads,
    stride_qb, stride_qs, stride_kb, stride_ks,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """grid (cdiv(S, BLOCK_T), B): BLOCK_T chunk tokens of one row per program, head by head."""
    b = tl.program_id(1)
    HALF: tl.constexpr = HEAD_DIM // 2
    i = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    m = (i < S)[:, None]
    # §1 rule 2: chunk token i of row b is at position start_pos[b] + i.
    pos = tl.load(start_pos_ptr + b).to(tl.int32) + i
    j = tl.arange(0, HALF)
    # §2 RoPE: theta_j = float32(p) * inv_freq[j], in float32.
    theta = pos.to(tl.float32)[:, None] * tl.load(inv_freq_ptr + j)[None, :]
    cos = tl.cos(theta)
    sin = tl.sin(theta)
    b64 = b.to(tl.int64)  # batch offsets in int64, offsets inside one batch row in int32
    q_src = q_ptr + b64 * stride_qb + i[:, None] * stride_qs + j[None, :]
    k_src = k_ptr + b64 * stride_kb + i[:, None] * stride_ks + j[None, :]
    q_dst = q_rot_ptr + b64 * S * num_heads * HEAD_DIM + (i * num_heads)[:, None] * HEAD_DIM + j[None, :]
    k_dst = k_rot_ptr + b64 * S * num_kv_heads * HEAD_DIM + (i * num_kv_heads)[:, None] * HEAD_DIM + j[None, :]
    # Half-split rotation in float32, rounded to T:
    # x'[j] = x[j] cos - x[j+D/2] sin, x'[j+D/2] = x[j+D/2] cos + x[j] sin.
    for h in range(0, num_heads):
        lo = tl.load(q_src + h * HEAD_DIM, mask=m, other=0.0).to(tl.float32)
        hi = tl.load(q_src + h * HEAD_DIM + HALF, mask=m, other=0.0).to(tl.float32)
        tl.store(q_dst + h * HEAD_DIM, (lo * cos - hi * sin).to(q_rot_ptr.dtype.element_ty), mask=m)
        tl.store(q_dst + h * HEAD_DIM + HALF, (hi * cos + lo * sin).to(q_rot_ptr.dtype.element_ty), mask=m)
    for h in range(0, num_kv_heads):
        lo = tl.load(k_src + h * HEAD_DIM, mask=m, other=0.0).to(tl.float32)
        hi = tl.load(k_src + h * HEAD_DIM + HALF, mask=m, other=0.0).to(tl.float32)
        tl.store(k_dst + h * HEAD_DIM, (lo * cos - hi * sin).to(k_rot_ptr.dtype.element_ty), mask=m)
        tl.store(k_dst + h * HEAD_DIM + HALF, (hi * cos + lo * sin).to(k_rot_ptr.dtype.element_ty), mask=m)


@triton.jit
def _attend_tile(q, kt, vt, vis, qk_scale, m_i, l_i, acc):
    """One online-softmax step over a key tile (scores in log2 units); a row with no visible key is left as it was."""
    s = tl.where(vis, tl.dot(q, tl.trans(kt), input_precision="ieee") * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision="ieee")
    return m_new, l_i, acc


@triton.jit
def swa_gqa_attn_kernel(
    q_rot_ptr,                   # [B, S, Hq, D] rotated queries (contiguous)
    k_rot_ptr,                   # [B, S, Hkv, D] rotated chunk keys (contiguous)
    v_ptr,                       # value [B, S, Hkv*D], last dim contiguous
    k_buf_ptr, v_buf_ptr,        # [B, Hkv, C, D] buffers as held before the call (read only here)
    start_pos_ptr,               # [B] int64
    out_ptr,                     # output [B, S, Hq*D], last dim contiguous (written unless SPLIT)
    part_acc_ptr,                # [B*Hkv, num_splits, S*G, D] float32 (SPLIT only)
    part_ml_ptr,                 # [B*Hkv, num_splits, S*G, 2] float32: running max (log2 units), sum
    S, capacity, window, num_kv_heads, group, num_splits,
    qk_scale,                    # scale * log2(e): scores are kept in log2 units for exp2
    stride_vb, stride_vs,
    stride_cb, stride_ch, stride_cs,
    stride_ob, stride_os,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
):
    """grid (cdiv(S*G, BLOCK_M), B*Hkv, num_splits). ``window`` is the effective W (§1 rule 4)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    b = pid_bh // num_kv_heads
    hk = pid_bh % num_kv_heads
    num_heads = num_kv_heads * group
    n_rows = S * group
    start = tl.load(start_pos_ptr + b).to(tl.int32)

    d = tl.arange(0, HEAD_DIM)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    tok = rows // group                       # chunk token of the row
    head = hk * group + rows % group          # §2: query head h uses KV head h div G
    qpos = start + tok                        # §1 rule 2: absolute position of the query
    # Per-row base pointers; the batch offset is int64, offsets inside one batch row are int32.
    b64 = b.to(tl.int64)
    q_row = q_rot_ptr + b64 * S * num_heads * HEAD_DIM
    k_row = k_rot_ptr + b64 * S * num_kv_heads * HEAD_DIM
    v_row = v_ptr + b64 * stride_vb
    q = tl.load(q_row + (tok * num_heads + head)[:, None] * HEAD_DIM + d[None, :], mask=row_ok[:, None], other=0.0)

    # Key positions any row of this block may see (§1 rule 4: p - W < k <= p, k >= 0):
    # [max(0, start + tok_lo - W + 1), start + tok_hi]. Positions < start are resident buffer keys
    # (§1 rule 3; W <= C guarantees they are still held), positions >= start are chunk tokens.
    tok_lo = (pid_m * BLOCK_M) // group
    tok_hi = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // group, S - 1)
    kv_lo = tl.maximum(start + tok_lo - window + 1, 0)
    kv_end = start + tok_hi + 1
    # This split's share of that range, in whole BLOCK_N tiles (flash-decoding).
    per_split = ((kv_end - kv_lo + num_splits - 1) // num_splits + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    k_begin = kv_lo + split * per_split
    k_end = tl.minimum(k_begin + per_split, kv_end)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    nn = tl.arange(0, BLOCK_N)
    kb_row = k_buf_ptr + b64 * stride_cb + hk * stride_ch
    vb_row = v_buf_ptr + b64 * stride_cb + hk * stride_ch

    # Resident keys: position k lives in slot k mod C (§1 rule 1); the buffer is only read here.
    res_end = tl.minimum(k_end, start)
    for k0 in range(k_begin, res_end, BLOCK_N):
        kpos = k0 + nn
        kmask = kpos < res_end
        slot = kpos % capacity
        offs = slot[:, None] * stride_cs + d[None, :]
        kt = tl.load(kb_row + offs, mask=kmask[:, None], other=0.0)
        vt = tl.load(vb_row + offs, mask=kmask[:, None], other=0.0)
        # resident k < start <= p, so only the window's lower edge p - W < k matters
        vis = kmask[None, :] & (kpos[None, :] > qpos[:, None] - window)
        m_i, l_i, acc = _attend_tile(q, kt, vt, vis, qk_scale, m_i, l_i, acc)

    # Chunk keys: position k is chunk token k - start; causal (k <= p) and window (p - W < k).
    for k0 in range(tl.maximum(k_begin, start), k_end, BLOCK_N):
        kpos = k0 + nn
        kmask = kpos < k_end
        j = kpos - start
        kt = tl.load(k_row + (j * num_kv_heads + hk)[:, None] * HEAD_DIM + d[None, :], mask=kmask[:, None], other=0.0)
        vt = tl.load(v_row + j[:, None] * stride_vs + hk * HEAD_DIM + d[None, :], mask=kmask[:, None], other=0.0)
        vis = kmask[None, :] & (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] > qpos[:, None] - window)
        m_i, l_i, acc = _attend_tile(q, kt, vt, vis, qk_scale, m_i, l_i, acc)

    if SPLIT:
        prow = (pid_bh * num_splits + split) * n_rows + rows
        tl.store(part_acc_ptr + prow[:, None] * HEAD_DIM + d[None, :], acc, mask=row_ok[:, None])
        tl.store(part_ml_ptr + prow * 2, m_i, mask=row_ok)
        tl.store(part_ml_ptr + prow * 2 + 1, l_i, mask=row_ok)
    else:
        # Every row's key set holds its own position (§2), so l_i > 0 on real rows (padding rows: 1).
        o = acc / tl.where(row_ok, l_i, 1.0)[:, None]
        dst = out_ptr + b64 * stride_ob + tok[:, None] * stride_os + head[:, None] * HEAD_DIM + d[None, :]
        tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def swa_gqa_combine_kernel(
    part_acc_ptr, part_ml_ptr,   # partials of swa_gqa_attn_kernel (SPLIT)
    out_ptr,                     # output [B, S, Hq*D], last dim contiguous
    S, num_kv_heads, group, num_splits,
    stride_ob, stride_os,
    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """grid (cdiv(S*G, BLOCK_R), B*Hkv): out = sum_s 2^(m_s-M) acc_s / sum_s 2^(m_s-M) l_s (float32).

    A split with no visible key for a row has m = -inf, l = 0 and contributes nothing; at least one
    split holds the query's own position.
    """
    pid_bh = tl.program_id(1)
    n_rows = S * group
    b = pid_bh // num_kv_heads
    hk = pid_bh % num_kv_heads
    d = tl.arange(0, HEAD_DIM)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < n_rows
    base = pid_bh.to(tl.int64) * num_splits * n_rows + r
    m_max = tl.load(part_ml_ptr + base * 2, mask=rm, other=0.0)
    for s in range(1, num_splits):
        m_max = tl.maximum(m_max, tl.load(part_ml_ptr + (base + s * n_rows) * 2, mask=rm, other=0.0))
    m_max = tl.where(rm, m_max, 0.0)
    l_sum = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, HEAD_DIM], tl.float32)
    for s in range(0, num_splits):
        prow = base + s * n_rows
        w = tl.exp2(tl.load(part_ml_ptr + prow * 2, mask=rm, other=0.0) - m_max)
        l_sum += w * tl.load(part_ml_ptr + prow * 2 + 1, mask=rm, other=1.0)
        acc += w[:, None] * tl.load(part_acc_ptr + prow[:, None] * HEAD_DIM + d[None, :], mask=rm[:, None], other=0.0)
    tok = r // group
    head = hk * group + r % group
    dst = out_ptr + b.to(tl.int64) * stride_ob + tok[:, None] * stride_os + head[:, None] * HEAD_DIM + d[None, :]
    tl.store(dst, (acc / l_sum[:, None]).to(out_ptr.dtype.element_ty), mask=rm[:, None])


@triton.jit
def swa_gqa_write_kernel(
    k_rot_ptr,                   # [B, S, Hkv, D] rotated chunk keys (contiguous)
    v_ptr,                       # value [B, S, Hkv*D], last dim contiguous
    k_buf_ptr, v_buf_ptr,        # [B, Hkv, C, D] buffers, updated in place
    start_pos_ptr,               # [B] int64
    S, capacity, num_kv_heads, n_write,
    stride_vb, stride_vs,
    stride_cb, stride_ch, stride_cs,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """grid (cdiv(n_write, BLOCK_T), B) with n_write = min(S, C); runs after attention (§1 rule 5).

    §1 rule 6: writes chunk tokens i = S - n_write + t (the last min(S, C) tokens) of row b to slot
    (start_pos[b] + i) mod C (§1 rule 1), every KV head: rotated key and plain value. The slots of
    one call are distinct because n_write <= C.
    """
    b = tl.program_id(1)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    m = (t < n_write)[:, None]
    i = S - n_write + t
    slot = (tl.load(start_pos_ptr + b).to(tl.int32) + i) % capacity
    d = tl.arange(0, HEAD_DIM)
    b64 = b.to(tl.int64)
    k_src = k_rot_ptr + b64 * S * num_kv_heads * HEAD_DIM + (i * num_kv_heads)[:, None] * HEAD_DIM + d[None, :]
    v_src = v_ptr + b64 * stride_vb + i[:, None] * stride_vs + d[None, :]
    dst = b64 * stride_cb + slot[:, None] * stride_cs + d[None, :]
    for h in range(0, num_kv_heads):
        kt = tl.load(k_src + h * HEAD_DIM, mask=m)
        vt = tl.load(v_src + h * HEAD_DIM, mask=m)
        tl.store(k_buf_ptr + dst + h * stride_ch, kt.to(k_buf_ptr.dtype.element_ty), mask=m)
        tl.store(v_buf_ptr + dst + h * stride_ch, vt.to(v_buf_ptr.dtype.element_ty), mask=m)
