#!/usr/bin/env python3
"""Ahead-of-time compile the mtx Triton kernels to cubins, on any machine (no GPU needed).

Invoked by plugins/CMakeLists.txt. For every kernel specialization in :func:`specs` and every target
architecture it calls ``triton.compile`` with an explicit ``GPUTarget("cuda", arch, 32)`` and writes

* ``cubins/<symbol>.sm<arch>.cubin``
* ``mtx_kernels_manifest.json``  — per cubin: kernel (entry) name, arch, dtype, constexprs,
  num_warps, num_stages, shared memory, parameter list, launch grid rule;
* ``mtx_kernels_table.c``         — the C table libmtx_kernels uses to find and launch each cubin;
* ``mtx_kernels_cubins.S``        — embeds the cubins in the shared library (``.incbin``);
* ``mtx_kernels_config.h``        — the launch constants of mtx/kernels/plan.py as C macros.

Kernel sources and launch rules come from the ``mtx`` package (mtx/kernels/triton_*.py, plan.py):
the shipped cubins are the same kernels the Python tests check.

Entry-point parameters of a Triton cubin: the kernel's non-constexpr arguments in order, then two
pointers (global and profile scratch) that these kernels do not use (size 0: pass NULL).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import functools
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mtx.kernels import plan as P  # noqa: E402  (torch-free)

DTYPES = {"float32": ("*fp32", 0), "float16": ("*fp16", 1), "bfloat16": ("*bf16", 2)}  # name -> (ptr type, C enum)
HEAD_DIMS = (64, 128)
ARCH_SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}

# C enum of kernel kinds (plugins/src/mtx_kernels_internal.h)
KINDS = ["SWA_ROPE", "SWA_ATTN", "SWA_COMBINE", "SWA_WRITE",
         "MOE_ROUTER", "MOE_ALIGN", "MOE_GEMM13", "MOE_GEMM2", "MOE_COMBINE"]

GRIDS = {
    "SWA_ROPE": "(cdiv(S, BLOCK_T), B, 1)",
    "SWA_ATTN": "(cdiv(S*G, BLOCK_M), B*Hkv, num_splits); num_splits from plan.swa_gqa_plan",
    "SWA_COMBINE": "(cdiv(S*G, BLOCK_R), B*Hkv, 1)",
    "SWA_WRITE": "(cdiv(min(S, C), BLOCK_T), B, 1)",
    "MOE_ROUTER": "(cdiv(N, BLOCK_T), 1, 1)",
    "MOE_ALIGN": "(1, 1, 1)",
    "MOE_GEMM13": "(max_tiles, cdiv(I, BLOCK_N), 1); max_tiles = cdiv(N*k, BLOCK_M) + min(E, N*k)",
    "MOE_GEMM2": "(max_tiles, cdiv(H, BLOCK_N), 1)",
    "MOE_COMBINE": "(cdiv(N, BLOCK_T), cdiv(H, BLOCK_H), 1)",
}


@dataclass
class Spec:
    kind: str
    module: str               # mtx.kernels.triton_swa_gqa or mtx.kernels.triton_moe
    kernel: str               # function name (= cubin entry name)
    dtype: str | None         # None: dtype independent
    p0: int                   # key parameter (HEAD_DIM, BLOCK_E or BLOCK_M, by kind)
    p1: int                   # SWA_ATTN: SPLIT (1: split partials, 0: direct output); else 0
    signature: dict[str, str]
    constexprs: dict[str, int]
    num_warps: int | Callable[[int], int] = 4   # or a function of the arch
    num_stages: int = 2
    hints16: tuple[str, ...] = ()   # int arguments the C wrapper guarantees to be multiples of 16
    extra: dict = field(default_factory=dict)

    def warps(self, arch: int) -> int:
        return self.num_warps(arch) if callable(self.num_warps) else self.num_warps

    @property
    def symbol(self) -> str:
        dt = self.dtype or "any"
        tag = "_".join(f"{k.lower()}{int(v)}" for k, v in self.constexprs.items())
        return f"{self.kernel}__{dt}__{tag}"


def specs() -> list[Spec]:
    """Every specialization libmtx_kernels can launch (see plugins/README.md)."""
    out: list[Spec] = []
    i32 = "i32"
    for dt, (T, _) in DTYPES.items():
        eb = P.elem_size(dt)
        for d in HEAD_DIMS:
            out.append(Spec("SWA_ROPE", "triton_swa_gqa", "swa_gqa_rope_kernel", dt, d, 0, dict(
                q_ptr=T, k_ptr=T, q_rot_ptr=T, k_rot_ptr=T, start_pos_ptr="*i64", inv_freq_ptr="*fp32",
                S=i32, num_heads=i32, num_kv_heads=i32,
                stride_qb=i32, stride_qs=i32, stride_kb=i32, stride_ks=i32),
                dict(HEAD_DIM=d, BLOCK_T=P.ATTN_BLOCK_T), num_warps=P.ATTN_ROPE_NUM_WARPS,
                hints16=("stride_qb", "stride_qs", "stride_kb", "stride_ks")))
            # Two attention variants: BLOCK_M=16 always writes split partials (>= 1 split), the direct
            # one (BLOCK_M plan.attn_direct_block_m: 64, or 16) never splits (plan.swa_gqa_plan picks one).
            for bm, split in ((16, 1), (P.attn_direct_block_m(eb, d), 0)):
                out.append(Spec("SWA_ATTN", "triton_swa_gqa", "swa_gqa_attn_kernel", dt, d, split, dict(
                    q_rot_ptr=T, k_rot_ptr=T, v_ptr=T, k_buf_ptr=T, v_buf_ptr=T, start_pos_ptr="*i64", out_ptr=T,
                    part_acc_ptr="*fp32", part_ml_ptr="*fp32",
                    S=i32, capacity=i32, window=i32, num_kv_heads=i32, group=i32, num_splits=i32, qk_scale="fp32",
                    stride_vb=i32, stride_vs=i32, stride_cb=i32, stride_ch=i32, stride_cs=i32,
                    stride_ob=i32, stride_os=i32),
                    dict(HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=P.attn_block_n(eb), SPLIT=split),
                    num_warps=functools.partial(P.attn_num_warps, eb, d, bm), num_stages=2,
                    hints16=("stride_vb", "stride_vs", "stride_cb", "stride_ch", "stride_cs", "stride_ob",
                             "stride_os")))
            out.append(Spec("SWA_COMBINE", "triton_swa_gqa", "swa_gqa_combine_kernel", dt, d, 0, dict(
                part_acc_ptr="*fp32", part_ml_ptr="*fp32", out_ptr=T,
                S=i32, num_kv_heads=i32, group=i32, num_splits=i32, stride_ob=i32, stride_os=i32),
                dict(HEAD_DIM=d, BLOCK_R=P.ATTN_COMBINE_BLOCK_R), num_warps=P.ATTN_COMBINE_NUM_WARPS,
                hints16=("stride_ob", "stride_os")))
            out.append(Spec("SWA_WRITE", "triton_swa_gqa", "swa_gqa_write_kernel", dt, d, 0, dict(
                k_rot_ptr=T, v_ptr=T, k_buf_ptr=T, v_buf_ptr=T, start_pos_ptr="*i64",
                S=i32, capacity=i32, num_kv_heads=i32, n_write=i32,
                stride_vb=i32, stride_vs=i32, stride_cb=i32, stride_ch=i32, stride_cs=i32),
                dict(HEAD_DIM=d, BLOCK_T=P.ATTN_BLOCK_T), num_warps=P.ATTN_WRITE_NUM_WARPS,
                hints16=("stride_vb", "stride_vs", "stride_cb", "stride_ch", "stride_cs")))
        for be in P.MOE_ROUTER_BLOCK_E:
            out.append(Spec("MOE_ROUTER", "triton_moe", "moe_router_kernel", dt, be, 0, dict(
                x_ptr=T, router_ptr=T, topk_weight_ptr="*fp32", topk_ids_ptr="*i32",
                N=i32, H=i32, E=i32, top_k=i32, stride_xn=i32),
                dict(BLOCK_T=P.MOE_ROUTER_BLOCK_T, BLOCK_E=be, BLOCK_H=P.moe_router_block_h(eb),
                     BLOCK_K=P.MOE_ROUTER_BLOCK_K), num_warps=P.moe_router_num_warps(eb), hints16=("H", "stride_xn")))
        for bm in (16, 64):
            bk, stages = P.moe_block_k(eb), P.moe_num_stages(eb)
            out.append(Spec("MOE_GEMM13", "triton_moe", "moe_gemm13_kernel", dt, bm, 0, dict(
                x_ptr=T, w1_ptr=T, w3_ptr=T, act_ptr=T, sorted_pair_ptr="*i32", tile_expert_ptr="*i32",
                tile_start_ptr="*i32", tile_end_ptr="*i32", H=i32, I=i32, top_k=i32, stride_xn=i32),
                dict(BLOCK_M=bm, BLOCK_N=P.MOE_BLOCK_N, BLOCK_K=bk), num_warps=P.moe_gemm_num_warps(eb),
                num_stages=stages, hints16=("H", "I", "stride_xn")))
            out.append(Spec("MOE_GEMM2", "triton_moe", "moe_gemm2_kernel", dt, bm, 0, dict(
                act_ptr=T, w2_ptr=T, y_ptr=T, sorted_pair_ptr="*i32", topk_weight_ptr="*fp32",
                tile_expert_ptr="*i32", tile_start_ptr="*i32", tile_end_ptr="*i32", H=i32, I=i32),
                dict(BLOCK_M=bm, BLOCK_N=P.MOE_BLOCK_N, BLOCK_K=bk), num_warps=P.moe_gemm_num_warps(eb),
                num_stages=stages, hints16=("H", "I")))
        out.append(Spec("MOE_COMBINE", "triton_moe", "moe_combine_kernel", dt, 0, 0, dict(
            y_ptr=T, topk_ids_ptr="*i32", out_ptr=T, N=i32, H=i32, E=i32, top_k=i32, stride_on=i32),
            dict(BLOCK_T=P.MOE_COMBINE_BLOCK_T, BLOCK_H=P.MOE_COMBINE_BLOCK_H), num_warps=P.MOE_COMBINE_NUM_WARPS,
            hints16=("H", "stride_on")))
    for be in P.MOE_ROUTER_BLOCK_E:
        out.append(Spec("MOE_ALIGN", "triton_moe", "moe_align_kernel", None, be, 0, dict(
            topk_ids_ptr="*i32", sorted_pair_ptr="*i32", tile_expert_ptr="*i32", tile_start_ptr="*i32",
            tile_end_ptr="*i32", num_pairs=i32, E=i32, max_tiles=i32, tile_m=i32),
            dict(BLOCK_P=P.moe_align_block_p(be), BLOCK_E=be), num_warps=P.MOE_ALIGN_NUM_WARPS))
    return out


def cuobjdump() -> Path:
    """The cuobjdump bundled with triton (next to its ptxas), else the CUDA toolkit's."""
    import shutil

    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if bundled.is_file():
        return bundled
    found = shutil.which("cuobjdump") or "/usr/local/cuda/bin/cuobjdump"
    if not Path(found).is_file():
        raise SystemExit("cuobjdump not found (needed to check the cubins for spills)")
    return Path(found)


