#!/usr/bin/env python
"""Time the mtx Triton kernels on a CUDA GPU and print JSON, next to their memory-bandwidth bound.

    python scripts/bench_kernels.py [--dtype float16] [--peak-gbps 3350] [--iters 50] [--lib build/plugins/libmtx_kernels.so]

Decode attention is bandwidth bound: one token of one row reads the keys and values of its window,
2 * W * Hkv * D * bytes per layer. MoE decode reads the weights of the experts it selects,
3 * H * I * bytes per distinct selected expert. ``bound_ms`` = bytes / bandwidth, with the bandwidth
measured by a device-to-device copy (or ``--peak-gbps``); ``efficiency`` = bound_ms / ms.
With ``--lib`` the same shapes also run through libmtx_kernels.so (the ahead-of-time cubins).
The MoE grouped GEMM at 64+ tokens is compute bound: ``moe_gemm`` rows give TFLOP/s over
2 * tokens * top_k * 3 * H * I flops against the tensor-core peak (``--peak-tflops``, default: a
large cuBLAS matmul of the same dtype measured here), ``peak_fraction`` = TFLOP/s / peak.
Goals: decode attention efficiency >= 0.85; moe_gemm peak_fraction >= 0.70 at >= 64 tokens.
Needs a CUDA GPU (exits with a message otherwise).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtx import kernels  # noqa: E402
from mtx.models import ops  # noqa: E402

DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ENUM = {"float32": 0, "float16": 1, "bfloat16": 2}


def time_ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def copy_gbps() -> float:
    a = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = time_ms(lambda: b.copy_(a), 20)
    return 2 * a.numel() / ms / 1e6


def bench_attention(args, gbps: float, lib) -> list[dict]:
    dt = DT[args.dtype]
    eb = torch.tensor([], dtype=dt).element_size()
    hq, hkv, d = 32, 8, 128  # Mistral 7B
    rows = []
    inv = ops.rope_inv_freq(d, 1e6).cuda()
    for batch, window, seq in [(1, 4096, 1), (8, 4096, 1), (32, 4096, 1), (1, 32768, 1), (1, 4096, 512)]:
        cap = window
        q = torch.randn(batch, seq, hq * d, device="cuda", dtype=dt)
        k = torch.randn(batch, seq, hkv * d, device="cuda", dtype=dt)
        v = torch.randn_like(k)
        kb = torch.randn(batch, hkv, cap, d, device="cuda", dtype=dt)
        vb = torch.randn_like(kb)
        start = torch.full((batch,), 3 * cap + 5, dtype=torch.int64, device="cuda")
        ms = time_ms(lambda: kernels.swa_gqa(q, k, v, kb, vb, start, inv, hq, hkv, window, d ** -0.5), args.iters)
        nbytes = 2 * window * hkv * d * eb * batch + (q.numel() * 2 + k.numel() * 2 + v.numel() * 2) * eb
        row = dict(op="swa_gqa_decode" if seq == 1 else "swa_gqa_prefill", impl="triton-jit", dtype=args.dtype,
                   batch=batch, seq=seq, window=window, heads=hq, kv_heads=hkv, head_dim=d, ms=round(ms, 4),
                   bytes=nbytes, gbps=round(nbytes / ms / 1e6, 1), bound_ms=round(nbytes / gbps / 1e6, 4))
        row["efficiency"] = round(row["bound_ms"] / ms, 3)
        rows.append(row)
        if lib is not None:
            out = torch.empty_like(q)
            size = lib.mtx_swa_gqa_workspace_size(batch, seq, hq, hkv, d, cap, window, ENUM[args.dtype])
            ws = torch.empty(size, dtype=torch.uint8, device="cuda")
            p = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
            stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)

            def call():
                rc = lib.mtx_swa_gqa_forward(p(q), p(k), p(v), p(kb), p(vb), p(start), p(inv), p(out), batch, seq, hq,
                                             hkv, d, cap, window, ctypes.c_float(d ** -0.5), ENUM[args.dtype], p(ws),
                                             ctypes.c_size_t(size), stream)
                assert rc == 0, lib.mtx_last_error()

            ms2 = time_ms(call, args.iters)
            rows.append(dict(row, impl="libmtx_kernels", ms=round(ms2, 4), gbps=round(nbytes / ms2 / 1e6, 1),
                             efficiency=round(row["bound_ms"] / ms2, 3)))
    return rows


#: (name, experts, top-k, hidden, intermediate) of the MoE benchmarks.
MOE_SHAPES = [("mixtral-8x7b", 8, 2, 4096, 14336), ("fine-grained-64x6", 64, 6, 2048, 1408)]


def moe_weights(e: int, h: int, inter: int, dt: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Random router [E, H], w1/w3 [E, I, H], w2 [E, H, I] on cuda, scaled to keep activations O(1)."""
    router = torch.randn(e, h, device="cuda", dtype=dt) * h ** -0.5
    w1 = torch.randn(e, inter, h, device="cuda", dtype=dt) * h ** -0.5
    return router, w1, torch.randn_like(w1), torch.randn(e, h, inter, device="cuda", dtype=dt) * inter ** -0.5


