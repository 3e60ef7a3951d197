"""PyTorch reference of the two mtx ops: the oracle every backend is checked against.

``mtx::swa_gqa``  sliding-window grouped-query attention over a rolling KV buffer (RoPE inside).
``mtx::moe``      sparse mixture of experts: fp32 router softmax, top-k, renormalise, SwiGLU experts.

docs/ops.md is the normative text; this file is its executable form. Both ops are registered with
``torch.library`` as functional ops (they return the updated KV buffers) so that torch.export sees
one node per block. The eager model uses :func:`swa_gqa_inplace`, which computes the same output and
writes only the chunk's slots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtx import rolling_kv


def rope_inv_freq(head_dim: int, theta: float, linear_factor: float = 1.0) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] float32, bit-identical to transformers' default RoPE, and to its
    linear RoPE scaling (positions divided by ``linear_factor``: the frequencies divided, in float32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    return inv_freq if linear_factor == 1.0 else inv_freq / linear_factor


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, S, H, D] at absolute ``positions`` [B, S] (half-split convention).

    Angles are ``float32(p) * inv_freq`` in float32; the rotation runs in float32 and the result is
    cast back to ``x.dtype``.
    """
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(torch.float32)  # [B, S, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]  # [B, S, 1, D]
    xf = x.to(torch.float32)
    return (xf * emb.cos() + rotate_half(xf) * emb.sin()).to(x.dtype)


def swa_gqa_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
    start_pos: torch.Tensor,
    window: int,
    scale: float,
) -> torch.Tensor:
    """Attention of a chunk over (buffer as held before the call) + (the chunk's own keys).

    q [B, S, Hq, D] and k [B, S, Hkv, D] already rotated; v [B, S, Hkv, D];
    past_key/past_value [B, Hkv, C, D]; start_pos [B] int64. ``window`` is the op attribute
    (0 = full attention). Computes in float32; returns [B, S, Hq, D] in q's dtype.
    """
    b, s, hq, d = q.shape
    hkv, cap = past_key.shape[1], past_key.shape[2]
    w = rolling_kv.effective_window(window, cap)
    keys = torch.cat((past_key.float(), k.float().transpose(1, 2)), dim=2)  # [B, Hkv, C+S, D]
    vals = torch.cat((past_value.float(), v.float().transpose(1, 2)), dim=2)
    q_pos = rolling_kv.chunk_positions(start_pos, s)  # [B, S]
    k_pos = torch.cat((rolling_kv.resident_positions(start_pos, cap), q_pos), dim=1)  # [B, C+S]
    mask = rolling_kv.visible(q_pos, k_pos, w)[:, None, None]  # [B, 1, 1, S, C+S]

    qg = q.float().reshape(b, s, hkv, hq // hkv, d).permute(0, 2, 3, 1, 4)  # [B, Hkv, G, S, D]
    scores = torch.matmul(qg, keys[:, :, None].transpose(-1, -2)) * scale  # [B, Hkv, G, S, C+S]
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, vals[:, :, None])  # [B, Hkv, G, S, D]
    return out.permute(0, 3, 1, 2, 4).reshape(b, s, hq, d).to(q.dtype)


def write_chunk(buffer: torch.Tensor, chunk: torch.Tensor, start_pos: torch.Tensor) -> None:
    """In place: write chunk [B, S, H, D] into buffer [B, H, C, D] at slots (start+i) mod C.

    Only the last min(S, C) tokens are written (earlier ones would be overwritten within the call).
    """
    cap = buffer.shape[2]
    keep = rolling_kv.written_tokens(chunk.shape[1], cap)
    src = chunk[:, keep].transpose(1, 2).to(buffer.dtype)  # [B, H, S', D]
    pos = rolling_kv.chunk_positions(start_pos, chunk.shape[1])[:, keep]
    idx = rolling_kv.slot_of(pos, cap)[:, None, :, None].expand_as(src)
    buffer.scatter_(2, idx, src)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, s, _ = x.shape
    return x.reshape(b, s, heads, -1)