def resource_usage(cubin: Path) -> dict[str, int]:
    """``cuobjdump --dump-resource-usage`` of a one-kernel cubin: REG, STACK, SHARED, LOCAL, ..."""
    import re
    import subprocess

    out = subprocess.run([str(cuobjdump()), "--dump-resource-usage", str(cubin)], capture_output=True, text=True,
                         check=True).stdout
    line = next((ln for ln in out.splitlines() if "REG:" in ln), "")
    return {k: int(v) for k, v in re.findall(r"\b([A-Z]+):(\d+)", line)}


def _ptxas_release(arch: int) -> str:
    """The release line of the ptxas Triton assembles sm_<arch> with (TRITON_PTXAS_PATH / _BLACKWELL_PATH)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas_version

        lines = get_ptxas_version(arch).strip().splitlines()
        return next((ln for ln in lines if "release" in ln), lines[-1]).strip()
    except Exception as e:  # noqa: BLE001  (internal triton API: report, do not fail the build)
        return f"unknown ({e})"


def compile_one(spec: Spec, arch: int, out_dir: str) -> dict:
    """triton.compile one specialization for sm_<arch>; returns its manifest entry."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget

    mod = importlib.import_module(f"mtx.kernels.{spec.module}")
    fn = getattr(mod, spec.kernel)
    names = list(fn.arg_names)
    sig = {}
    for n in names:
        if n in spec.constexprs:
            sig[n] = "constexpr"
        elif n in spec.signature:
            sig[n] = spec.signature[n]
        else:
            raise SystemExit(f"{spec.kernel}: argument {n} missing from the AOT signature")
    extra = set(spec.signature) - set(names)
    if extra:
        raise SystemExit(f"{spec.kernel}: AOT signature names unknown arguments {sorted(extra)}")
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if sig[n].startswith("*") or n in spec.hints16}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=dict(spec.constexprs), attrs=attrs)
    t0 = time.time()
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                        options={"num_warps": spec.warps(arch), "num_stages": spec.num_stages, "enable_fp_fusion": True})
    md = ck.metadata
    if getattr(md, "global_scratch_size", 0) or getattr(md, "profile_scratch_size", 0):
        raise SystemExit(f"{spec.symbol} sm_{arch}: needs global/profile scratch, which libmtx_kernels does not provide")
    if md.shared > ARCH_SMEM_LIMIT[arch]:
        raise SystemExit(f"{spec.symbol} sm_{arch}: {md.shared} bytes of shared memory exceeds the sm_{arch} limit")
    cubin = ck.asm["cubin"]
    path = Path(out_dir) / "cubins" / f"{spec.symbol}.sm{arch}.cubin"
    path.write_bytes(cubin)
    usage = resource_usage(path)
    if usage.get("STACK", 0) or usage.get("LOCAL", 0):
        raise SystemExit(f"{spec.symbol} sm_{arch}: spills to local memory ({usage.get('STACK', 0)} bytes of stack, "
                         f"{usage.get('REG')} registers, {spec.warps(arch)} warps): change its tiles or warps in "
                         "mtx/kernels/plan.py")
    params = [{"name": n, "type": sig[n]} for n in names if sig[n] != "constexpr"]
    return {
        "symbol": spec.symbol, "kind": spec.kind, "kernel": md.name, "arch": arch, "target": md.arch,
        "dtype": spec.dtype, "p0": spec.p0, "p1": spec.p1, "constexprs": spec.constexprs,
        "num_warps": md.num_warps, "num_stages": spec.num_stages, "shared": md.shared,
        "registers": usage.get("REG"), "stack": usage.get("STACK", 0),
        "params": params + [{"name": "global_scratch", "type": "*i8"}, {"name": "profile_scratch", "type": "*i8"}],
        "divisible_by_16": [n for n in names if sig[n].startswith("*") or n in spec.hints16],
        "grid": GRIDS[spec.kind], "cubin": str(path), "cubin_bytes": len(cubin),
        "sha256": hashlib.sha256(cubin).hexdigest(), "compile_s": round(time.time() - t0, 2),
        "triton_version": triton.__version__, "ptxas": _ptxas_release(arch),
    }


