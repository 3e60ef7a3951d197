"""Triton kernels (mtx.kernels) against the PyTorch reference ops (mtx.models.ops).

On hosts without a CUDA GPU the kernels run in Triton's CPU interpreter (conftest sets
TRITON_INTERPRET=1 before triton is imported); on GPU hosts the same grid runs the compiled kernels
on the GPU. Every check compares with ``mtx.models.ops`` (the oracle), never with the kernels.

Grid: head sizes 64 and 128; GQA ratios 1, 4, 8; float32 (tight), float16 and bfloat16 (looser);
windows below and at capacity and full attention; decode, prefill chunks and chunks longer than the
capacity; ragged start positions; start positions at every slot offset; both attention variants
(direct, and split over the key range with a combine); MoE with 8 experts top-2 and 64 experts
top-6 with experts that receive no token, ties in the router, several passes.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from mtx import rolling_kv  # noqa: E402
from mtx.kernels import launch  # noqa: E402
from mtx.models import ops  # noqa: E402

if launch.interpreting():
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:  # pragma: no cover - conftest turns the interpreter on when there is no GPU
    pytest.skip("no CUDA GPU and TRITON_INTERPRET is not set: Triton cannot run the kernels",
                allow_module_level=True)

TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=2e-2),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EMPTY_SLOT = 100.0  # contents of slots that hold no position: a kernel that reads them is caught


def dtype_id(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


# ------------------------------------------------------------------ SlidingWindowGQA


def attn_case(batch: int, seq: int, hq: int, hkv: int, d: int, cap: int, starts: list[int], dtype: torch.dtype,
              seed: int) -> dict:
    """Random chunk and buffers; slots empty before the call (docs/ops.md §1 rule 3) hold EMPTY_SLOT."""
    g = torch.Generator().manual_seed(seed)
    start_pos = torch.tensor(starts, dtype=torch.int64)
    kb = torch.randn(batch, hkv, cap, d, generator=g)
    vb = torch.randn(batch, hkv, cap, d, generator=g)
    empty = (rolling_kv.resident_positions(start_pos, cap) < 0)[:, None, :, None].expand_as(kb)
    kb[empty] = EMPTY_SLOT
    vb[empty] = -EMPTY_SLOT
    return dict(
        query=torch.randn(batch, seq, hq * d, generator=g).to(dtype),
        key=torch.randn(batch, seq, hkv * d, generator=g).to(dtype),
        value=torch.randn(batch, seq, hkv * d, generator=g).to(dtype),
        k_buf=kb.to(dtype), v_buf=vb.to(dtype), start_pos=start_pos)


def run_both(case: dict, hq: int, hkv: int, window: int, theta: float = 10000.0, **variant):
    """(kernel output, kernel k_buf, kernel v_buf), (reference ...), both from the same inputs."""
    d = case["k_buf"].shape[-1]
    inv_freq = ops.rope_inv_freq(d, theta)
    scale = d ** -0.5
    ref_k, ref_v = case["k_buf"].clone(), case["v_buf"].clone()
    ref = ops.swa_gqa_inplace(case["query"], case["key"], case["value"], ref_k, ref_v, case["start_pos"], inv_freq,
                              hq, hkv, window, scale)
    dev = {k: v.to(DEVICE) for k, v in case.items()}
    out = launch.swa_gqa(dev["query"], dev["key"], dev["value"], dev["k_buf"], dev["v_buf"], dev["start_pos"],
                         inv_freq.to(DEVICE), hq, hkv, window, scale, **variant)
    return (out.cpu(), dev["k_buf"].cpu(), dev["v_buf"].cpu()), (ref, ref_k, ref_v)


def check(case: dict, got, ref, dtype: torch.dtype, what: str) -> None:
    out, kb, vb = got
    rout, rkb, rvb = ref
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), rout.float(), **tol, msg=lambda m: f"{what}: output\n{m}")
    # Keys are rotated by both sides (tolerance); untouched slots and values are copied bit-exactly.
    torch.testing.assert_close(kb.float(), rkb.float(), **tol, msg=lambda m: f"{what}: key buffer\n{m}")
    written = (rkb != case["k_buf"]) | (rvb != case["v_buf"])
    assert torch.equal(kb[~written], case["k_buf"][~written]), f"{what}: a slot that must not be written changed"
    assert torch.equal(vb, rvb), f"{what}: value buffer differs"


# (seq, window, capacity, starts, variant): decode (split kernel), prefill with S >= 2 and W = C
# (direct kernel; read-before-write matters), S > C (split kernel, 2 splits). Ragged starts, wrapped.
SCENARIOS = [
    (1, 5, 8, [24, 27, 9, 30], {}),
    (5, 8, 8, [0, 3, 13], {"block_m": 64}),
    (11, 5, 8, [0, 21], {"num_splits": 2}),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_swa_gqa_matches_reference(head_dim, group, dtype):
    hkv = 1
    hq = hkv * group
    for i, (seq, window, cap, starts, variant) in enumerate(SCENARIOS):
        case = attn_case(len(starts), seq, hq, hkv, head_dim, cap, starts, dtype, seed=100 * i + group)
        got, ref = run_both(case, hq, hkv, window, theta=1e6 if i % 2 else 1e4, **variant)
        check(case, got, ref, dtype, f"S={seq} W={window} C={cap} starts={starts} {variant}")


@pytest.mark.parametrize("variant", [{}, {"block_m": 64}], ids=["split", "direct"])
def test_swa_gqa_full_attention(variant):
    """window = 0: W = C. Within capacity (start + S <= C) and past it (docs/ops.md §1 rule 8)."""
    for seq, starts in ((3, [0, 2, 5]), (1, [7, 12, 30])):
        case = attn_case(len(starts), seq, 4, 2, 64, 8, starts, torch.float32, seed=seq)
        got, ref = run_both(case, 4, 2, 0, **variant)
        check(case, got, ref, torch.float32, f"S={seq} starts={starts}")


@pytest.mark.parametrize("seq,variant", [(1, {}), (3, {"block_m": 64}), (8, {}), (11, {"block_m": 64})],
                         ids=["S1-split", "S3-direct", "S8-split", "S11-direct"])
def test_swa_gqa_every_slot_offset(seq, variant):
    """C = 8 rows whose start positions cover every slot mod C, buffers already wrapped; S < C, = C, > C."""
    cap, window, hq, hkv = 8, 6, 4, 1
    starts = [2 * cap + r for r in range(cap)]
    case = attn_case(cap, seq, hq, hkv, 64, cap, starts, torch.float32, seed=seq)
    got, ref = run_both(case, hq, hkv, window, **variant)
    check(case, got, ref, torch.float32, f"S={seq} {variant}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_swa_gqa_chunked_sequence(dtype):
    """Many calls on the same buffers (state carried by each side): chunks of 1 .. > C, two rows at
    different positions, C = W = 8 (every chunk of >= 2 overwrites slots its own queries need)."""
    cap, hq, hkv, d = 8, 4, 2, 64
    g = torch.Generator().manual_seed(7)
    kb = torch.zeros(2, hkv, cap, d).to(dtype)
    vb = torch.zeros(2, hkv, cap, d).to(dtype)
    ref_k, ref_v = kb.clone(), vb.clone()
    dev_k, dev_v = kb.to(DEVICE), vb.to(DEVICE)
    inv_freq = ops.rope_inv_freq(d, 10000.0)
    pos = torch.tensor([0, 5])  # row 1 starts with 5 positions "already" held (zeros)
    for step, s in enumerate([3, 1, 1, 8, 1, 13, 2, 1]):
        q = torch.randn(2, s, hq * d, generator=g).to(dtype)
        k = torch.randn(2, s, hkv * d, generator=g).to(dtype)
        v = torch.randn(2, s, hkv * d, generator=g).to(dtype)
        ref = ops.swa_gqa_inplace(q, k, v, ref_k, ref_v, pos, inv_freq, hq, hkv, cap, d ** -0.5)
        out = launch.swa_gqa(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), dev_k, dev_v, pos.to(DEVICE),
                             inv_freq.to(DEVICE), hq, hkv, cap, d ** -0.5)
        torch.testing.assert_close(out.cpu().float(), ref.float(), **TOL[dtype], msg=lambda m: f"step {step}\n{m}")
        torch.testing.assert_close(dev_k.cpu().float(), ref_k.float(), **TOL[dtype])
        # Keys may differ by rounding between the sides: continue from the reference's buffer so the
        # comparison stays per-step (values are compared exactly).
        assert torch.equal(dev_v.cpu(), ref_v)
        dev_k.copy_(ref_k.to(DEVICE))
        pos = pos + s


@pytest.mark.parametrize("num_splits", [1, 3, 7])
def test_swa_gqa_split_combine(num_splits):
    """Flash-decoding: up to 159 resident keys split over several programs (some splits empty for some
    rows), merged by the combine kernel; capacity 160 is not a multiple of the key tile."""
    cap, hq, hkv, d = 160, 4, 1, 64
    for seq, starts, window in ((1, [300, 40], 150), (9, [300, 0], 0)):
        case = attn_case(len(starts), seq, hq, hkv, d, cap, starts, torch.float32, seed=num_splits + seq)
        got, ref = run_both(case, hq, hkv, window, num_splits=num_splits)
        check(case, got, ref, torch.float32, f"S={seq} splits={num_splits}")


def test_swa_gqa_buffer_views():
    """Buffers passed as row views of larger batched buffers (what the runtime does for ragged rows)."""
    cap, hq, hkv, d = 8, 4, 2, 64
    case = attn_case(3, 2, hq, hkv, d, cap, [4, 9, 15], torch.float16, seed=3)
    big_k = torch.zeros(5, hkv, cap, d, dtype=torch.float16)
    big_v = torch.zeros_like(big_k)
    big_k[1:4], big_v[1:4] = case["k_buf"], case["v_buf"]
    inv_freq = ops.rope_inv_freq(d, 10000.0)
    ref_k, ref_v = case["k_buf"].clone(), case["v_buf"].clone()
    ref = ops.swa_gqa_inplace(case["query"], case["key"], case["value"], ref_k, ref_v, case["start_pos"], inv_freq,
                              hq, hkv, 6, d ** -0.5)
    big_k, big_v = big_k.to(DEVICE), big_v.to(DEVICE)
    out = launch.swa_gqa(case["query"].to(DEVICE), case["key"].to(DEVICE), case["value"].to(DEVICE),
                         big_k[1:4], big_v[1:4], case["start_pos"].to(DEVICE), inv_freq.to(DEVICE), hq, hkv, 6,
                         d ** -0.5)
    torch.testing.assert_close(out.cpu().float(), ref.float(), **TOL[torch.float16])
    torch.testing.assert_close(big_k[1:4].cpu().float(), ref_k.float(), **TOL[torch.float16])
    assert torch.equal(big_v[1:4].cpu(), ref_v)
    assert not big_k[0].any() and not big_k[4].any(), "rows outside the view were written"


def test_swa_gqa_comparison_is_sharp():
    """The tolerances can fail: the kernel at window W disagrees with the reference at W - 1 and W + 1."""
    cap, hq, hkv, d = 8, 4, 2, 64
    case = attn_case(2, 4, hq, hkv, d, cap, [9, 20], torch.bfloat16, seed=11)
    got, _ = run_both(case, hq, hkv, 6)
    for wrong in (5, 7):
        _, ref = run_both(case, hq, hkv, wrong)
        with pytest.raises(AssertionError):
            torch.testing.assert_close(got[0].float(), ref[0].float(), **TOL[torch.bfloat16])


def test_swa_gqa_rejects_bad_arguments():
    case = attn_case(1, 1, 4, 2, 64, 8, [0], torch.float32, seed=0)
    inv = ops.rope_inv_freq(64, 1e4).to(DEVICE)
    dev = {k: v.to(DEVICE) for k, v in case.items()}
    with pytest.raises(Exception, match="smaller than the sliding window"):
        launch.swa_gqa(dev["query"], dev["key"], dev["value"], dev["k_buf"], dev["v_buf"], dev["start_pos"], inv,
                       4, 2, 9, 0.125)
    with pytest.raises(ValueError, match="start_pos"):
        launch.swa_gqa(dev["query"], dev["key"], dev["value"], dev["k_buf"], dev["v_buf"],
                       dev["start_pos"].to(torch.int32), inv, 4, 2, 8, 0.125)


# ------------------------------------------------------------------ MoE


def moe_case(n: int, h: int, inter: int, e: int, dtype: torch.dtype, seed: int, shape: tuple[int, ...] | None = None):
    """x and the router hold multiples of 1/16 and 1/32, so every router logit is exact in float32 and
    its rounding to T is the same on both sides: expert choices cannot flip on summation order."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randint(-16, 17, (n, h), generator=g) / 16).to(dtype)
    router = (torch.randint(-16, 17, (e, h), generator=g) / 32).to(dtype)
    w1 = (torch.randn(e, inter, h, generator=g) * h ** -0.5).to(dtype)
    w3 = (torch.randn(e, inter, h, generator=g) * h ** -0.5).to(dtype)
    w2 = (torch.randn(e, h, inter, generator=g) * inter ** -0.5).to(dtype)
    if shape is not None:
        x = x.reshape(*shape, h)
    return x, router, w1, w3, w2