def swa_gqa_inplace(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
    start_pos: torch.Tensor,
    inv_freq: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    window: int,
    scale: float,
) -> torch.Tensor:
    """``mtx::swa_gqa`` with the buffers updated in place; returns output [B, S, Hq*D].

    query [B, S, Hq*D], key/value [B, S, Hkv*D] (pre-RoPE), buffers [B, Hkv, C, D] of post-RoPE keys.
    """
    b, s, _ = query.shape
    pos = rolling_kv.chunk_positions(start_pos, s)
    q = apply_rope(_split_heads(query, num_heads), pos, inv_freq)
    k = apply_rope(_split_heads(key, num_kv_heads), pos, inv_freq)
    v = _split_heads(value, num_kv_heads)
    out = swa_gqa_attend(q, k, v, past_key, past_value, start_pos, window, scale)
    write_chunk(past_key, k, start_pos)
    write_chunk(past_value, v, start_pos)
    return out.reshape(b, s, -1)


@torch.library.custom_op("mtx::swa_gqa", mutates_args=())
def swa_gqa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
    start_pos: torch.Tensor,
    inv_freq: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    window: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Functional ``mtx::swa_gqa``: returns (output [B,S,Hq*D], present_key, present_value)."""
    present_key, present_value = past_key.clone(), past_value.clone()
    out = swa_gqa_inplace(query, key, value, present_key, present_value, start_pos, inv_freq,
                          num_heads, num_kv_heads, window, scale)
    return out, present_key, present_value


@swa_gqa.register_fake
def _(query, key, value, past_key, past_value, start_pos, inv_freq, num_heads, num_kv_heads, window, scale):
    return torch.empty_like(query), torch.empty_like(past_key), torch.empty_like(past_value)


def router_probs(x: torch.Tensor, router_weight: torch.Tensor) -> torch.Tensor:
    """Router probabilities [N, E] float32: softmax in float32 of x @ router_weight.T (computed in x's dtype)."""
    return torch.softmax(F.linear(x, router_weight).float(), dim=-1)


def moe_route(x: torch.Tensor, router_weight: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Router: logits = x @ router_weight.T in x's dtype, softmax in float32, top-k, renormalise.

    x [N, H]; router_weight [E, H]. Returns (weights [N, k] float32 summing to 1, experts [N, k] int64).
    Ties go to the lower expert index.
    """
    probs = router_probs(x, router_weight)
    top, idx = torch.sort(probs, dim=-1, descending=True, stable=True)
    top, idx = top[:, :top_k], idx[:, :top_k]
    return top / top.sum(dim=-1, keepdim=True), idx


def swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """SwiGLU expert: w2(silu(w1 x) * w3 x) with w1, w3 [I, H] and w2 [H, I]."""
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def moe_reference(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
    top_k: int,
) -> torch.Tensor:
    """``mtx::moe``: x [..., H]; router [E, H]; w1, w3 [E, I, H]; w2 [E, H, I]. Output like x.

    Each token's output is sum_k weight_k * expert_k(x), weights cast to x's dtype.
    (A loop over experts is fine here: this is the readable oracle, not a kernel.)
    """
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    weights, experts = moe_route(flat, router_weight, top_k)
    weights = weights.to(x.dtype)
    out = torch.zeros_like(flat)
    for e in range(router_weight.shape[0]):
        token, nth = torch.where(experts == e)
        if token.numel() == 0:
            continue
        y = swiglu(flat[token], w1[e], w3[e], w2[e]) * weights[token, nth, None]
        out.index_add_(0, token, y)
    return out.reshape(shape)


@torch.library.custom_op("mtx::moe", mutates_args=())
def moe(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
    top_k: int,
) -> torch.Tensor:
    """Functional ``mtx::moe`` (see :func:`moe_reference`)."""
    return moe_reference(x, router_weight, w1, w3, w2, top_k)


@moe.register_fake
def _(x, router_weight, w1, w3, w2, top_k):
    return torch.empty_like(x)
