"""GPU checks of the kernels (marker ``gpu``): skipped with a reason that says what would run.

* the Triton kernels through torch on CUDA, at Mistral-7B / Mixtral-like shapes, against mtx.models.ops;
* the eager model on CUDA (which then runs the kernels) against the reference path (MTX_KERNELS=0);
* libmtx_kernels.so (the AOT cubins) through ctypes on CUDA tensors against mtx.models.ops.

(tests/test_kernels_triton.py also runs its whole grid on the GPU when one is present.)
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from mtx.models import ops

HAS_CUDA = torch.cuda.is_available()
TOL = {
    torch.float32: dict(atol=2e-4, rtol=2e-4),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=2e-2),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ENUM = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def need_gpu(what: str) -> None:
    if not HAS_CUDA:
        pytest.skip(f"no CUDA GPU: would run {what}")
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip(f"GPU below compute capability 8.0: would run {what}")


def attn_inputs(b, s, hq, hkv, d, cap, starts, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, device="cuda").to(dtype)  # noqa: E731
    return dict(query=r(b, s, hq * d), key=r(b, s, hkv * d), value=r(b, s, hkv * d), k_buf=r(b, hkv, cap, d),
                v_buf=r(b, hkv, cap, d), start_pos=torch.tensor(starts, dtype=torch.int64, device="cuda"))


def moe_inputs(n, h, inter, e, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randint(-16, 17, (n, h), generator=g, device="cuda") / 16).to(dtype)
    router = (torch.randint(-16, 17, (e, h), generator=g, device="cuda") / 64).to(dtype)
    w1 = (torch.randn(e, inter, h, generator=g, device="cuda") * h ** -0.5).to(dtype)
    w3 = (torch.randn(e, inter, h, generator=g, device="cuda") * h ** -0.5).to(dtype)
    w2 = (torch.randn(e, h, inter, generator=g, device="cuda") * inter ** -0.5).to(dtype)
    return x, router, w1, w3, w2


ATTN_SHAPES = [  # (batch, seq, Hq, Hkv, D, C, window, starts): decode and prefill, wrapped buffers
    (2, 1, 32, 8, 128, 4096, 4096, [4100, 9000]),
    (1, 300, 32, 8, 128, 4096, 4096, [5000]),
    (4, 1, 32, 8, 64, 1024, 512, [0, 700, 1024, 3001]),
    (3, 17, 16, 2, 128, 256, 0, [0, 100, 239]),
]
MOE_SHAPES = [(1, 1024, 3584, 8, 2), (512, 1024, 3584, 8, 2), (64, 1024, 512, 64, 6)]  # (N, H, I, E, top_k)


@pytest.fixture(autouse=True)
def _exact_reference_matmuls(monkeypatch):
    """The reference's fp16/bf16 GEMMs on CUDA must accumulate in fp32 (router logits stay exact)."""
    if HAS_CUDA:
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_fp16_reduced_precision_reduction", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_kernels_on_cuda(dtype):
    need_gpu("Triton swa_gqa (decode and prefill at Mistral-7B shapes, splits chosen by the plan) and moe "
             "(8 experts top-2, 64 experts top-6) on cuda against mtx.models.ops")
    from mtx import kernels

    for b, s, hq, hkv, d, cap, win, starts in ATTN_SHAPES:
        t = attn_inputs(b, s, hq, hkv, d, cap, starts, dtype)
        inv = ops.rope_inv_freq(d, 1e6).cuda()
        rk, rv = t["k_buf"].clone(), t["v_buf"].clone()
        ref = ops.swa_gqa_inplace(t["query"], t["key"], t["value"], rk, rv, t["start_pos"], inv, hq, hkv, win, d ** -0.5)
        out = kernels.swa_gqa(t["query"], t["key"], t["value"], t["k_buf"], t["v_buf"], t["start_pos"], inv, hq, hkv,
                              win, d ** -0.5)
        torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])
        torch.testing.assert_close(t["k_buf"].float(), rk.float(), **TOL[dtype])
        assert torch.equal(t["v_buf"], rv)
    for n, h, inter, e, k in MOE_SHAPES:
        args = moe_inputs(n, h, inter, e, dtype)
        torch.testing.assert_close(kernels.moe(*args, k).float(), ops.moe_reference(*args, k).float(), **TOL[dtype])