def moe_both(args, top_k: int, **kw):
    ref = ops.moe_reference(*args, top_k)
    got = launch.moe(*(t.to(DEVICE) for t in args), top_k, **kw).cpu()
    return got, ref


# (experts, top_k, hidden, inter, tokens): decode; masked tiles (H, I not multiples of 64); fine-grained
# with empty experts; more tokens than experts; 64-row tiles (pairs >= 32 * E)
MOE_CONFIGS = [(8, 2, 64, 32, 1), (8, 2, 96, 48, 37), (64, 6, 64, 32, 5), (64, 6, 64, 16, 24), (8, 2, 64, 64, 130)]
MOE_GRID = [(c, dt) for c in MOE_CONFIGS for dt in DTYPES if not (c[4] == 24 and dt == torch.float16)]


@pytest.mark.parametrize("cfg,dtype", MOE_GRID,
                         ids=["E{}k{}H{}I{}N{}-".format(*c) + dtype_id(dt) for c, dt in MOE_GRID])
def test_moe_matches_reference(cfg, dtype):
    e, k, h, inter, n = cfg
    args = moe_case(n, h, inter, e, dtype, seed=n + e)
    got, ref = moe_both(args, k)
    torch.testing.assert_close(got.float(), ref.float(), **TOL[dtype])
    if e == 64:
        _, experts = ops.moe_route(args[0], args[1], k)
        if n * k < e:
            assert len(torch.unique(experts)) < e, "this fine-grained case must leave experts without tokens"


