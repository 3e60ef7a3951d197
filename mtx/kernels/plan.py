"""Launch plans of the mtx kernels: tile sizes, split counts, grids and workspace layouts.

Pure Python, no torch and no triton: the one statement of these rules. ``plugins/src/mtx_kernels.c``
implements the same functions in C for the ahead-of-time kernels (``tests/test_plugins_build.py``
checks that both give the same workspace sizes), and ``plugins/aot/compile_kernels.py`` compiles
exactly the specializations these rules can pick for the shapes listed in plugins/README.md.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Workspace regions start at multiples of this many bytes.
ALIGN = 256

#: Attention: aim for at least this many programs before splitting the key range (about 2 per SM
#: on an H100); never more than ATTN_MAX_SPLITS splits, nor splits of fewer than
#: ATTN_MIN_KEYS_PER_SPLIT keys.
ATTN_TARGET_CTAS = 256
ATTN_MAX_SPLITS = 64
ATTN_MIN_KEYS_PER_SPLIT = 64
#: Chunk tokens per program of the RoPE and write kernels; query rows per program of the combine kernel.
ATTN_BLOCK_T = 16
ATTN_COMBINE_BLOCK_R = 16

#: MoE: tokens per pass (bounds the workspace; a longer input runs in several passes).
MOE_TOKENS_PER_PASS = 4096
#: Router block widths compiled ahead of time (experts are padded up to one of these).
MOE_ROUTER_BLOCK_E = (16, 64, 256)
#: Selected experts are padded up to this (the ahead-of-time router supports top_k <= 8).
MOE_ROUTER_BLOCK_K = 8
MOE_ROUTER_BLOCK_T = 16
MOE_COMBINE_BLOCK_H = 128
MOE_COMBINE_BLOCK_T = 16
#: Output columns per program of both grouped GEMMs.
MOE_BLOCK_N = 64


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def align(n: int) -> int:
    return cdiv(n, ALIGN) * ALIGN


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def elem_size(dtype_name: str) -> int:
    return {"float32": 4, "float16": 2, "bfloat16": 2}[dtype_name]


def supports_head_dim(head_dim: int) -> bool:
    """Head sizes the attention kernels take: powers of two from 16 (tl.arange, tl.dot)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def attn_block_n(elem_bytes: int) -> int:
    """Keys per attention tile: 64 for 16-bit types, 32 for float32 (shared memory on sm_89)."""
    return 32 if elem_bytes == 4 else 64


# Warps and tiles below are chosen so that no ahead-of-time cubin (sm_80, sm_89, sm_90a) spills to
# local memory: plugins/aot/compile_kernels.py fails on any cubin with a stack frame.

def attn_direct_block_m(elem_bytes: int, head_dim: int) -> int:
    """Query rows per program of the direct (no split) attention variant: 64, but 16 for float32 with
    head size 128 (a 64-row float32 tile of 128 columns spills on every architecture)."""
    return 16 if elem_bytes == 4 and head_dim >= 128 else 64


def attn_num_warps(elem_bytes: int, head_dim: int, block_m: int, arch: int = 90) -> int:
    """Warps of the attention kernel on sm_<arch>: 8 for 64-row tiles of head size 128 and for float32
    (but 4 for float32 16-row tiles of head size 128 below sm_90), else 4."""
    if elem_bytes == 4:
        return 4 if head_dim >= 128 and block_m <= 16 and arch < 90 else 8
    return 8 if block_m >= 64 and head_dim >= 128 else 4


#: Warps of the RoPE, combine and write kernels of attention.
ATTN_ROPE_NUM_WARPS = 8
ATTN_COMBINE_NUM_WARPS = 4
ATTN_WRITE_NUM_WARPS = 4
#: Warps of the MoE align kernel (one program) and of the combine kernel.
MOE_ALIGN_NUM_WARPS = 8
MOE_COMBINE_NUM_WARPS = 4


def moe_router_block_h(elem_bytes: int) -> int:
    """Hidden columns per step of the router: 32 for float32, 64 otherwise."""
    return 32 if elem_bytes == 4 else 64


def moe_router_num_warps(elem_bytes: int) -> int:
    return 8 if elem_bytes == 4 else 4


def moe_gemm_num_warps(elem_bytes: int) -> int:
    """Warps of both grouped GEMMs: 8 for float32, 4 otherwise."""
    return 8 if elem_bytes == 4 else 4