def write_outputs(entries: list[dict], out: Path) -> None:
    archs = sorted({e["arch"] for e in entries})
    triton_version = entries[0]["triton_version"]
    entries = sorted(entries, key=lambda e: (KINDS.index(e["kind"]), e["dtype"] or "", e["p0"], e["p1"], e["arch"]))
    (out / "mtx_kernels_manifest.json").write_text(json.dumps({"kernels": entries}, indent=1))
    asm = ["/* generated by plugins/aot/compile_kernels.py: the Triton cubins, embedded */",
           '\t.section .rodata.mtx_cubins, "a"']
    table = ['/* generated by plugins/aot/compile_kernels.py */', '#include "mtx_kernels_internal.h"', ""]
    for i, e in enumerate(entries):
        asm += ["\t.balign 64", f"\t.globl mtx_cubin_{i}", f"\t.hidden mtx_cubin_{i}",
                f"\t.globl mtx_cubin_{i}_end", f"\t.hidden mtx_cubin_{i}_end",
                f"mtx_cubin_{i}:", f'\t.incbin "{e["cubin"]}"', f"mtx_cubin_{i}_end:"]
        table.append(f"extern const unsigned char mtx_cubin_{i}[], mtx_cubin_{i}_end[];")
    asm.append('\t.section .note.GNU-stack,"",@progbits')
    table += ["", "const mtx_kernel_spec mtx_kernel_specs[] = {"]
    for i, e in enumerate(entries):
        dt = DTYPES[e["dtype"]][1] if e["dtype"] else -1
        table.append(f'  {{MTX_K_{e["kind"]}, {dt}, {e["p0"]}, {e["p1"]}, {e["arch"]}, "{e["kernel"]}", '
                     f'{e["num_warps"]}, {e["shared"]}, {len(e["params"])}, mtx_cubin_{i}, mtx_cubin_{i}_end}},'
                     f'  /* {e["symbol"]} */')
    table += ["};", f"const int mtx_kernel_spec_count = {len(entries)};", ""]
    (out / "mtx_kernels_cubins.S").write_text("\n".join(asm) + "\n")
    (out / "mtx_kernels_table.c").write_text("\n".join(table))
    cfg = {
        "MTX_ALIGN": P.ALIGN, "MTX_ATTN_TARGET_CTAS": P.ATTN_TARGET_CTAS, "MTX_ATTN_MAX_SPLITS": P.ATTN_MAX_SPLITS,
        "MTX_ATTN_MIN_KEYS_PER_SPLIT": P.ATTN_MIN_KEYS_PER_SPLIT, "MTX_ATTN_BLOCK_T": P.ATTN_BLOCK_T,
        "MTX_ATTN_COMBINE_BLOCK_R": P.ATTN_COMBINE_BLOCK_R, "MTX_MOE_TOKENS_PER_PASS": P.MOE_TOKENS_PER_PASS,
        "MTX_MOE_ROUTER_BLOCK_K": P.MOE_ROUTER_BLOCK_K, "MTX_MOE_ROUTER_BLOCK_T": P.MOE_ROUTER_BLOCK_T,
        "MTX_MOE_COMBINE_BLOCK_H": P.MOE_COMBINE_BLOCK_H, "MTX_MOE_COMBINE_BLOCK_T": P.MOE_COMBINE_BLOCK_T,
        "MTX_MOE_BLOCK_N": P.MOE_BLOCK_N,
    }
    lines = ["/* generated by plugins/aot/compile_kernels.py from mtx/kernels/plan.py */",
             "#ifndef MTX_KERNELS_CONFIG_H", "#define MTX_KERNELS_CONFIG_H"]
    lines += [f"#define {k} {v}" for k, v in cfg.items()]
    lines += ["#define MTX_MOE_ROUTER_BLOCK_E_LIST {" + ", ".join(map(str, P.MOE_ROUTER_BLOCK_E)) + "}",
              f"#define MTX_MOE_ROUTER_BLOCK_E_COUNT {len(P.MOE_ROUTER_BLOCK_E)}",
              "#define MTX_HEAD_DIM_LIST {" + ", ".join(map(str, HEAD_DIMS)) + "}",
              "/* plan.attn_direct_block_m(elem_bytes, head_dim) */",
              "#define MTX_ATTN_DIRECT_BLOCK_M(eb, d) (" + " : ".join(
                  f"(eb) == {eb} && (d) == {d} ? {P.attn_direct_block_m(eb, d)}" for eb in (4, 2) for d in HEAD_DIMS)
              + " : 0)",
              "#define MTX_ARCH_LIST {" + ", ".join(str(a) for a in archs) + "}",
              '#define MTX_ARCH_NAMES "' + ", ".join(f"sm_{a}" for a in archs) + '"',
              f'#define MTX_TRITON_VERSION_STRING "triton {triton_version}; ' + " ".join(f"sm_{a}" for a in archs) + '"',
              "#endif", ""]
    (out / "mtx_kernels_config.h").write_text("\n".join(lines))