def test_moe_grouping_bookkeeping():
    """Router ids/weights and the expert grouping (launches 1-2) against torch: stable sort by expert,
    tiles of tile_m rows of one expert each, no tile for an expert without pairs."""
    e, k, n, h, tile_m = 64, 6, 23, 64, 16
    x, router, *_ = moe_case(n, h, 16, e, torch.float32, seed=5)
    r = {name: t.cpu() for name, t in launch.moe_route_and_group(x.to(DEVICE), router.to(DEVICE), k, tile_m).items()}
    ref_w, ref_ids = ops.moe_route(x, router, k)
    assert torch.equal(r["topk_ids"].long(), ref_ids.flatten())
    torch.testing.assert_close(r["topk_weight"], ref_w.flatten(), atol=1e-6, rtol=1e-6)
    ids = ref_ids.flatten()
    assert torch.equal(r["sorted_pair"].long(), torch.argsort(ids, stable=True))
    counts = torch.bincount(ids, minlength=e)
    n_tiles = int(sum((c + tile_m - 1) // tile_m for c in counts.tolist()))
    te, ts, tend = r["tile_expert"], r["tile_start"], r["tile_end"]
    assert (te[:n_tiles] >= 0).all() and (te[n_tiles:] == -1).all()
    covered = torch.zeros(len(ids), dtype=torch.int64)
    for t in range(n_tiles):
        rows = torch.arange(int(ts[t]), int(tend[t]))
        assert 0 < len(rows) <= tile_m
        assert (ids[r["sorted_pair"][rows].long()] == te[t]).all()
        covered[rows] += 1
    assert (covered == 1).all()
    assert set(te[:n_tiles].tolist()) == set(torch.nonzero(counts).flatten().tolist())


@pytest.mark.parametrize("e", [8, 64])
def test_moe_nan_router_row_loses_no_other_row(e):
    """A token whose router row is NaN gets no valid expert id; the grouping leaves its pairs out
    instead of writing them to sorted row 0, so every other token's output still equals the reference,
    and that token's output is NaN, as in the reference."""
    k, n, h, inter, bad = 2, 9, 64, 32, 4
    x, router, w1, w3, w2 = moe_case(n, h, inter, e, torch.float32, seed=e)
    x[bad] = float("nan")
    r = {name: t.cpu() for name, t in launch.moe_route_and_group(x.to(DEVICE), router.to(DEVICE), k, 16).items()}
    keep = torch.tensor([t for t in range(n) if t != bad])
    _, ref_ids = ops.moe_route(x[keep], router, k)
    pairs = (keep[:, None] * k + torch.arange(k)).flatten()          # pair ids of the valid tokens
    ids = ref_ids.flatten()
    order = pairs[torch.argsort(ids, stable=True)]
    assert torch.equal(r["sorted_pair"][:len(order)].long(), order)
    counts = torch.bincount(ids, minlength=e)
    n_tiles = int(sum((c + 15) // 16 for c in counts.tolist()))
    assert (r["tile_expert"][n_tiles:] == -1).all() and int(r["tile_end"][:n_tiles].max()) == len(order)
    got = launch.moe(x.to(DEVICE), router.to(DEVICE), w1.to(DEVICE), w3.to(DEVICE), w2.to(DEVICE), k).cpu()
    ref = ops.moe_reference(x, router, w1, w3, w2, k)
    assert torch.isnan(ref[bad]).all() and torch.isnan(got[bad]).all()  # NaN in, NaN out, as the reference
    torch.testing.assert_close(got[keep], ref[keep], **TOL[torch.float32])


def test_moe_router_ties_go_to_lower_index():
    """Experts with identical router rows tie exactly; docs/ops.md §3.3 picks the lower index."""
    e, k, n, h = 8, 2, 12, 64
    x, router, w1, w3, w2 = moe_case(n, h, 32, e, torch.bfloat16, seed=9)
    router[5] = router[2]
    router[4] = router[3]
    router[7] = router[1]
    got, ref = moe_both((x, router, w1, w3, w2), k)
    torch.testing.assert_close(got.float(), ref.float(), **TOL[torch.bfloat16])
    ids = launch.moe_route_and_group(x.to(DEVICE), router.to(DEVICE), k, 16)["topk_ids"].cpu().view(n, k)
    _, ref_ids = ops.moe_route(x, router, k)
    assert torch.equal(ids.long(), ref_ids)
    tied = 0
    for row in ids.tolist():
        for lo, hi in ((2, 5), (3, 4), (1, 7)):
            if hi in row:  # a tied higher index only together with, and after, its lower twin
                assert lo in row and row.index(lo) < row.index(hi), (row, lo, hi)
                tied += 1
    assert tied > 0, "the case must select tied experts"


def test_moe_passes_and_3d_input():
    """Several token passes (tokens_per_pass) and a [B, S, H] input give the reference's result."""
    args = moe_case(20, 64, 32, 8, torch.float16, seed=2, shape=(4, 5))
    got, ref = moe_both(args, 2, tokens_per_pass=7)
    assert got.shape == (4, 5, 64)
    torch.testing.assert_close(got.float(), ref.float(), **TOL[torch.float16])


def test_moe_comparison_is_sharp():
    """The tolerance can fail: the kernel's top-2 result is far from the reference's top-1 and top-3."""
    args = moe_case(9, 64, 32, 8, torch.bfloat16, seed=4)
    got, _ = moe_both(args, 2)
    for wrong in (1, 3):
        ref = ops.moe_reference(*args, wrong)
        with pytest.raises(AssertionError):
            torch.testing.assert_close(got.float(), ref.float(), **TOL[torch.bfloat16])


def test_model_path_selection():
    """The eager model takes the kernels only for CUDA tensors; never on CPU, never in the interpreter."""
    from mtx import kernels
    from mtx.models import transformer

    assert not kernels.enabled("cpu")
    assert transformer._kernels_for(torch.zeros(1)) is None
    if DEVICE == "cpu":
        assert not kernels.enabled("cuda")
    assert kernels.supports_head_dim(64) and kernels.supports_head_dim(16) and not kernels.supports_head_dim(96)