def moe_block_k(elem_bytes: int) -> int:
    """Reduction depth per step of both grouped GEMMs."""
    return 32 if elem_bytes == 4 else 64


def moe_num_stages(elem_bytes: int) -> int:
    """Software-pipelining stages of both grouped GEMMs."""
    return 2 if elem_bytes == 4 else 3


def moe_align_block_p(router_block_e: int) -> int:
    """Pairs per step of the align kernel for a router block of ``router_block_e`` experts."""
    return max(32, 8192 // router_block_e)


@dataclass(frozen=True)
class SwaGqaPlan:
    """How one ``swa_gqa`` call runs: four launches and their grids (workspace: swa_gqa_workspace_bytes)."""

    group: int            # G = Hq / Hkv
    rows: int             # S * G query rows per (batch row, KV head)
    block_m: int
    block_n: int
    m_blocks: int
    num_splits: int
    split: bool           # attention writes fp32 partials and the combine kernel runs
    num_warps: int
    num_stages: int


def swa_gqa_plan(batch: int, seq: int, num_heads: int, num_kv_heads: int, head_dim: int, window: int,
                 elem_bytes: int, num_splits: int | None = None, block_m: int | None = None,
                 arch: int = 90) -> SwaGqaPlan:
    """Plan for a chunk of ``seq`` tokens; ``window`` is the *effective* W (docs/ops.md §1 rule 4).

    Two attention variants exist (and are compiled ahead of time):

    * direct, no split (BLOCK_M = :func:`attn_direct_block_m`, 64 but 16 for float32 with D = 128) —
      when rows = S*G > 32 and B*Hkv*cdiv(rows, 64) programs already reach ATTN_TARGET_CTAS;
    * BLOCK_M = 16 rows, split over the key range (flash-decoding, >= 1 split, then the combine
      kernel) — otherwise (decode, short chunks, small batches). Splits: enough to reach
      ATTN_TARGET_CTAS programs, at most ATTN_MAX_SPLITS, and no split shorter than
      ATTN_MIN_KEYS_PER_SPLIT of the keys one block can see (W - 1 + its tokens).

    BLOCK_N: :func:`attn_block_n`; warps: :func:`attn_num_warps` for sm_<arch>.
    Tests force a variant: ``block_m=64`` (with ``num_splits`` None or 1) the direct kernel (at its own
    BLOCK_M),
    ``num_splits=k`` the split kernel with k splits.
    """
    group = num_heads // num_kv_heads
    rows = seq * group
    block_n = attn_block_n(elem_bytes)
    big_ctas = cdiv(rows, 64) * batch * num_kv_heads
    if block_m == 64 and num_splits in (None, 1):
        block_m, split, num_splits = attn_direct_block_m(elem_bytes, head_dim), False, 1
    elif block_m is None and num_splits is None and rows > 32 and big_ctas >= ATTN_TARGET_CTAS:
        block_m, split, num_splits = attn_direct_block_m(elem_bytes, head_dim), False, 1
    else:
        block_m, split = block_m or 16, True
        if num_splits is None:
            ctas = cdiv(rows, block_m) * batch * num_kv_heads
            key_bound = window - 1 + min(seq, cdiv(block_m, group) + 1)
            num_splits = max(1, min(ATTN_MAX_SPLITS, cdiv(ATTN_TARGET_CTAS, ctas),
                                    cdiv(key_bound, ATTN_MIN_KEYS_PER_SPLIT)))
    return SwaGqaPlan(group=group, rows=rows, block_m=block_m, block_n=block_n, m_blocks=cdiv(rows, block_m),
                      num_splits=num_splits, split=split, num_warps=attn_num_warps(elem_bytes, head_dim, block_m, arch),
                      num_stages=2)


@dataclass(frozen=True)
class MoePlan:
    """How one pass of ``moe`` over ``tokens`` tokens runs; workspace regions in order."""

    tokens: int           # tokens in this pass (<= MOE_TOKENS_PER_PASS)
    pairs: int            # tokens * top_k
    tile_m: int           # BLOCK_M of both grouped GEMMs and of the align kernel's tiles
    block_n: int
    block_k: int
    max_tiles: int        # cdiv(pairs, tile_m) + min(E, pairs): each expert adds at most one partial tile
    router_block_e: int
    router_block_k: int
    router_block_h: int
    router_num_warps: int
    align_block_p: int
    num_warps: int
    num_stages: int
    region_bytes: tuple[int, ...]  # topk_weight, topk_ids, sorted_pair, tile_expert, tile_start, tile_end, act, y

    @property
    def workspace_bytes(self) -> int:
        return sum(align(n) for n in self.region_bytes)


def moe_router_block_e(num_experts: int) -> int:
    for b in MOE_ROUTER_BLOCK_E:
        if num_experts <= b:
            return b
    return next_pow2(num_experts)


def moe_plan(tokens: int, hidden: int, inter: int, num_experts: int, top_k: int, elem_bytes: int,
             tile_m: int | None = None) -> MoePlan:
    """Plan for one pass of ``tokens`` (<= MOE_TOKENS_PER_PASS) tokens.

    tile_m = 16 when experts get fewer than 32 pairs on average (decode), else 64 (tests may force it).
    """
    pairs = tokens * top_k
    tile_m = tile_m or (16 if pairs < 32 * num_experts else 64)
    max_tiles = cdiv(pairs, tile_m) + min(num_experts, pairs)
    block_e = moe_router_block_e(num_experts)
    regions = (pairs * 4, pairs * 4, pairs * 4, max_tiles * 4, max_tiles * 4, max_tiles * 4,
               pairs * inter * elem_bytes, pairs * hidden * elem_bytes)
    return MoePlan(
        tokens=tokens, pairs=pairs, tile_m=tile_m, block_n=MOE_BLOCK_N, block_k=moe_block_k(elem_bytes),
        max_tiles=max_tiles, router_block_e=block_e,
        router_block_k=MOE_ROUTER_BLOCK_K if top_k <= MOE_ROUTER_BLOCK_K else next_pow2(top_k),
        router_block_h=moe_router_block_h(elem_bytes), router_num_warps=moe_router_num_warps(elem_bytes),
        align_block_p=moe_align_block_p(block_e), num_warps=moe_gemm_num_warps(elem_bytes),
        num_stages=moe_num_stages(elem_bytes),
        region_bytes=regions,
    )


def swa_gqa_partial_rows_bound(batch: int, seq: int, num_heads: int, num_kv_heads: int) -> int:
    """Upper bound of the split partial rows (B*Hkv*num_splits*S*G) of any plan with batch' <= batch
    and seq' <= seq, non-decreasing in both (plans are not: the split choice flips with the grid).

    With X = B*Hkv and r = S*G: num_splits <= 1 + TARGET / ctas and ctas >= X*r/16, so the rows are
    at most 16*TARGET + X*r; a split plan has X*r < 64*TARGET or r <= 32 (then X*r <= 32*X); and
    never more than X*r*MAX_SPLITS.
    """
    x = batch * num_kv_heads
    xr = x * seq * (num_heads // num_kv_heads)
    return min(xr * ATTN_MAX_SPLITS, 16 * ATTN_TARGET_CTAS + min(xr, max(64 * ATTN_TARGET_CTAS, 32 * x)))


def swa_gqa_workspace_bytes(batch: int, seq: int, num_heads: int, num_kv_heads: int, head_dim: int, window: int,
                            elem_bytes: int) -> int:
    """Workspace enough for every call with batch' <= batch and seq' <= seq (what the C API and the
    TensorRT plugin allocate). ``window`` is accepted for symmetry; the bound does not depend on it."""
    rows = swa_gqa_partial_rows_bound(batch, seq, num_heads, num_kv_heads)
    return (align(batch * seq * num_heads * head_dim * elem_bytes) + align(batch * seq * num_kv_heads * head_dim * elem_bytes)
            + align(rows * head_dim * 4) + align(rows * 2 * 4))


def moe_workspace_bytes(tokens: int, hidden: int, inter: int, num_experts: int, top_k: int, elem_bytes: int) -> int:
    """Workspace enough for every call with tokens' <= tokens (one pass of at most MOE_TOKENS_PER_PASS):
    the plan's regions with max_tiles taken at tile_m = 16, the smallest tile."""
    return moe_plan(min(tokens, MOE_TOKENS_PER_PASS), hidden, inter, num_experts, top_k, elem_bytes,
                    tile_m=16).workspace_bytes