def main() -> None:
    # The interpreter must be off (we need compiled JIT functions), before triton is imported here or
    # in the worker processes.
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    # No line info in the shipped cubins (it was 65% of their bytes); set before triton is imported.
    os.environ["TRITON_DISABLE_LINE_INFO"] = "1"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--archs", default="80;89;90", help="semicolon or comma separated SM numbers")
    ap.add_argument("--jobs", type=int, default=0, help="parallel compile processes (0: CPU count)")
    ap.add_argument("--list", action="store_true", help="print the specializations and exit")
    args = ap.parse_args()
    archs = [int(a) for a in args.archs.replace(",", ";").split(";") if a.strip()]
    for a in archs:
        if a not in ARCH_SMEM_LIMIT:
            raise SystemExit(f"unsupported arch sm_{a}; supported: {sorted(ARCH_SMEM_LIMIT)}")
    todo = [(s, a) for s in specs() for a in archs]
    if args.list:
        for s, a in todo:
            print(f"sm_{a} {s.symbol}")
        return
    (args.out / "cubins").mkdir(parents=True, exist_ok=True)
    jobs = args.jobs or os.cpu_count() or 1
    t0 = time.time()
    print(f"mtx AOT: {len(todo)} cubins ({len(todo) // len(archs)} specializations x sm_{', sm_'.join(map(str, archs))}),"
          f" {jobs} job(s)", flush=True)
    entries: list[dict] = []
    errors: list[str] = []
    if jobs == 1:
        for s, a in todo:
            try:
                entries.append(compile_one(s, a, str(args.out)))
            except SystemExit as e:
                errors.append(str(e))
    else:
        with cf.ProcessPoolExecutor(max_workers=jobs) as ex:
            futs = [ex.submit(compile_one, s, a, str(args.out)) for s, a in todo]
            for f in cf.as_completed(futs):
                try:
                    entries.append(f.result())
                except SystemExit as e:
                    errors.append(str(e))
    if errors:
        raise SystemExit("mtx AOT: " + str(len(errors)) + " cubin(s) rejected:\n  " + "\n  ".join(sorted(errors)))
    write_outputs(entries, args.out)
    total = sum(e["cubin_bytes"] for e in entries)
    print(f"mtx AOT: done in {time.time() - t0:.1f}s, {total / 1e6:.1f} MB of cubins", flush=True)


if __name__ == "__main__":
    main()