def bench_moe(args, gbps: float) -> list[dict]:
    dt = DT[args.dtype]
    eb = torch.tensor([], dtype=dt).element_size()
    rows = []
    for name, e, k, h, inter in MOE_SHAPES:
        router, w1, w3, w2 = moe_weights(e, h, inter, dt)
        for n in (1, 16, 512):
            x = torch.randn(n, h, device="cuda", dtype=dt)
            _, sel = ops.moe_route(x, router, k)
            experts = len(torch.unique(sel))
            ms = time_ms(lambda: kernels.moe(x, router, w1, w3, w2, k), args.iters)
            nbytes = experts * 3 * h * inter * eb + 2 * x.numel() * eb
            rows.append(dict(op="moe", model=name, impl="triton-jit", dtype=args.dtype, tokens=n, experts=e, top_k=k,
                             experts_hit=experts, ms=round(ms, 4), bytes=nbytes, gbps=round(nbytes / ms / 1e6, 1),
                             bound_ms=round(nbytes / gbps / 1e6, 4),
                             efficiency=round(nbytes / gbps / 1e6 / ms, 3)))
    return rows


def matmul_tflops(dt: torch.dtype) -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=dt)
    b = torch.randn_like(a)
    ms = time_ms(lambda: a @ b, 10)
    return 2 * 8192 ** 3 / ms / 1e9


def bench_moe_gemm(args, tflops: float) -> list[dict]:
    dt = DT[args.dtype]
    rows = []
    for name, e, k, h, inter in MOE_SHAPES:
        router, w1, w3, w2 = moe_weights(e, h, inter, dt)
        for n in (64, 256, 1024, 4096):
            x = torch.randn(n, h, device="cuda", dtype=dt)
            ms = time_ms(lambda: kernels.moe(x, router, w1, w3, w2, k), args.iters)
            flops = 2 * n * k * 3 * h * inter
            rows.append(dict(op="moe_gemm", model=name, impl="triton-jit", dtype=args.dtype, tokens=n, experts=e,
                             top_k=k, ms=round(ms, 4), tflops=round(flops / ms / 1e9, 1),
                             peak_tflops=round(tflops, 1), peak_fraction=round(flops / ms / 1e9 / tflops, 3)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float16", choices=list(DT))
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--peak-gbps", type=float, default=None, help="bandwidth for the bound (default: measured copy)")
    ap.add_argument("--lib", type=Path, default=None, help="also time libmtx_kernels.so at this path")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="tensor-core peak for moe_gemm (default: a measured 8192^3 cuBLAS matmul)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()
    if not torch.cuda.is_available() or not kernels.enabled("cuda"):
        raise SystemExit("bench_kernels.py needs a CUDA GPU (compute capability >= 8.0) with triton")
    lib = None
    if args.lib is not None:
        lib = ctypes.CDLL(str(args.lib))
        lib.mtx_last_error.restype = ctypes.c_char_p
        lib.mtx_swa_gqa_workspace_size.restype = ctypes.c_size_t
    gbps = args.peak_gbps or copy_gbps()
    result = dict(device=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                  bandwidth_gbps=round(gbps, 1), bandwidth_source="--peak-gbps" if args.peak_gbps else "measured copy",
                  results=bench_attention(args, gbps, lib) + bench_moe(args, gbps))
    tflops = args.peak_tflops or matmul_tflops(DT[args.dtype])
    result.update(peak_tflops=round(tflops, 1), peak_source="--peak-tflops" if args.peak_tflops else "measured matmul")
    result["results"] += bench_moe_gemm(args, tflops)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