@pytest.mark.gpu
def test_eager_model_runs_kernels_on_cuda(ckpt_factory, monkeypatch):
    need_gpu("the Mixtral test model's eager forward on cuda through mtx.kernels, against its reference path")
    from mtx import kernels
    from mtx.models import build_model

    model = build_model(ckpt_factory("mixtral4"), "float32").cuda()
    ids = torch.randint(0, 128, (2, 20), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    calls = {"swa_gqa": 0, "moe": 0}
    for name in calls:
        real = getattr(kernels, name)

        def spy(*a, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(kernels, name, spy)

    def run() -> torch.Tensor:
        kv, outs = model.new_kv(2), []
        with torch.no_grad():
            for s0 in range(0, 20, 7):
                outs.append(model(ids[:, s0:s0 + 7], torch.full((2,), s0, device="cuda"), kv))
        return torch.cat(outs, 1)

    got = run()
    assert calls["swa_gqa"] > 0 and calls["moe"] > 0, "the CUDA forward did not use mtx.kernels"
    monkeypatch.setenv("MTX_KERNELS", "0")
    ref = run()
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=2e-4)


@pytest.fixture(scope="module")
def kernels_lib(request):
    """libmtx_kernels.so: $MTX_KERNELS_LIB (a prebuilt library, e.g. from scripts/gpu_check.sh), else built
    by the plugins_build_dir fixture."""
    import os

    path = os.environ.get("MTX_KERNELS_LIB")
    if not path:
        path = str(request.getfixturevalue("plugins_build_dir") / "libmtx_kernels.so")
    so = ctypes.CDLL(path)
    so.mtx_last_error.restype = ctypes.c_char_p
    so.mtx_swa_gqa_workspace_size.restype = ctypes.c_size_t
    so.mtx_moe_workspace_size.restype = ctypes.c_size_t
    return so


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_libmtx_kernels_on_cuda(dtype, request):
    need_gpu("libmtx_kernels.so (AOT cubins, mtx_swa_gqa_forward and mtx_moe_forward through ctypes) on cuda "
             "against mtx.models.ops")
    lib = request.getfixturevalue("kernels_lib")
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    for b, s, hq, hkv, d, cap, win, starts in ATTN_SHAPES:
        t = attn_inputs(b, s, hq, hkv, d, cap, starts, dtype, seed=1)
        inv = ops.rope_inv_freq(d, 1e6).cuda()
        rk, rv = t["k_buf"].clone(), t["v_buf"].clone()
        ref = ops.swa_gqa_inplace(t["query"], t["key"], t["value"], rk, rv, t["start_pos"], inv, hq, hkv, win, d ** -0.5)
        out = torch.empty_like(t["query"])
        ws_size = lib.mtx_swa_gqa_workspace_size(b, s, hq, hkv, d, cap, win, ENUM[dtype])
        ws = torch.empty(ws_size, dtype=torch.uint8, device="cuda")
        rc = lib.mtx_swa_gqa_forward(_ptr(t["query"]), _ptr(t["key"]), _ptr(t["value"]), _ptr(t["k_buf"]),
                                     _ptr(t["v_buf"]), _ptr(t["start_pos"]), _ptr(inv), _ptr(out), b, s, hq, hkv, d,
                                     cap, win, ctypes.c_float(d ** -0.5), ENUM[dtype], _ptr(ws),
                                     ctypes.c_size_t(ws_size), stream)
        assert rc == 0, lib.mtx_last_error()
        torch.cuda.synchronize()
        torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])
        torch.testing.assert_close(t["k_buf"].float(), rk.float(), **TOL[dtype])
        assert torch.equal(t["v_buf"], rv)
    for n, h, inter, e, k in MOE_SHAPES:
        args = moe_inputs(n, h, inter, e, dtype, seed=2)
        out = torch.empty_like(args[0])
        ws_size = lib.mtx_moe_workspace_size(ctypes.c_int64(n), h, inter, e, k, ENUM[dtype])
        ws = torch.empty(ws_size, dtype=torch.uint8, device="cuda")
        rc = lib.mtx_moe_forward(*(_ptr(a) for a in args), _ptr(out), ctypes.c_int64(n), h, inter, e, k, ENUM[dtype],
                                 _ptr(ws), ctypes.c_size_t(ws_size), stream)
        assert rc == 0, lib.mtx_last_error()
        torch.cuda.synchronize()
        torch.testing.assert_close(out.float(), ops.moe_reference(*args, k).float(), **TOL[dtype])


@pytest.mark.gpu
def test_libmtx_kernels_device_check_and_eager_load(request):
    need_gpu("mtx_check_device and mtx_load_kernels of libmtx_kernels.so on this GPU (driver and architecture "
             "accepted or refused with what is supported; every cubin of the arch loaded)")
    lib = request.getfixturevalue("kernels_lib")
    major, minor = torch.cuda.get_device_capability()
    supported = (major, minor) in {(8, 0), (8, 6), (8, 7), (8, 9), (9, 0)}
    rc = lib.mtx_check_device(-1)
    if not supported:
        assert rc == 3 and b"no kernel image" in lib.mtx_last_error()
        return
    assert rc == 0, lib.mtx_last_error()
    assert lib.mtx_load_kernels(-1) == 0, lib.mtx_last_error()
    assert lib.mtx_load_kernels(-1) == 0  # idempotent
