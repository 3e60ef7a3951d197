"""plugins/ builds on a CPU-only machine: Triton cubins for sm_80/89/90 and libmtx_kernels.so with
exactly the C ABI of plugins/include/mtx_kernels.h; its launch rules (workspace sizes) agree with
mtx/kernels/plan.py; argument errors come back as status codes.

The CMake build runs once per session into a temporary folder (fixture ``plugins_build_dir`` in
conftest.py; triton.compile results are cached in Triton's own cache, so a second run is quick). With
TensorRT headers (TensorRT_ROOT, or build/trt-headers from scripts/get_trt_headers.sh) it also builds
libmtx_trt_plugins.so and mtx_trt_plugin_check, which loads the plugin library with dlopen and no
TensorRT: its report is checked against what the exporter writes and against mtx/kernels/plan.py.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mtx.kernels import plan as P

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "plugins"
C_ABI = {"mtx_kernels_version", "mtx_last_error", "mtx_check_device", "mtx_load_kernels", "mtx_swa_gqa_workspace_size",
         "mtx_swa_gqa_forward", "mtx_moe_workspace_size", "mtx_moe_forward"}
TRT_ENTRY_POINTS = {"getCreators", "setLoggerFinder"}
ARCHS = (80, 89, 90)
DTYPE = {"float32": 0, "float16": 1, "bfloat16": 2}
MTX_SUCCESS, MTX_ERROR_INVALID_ARGUMENT, MTX_ERROR_UNSUPPORTED, MTX_ERROR_NO_KERNEL_IMAGE, MTX_ERROR_WORKSPACE, \
    MTX_ERROR_CUDA, MTX_ERROR_DRIVER = range(7)


def _defined_dynamic_symbols(lib: Path) -> set[str]:
    out = subprocess.run(["nm", "-D", "--defined-only", str(lib)], check=True, capture_output=True, text=True).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


@pytest.fixture(scope="session")
def lib(plugins_build_dir) -> ctypes.CDLL:
    so = ctypes.CDLL(str(plugins_build_dir / "libmtx_kernels.so"))
    so.mtx_kernels_version.restype = ctypes.c_char_p
    so.mtx_last_error.restype = ctypes.c_char_p
    so.mtx_swa_gqa_workspace_size.restype = ctypes.c_size_t
    so.mtx_swa_gqa_workspace_size.argtypes = [ctypes.c_int] * 7 + [ctypes.c_int]
    so.mtx_moe_workspace_size.restype = ctypes.c_size_t
    so.mtx_moe_workspace_size.argtypes = [ctypes.c_int64] + [ctypes.c_int] * 4 + [ctypes.c_int]
    so.mtx_swa_gqa_forward.restype = ctypes.c_int
    so.mtx_moe_forward.restype = ctypes.c_int
    return so


def test_exports_exactly_the_c_abi(plugins_build_dir):
    assert _defined_dynamic_symbols(plugins_build_dir / "libmtx_kernels.so") == C_ABI
    header = (PLUGINS / "include" / "mtx_kernels.h").read_text()
    declared = set(re.findall(r"MTX_API\s+[\w\s\*]+?\b(mtx_\w+)\s*\(", header))
    assert declared == C_ABI, "header and exported symbols disagree"


def test_library_needs_no_cuda_shared_runtime(plugins_build_dir):
    needed = subprocess.run(["readelf", "-d", str(plugins_build_dir / "libmtx_kernels.so")], check=True,
                            capture_output=True, text=True).stdout
    assert "libcudart" not in needed and "libcuda.so" not in needed


def test_cubins_for_every_arch_and_specialization(plugins_build_dir):
    """Every specialization is compiled for sm_80, sm_89 and sm_90 and the cubin really is for that arch."""
    sys.path.insert(0, str(PLUGINS / "aot"))
    try:
        import compile_kernels
    finally:
        sys.path.pop(0)
    manifest = json.loads((plugins_build_dir / "generated" / "mtx_kernels_manifest.json").read_text())["kernels"]
    want = {(s.symbol, a) for s in compile_kernels.specs() for a in ARCHS}
    assert {(e["symbol"], e["arch"]) for e in manifest} == want
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"  # bundled with triton
    for e in manifest:
        blob = Path(e["cubin"]).read_bytes()
        assert blob[:4] == b"\x7fELF" and int.from_bytes(blob[18:20], "little") == 190, e["symbol"]  # EM_CUDA
        assert e["num_warps"] >= 1 and e["shared"] >= 0 and e["grid"]
    sample = [e for e in manifest if e["kind"] == "SWA_ATTN" and e["dtype"] == "bfloat16" and e["p0"] == 128]
    for e in sample:
        head = subprocess.run([str(cuobjdump), "-elf", e["cubin"]], capture_output=True, text=True).stdout
        assert re.search(rf"sm={e['arch']}a?\b", head), (e["symbol"], e["arch"], head[:200])


def test_version_names_triton_and_archs(lib):
    v = lib.mtx_kernels_version().decode()
    assert v.startswith("0.1.0") and "triton" in v and all(f"sm_{a}" in v for a in ARCHS), v
    assert re.search(r"; CUDA 1[2-9]\.\d+\)$", v), v


@pytest.mark.parametrize("dtype", list(DTYPE))
def test_workspace_sizes_match_plan(lib, dtype):
    eb = P.elem_size(dtype)
    for b, s, hq, hkv, d, cap, win in [(1, 1, 32, 8, 128, 4096, 4096), (4, 1, 32, 8, 128, 4096, 0),
                                       (1, 512, 32, 8, 128, 4096, 4096), (8, 33, 16, 2, 64, 64, 16),
                                       (64, 1, 48, 8, 128, 8192, 0), (2, 4096, 32, 8, 128, 8192, 8192)]:
        w = win or cap
        assert lib.mtx_swa_gqa_workspace_size(b, s, hq, hkv, d, cap, win, DTYPE[dtype]) == \
            P.swa_gqa_workspace_bytes(b, s, hq, hkv, d, w, eb), (b, s, hq, hkv, d)
    for n, h, i, e, k in [(1, 4096, 14336, 8, 2), (300, 4096, 14336, 8, 2), (9000, 2048, 1408, 64, 6),
                          (17, 64, 32, 256, 8)]:
        assert lib.mtx_moe_workspace_size(n, h, i, e, k, DTYPE[dtype]) == \
            P.moe_workspace_bytes(n, h, i, e, k, eb), (n, h, i, e, k)


def _swa(lib, head_dim=128, window=4096, capacity=4096, ws=1 << 30, ptr=256, heads=(32, 8)):
    p = ctypes.c_void_p
    return lib.mtx_swa_gqa_forward(*([p(ptr)] * 8), 1, 1, heads[0], heads[1], head_dim, capacity, window,
                                   ctypes.c_float(0.088), 1, p(ptr), ctypes.c_size_t(ws), p(0))


def test_argument_errors_are_status_codes(lib):
    assert _swa(lib, head_dim=96) == MTX_ERROR_UNSUPPORTED and b"head_dim 96" in lib.mtx_last_error()
    assert _swa(lib, window=5000) == MTX_ERROR_INVALID_ARGUMENT and b"window" in lib.mtx_last_error()
    assert _swa(lib, heads=(30, 8)) == MTX_ERROR_INVALID_ARGUMENT
    assert _swa(lib, ptr=260) == MTX_ERROR_INVALID_ARGUMENT and b"aligned" in lib.mtx_last_error()
    assert _swa(lib, ws=100) == MTX_ERROR_WORKSPACE
    p = ctypes.c_void_p
    rc = lib.mtx_moe_forward(*([p(256)] * 6), ctypes.c_int64(4), 4096, 14336, 8, 9, 1, p(256),
                             ctypes.c_size_t(1 << 30), p(0))
    assert rc == MTX_ERROR_INVALID_ARGUMENT and b"top_k" in lib.mtx_last_error()
    rc = lib.mtx_moe_forward(*([p(256)] * 6), ctypes.c_int64(4), 4100, 14336, 8, 2, 1, p(256),
                             ctypes.c_size_t(1 << 30), p(0))
    assert rc == MTX_ERROR_UNSUPPORTED and b"multiples of 16" in lib.mtx_last_error()


def test_valid_call_without_gpu_reports_cuda_error(lib):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: tests/test_gpu_kernels.py runs the library for real")
    assert _swa(lib) == MTX_ERROR_CUDA
    assert b"driver" in lib.mtx_last_error().lower()


def test_device_check_without_gpu_says_what_is_supported(lib):
    """mtx_check_device / mtx_load_kernels refuse with the supported GPUs and driver, not a bare CUDA error."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: tests/test_gpu_kernels.py checks the device for real")
    for fn in (lib.mtx_check_device, lib.mtx_load_kernels):
        assert fn(-1) == MTX_ERROR_CUDA
        msg = lib.mtx_last_error().decode()
        assert "no NVIDIA driver" in msg and "8.0" in msg and "9.0" in msg and "sm_90" in msg and "R580" in msg, msg


def test_cubins_do_not_spill_and_carry_no_line_info(plugins_build_dir):
    """compile_kernels.py rejects any cubin with a stack frame; the manifest records 0 for all, and the
    cubins hold no line table (.nv_debug_line_sass / .debug_line)."""
    manifest = json.loads((plugins_build_dir / "generated" / "mtx_kernels_manifest.json").read_text())["kernels"]
    assert all(e["stack"] == 0 for e in manifest), [e["symbol"] for e in manifest if e["stack"]]
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    for e in manifest[:: max(1, len(manifest) // 12)]:  # an independent re-read of a sample
        usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", e["cubin"]], capture_output=True,
                               text=True, check=True).stdout
        assert re.search(r"STACK:0\b", usage), (e["symbol"], usage)
        assert b".debug_line" not in Path(e["cubin"]).read_bytes(), e["symbol"]


def _trt_plugins(plugins_build_dir) -> Path:
    so = plugins_build_dir / "tensorrt" / "libmtx_trt_plugins.so"
    if not so.is_file():
        pytest.skip("no TensorRT headers (TensorRT_ROOT unset and scripts/get_trt_headers.sh could not fetch them): "
                    "would build libmtx_trt_plugins.so and check its creators, fields, aliasing, formats, "
                    "serialization and workspace sizes with mtx_trt_plugin_check")
    return so


def test_tensorrt_plugin_library(plugins_build_dir):
    so = _trt_plugins(plugins_build_dir)
    assert _defined_dynamic_symbols(so) == TRT_ENTRY_POINTS
    needed = subprocess.run(["readelf", "-d", str(so)], check=True, capture_output=True, text=True).stdout
    assert "libnvinfer" not in needed and "libcudart" not in needed


def _exported_mtx_nodes(parity_export) -> dict[str, dict]:
    """op type -> {attribute name: (ONNX attribute type, value)} of the first node of each mtx op in a
    tensorrt-target export of the tiny Mixtral (both ops)."""
    import onnx

    from mtx import names

    model = onnx.load(str(parity_export("mixtral4", "tensorrt") / "model.onnx"), load_external_data=False)
    out: dict[str, dict] = {}
    for n in model.graph.node:
        if n.domain == names.DOMAIN and n.op_type not in out:
            out[n.op_type] = {a.name: (onnx.AttributeProto.AttributeType.Name(a.type),
                                       onnx.helper.get_attribute_value(a)) for a in n.attribute}
    return out


def _run_check(plugins_build_dir, cases: list[str]) -> list[dict]:
    exe = plugins_build_dir / "tensorrt" / "mtx_trt_plugin_check"
    r = subprocess.run([str(exe), str(_trt_plugins(plugins_build_dir))], input="\n".join(cases) + "\n",
                       capture_output=True, text=True, timeout=60, env={k: v for k, v in os.environ.items()
                                                                      if k != "LD_PRELOAD"})
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def test_trt_plugins_match_the_exporter_and_plan(plugins_build_dir, parity_export):
    """dlopen libmtx_trt_plugins.so without TensorRT: creators registered under the op types, namespace
    and version the exporter writes on its nodes, with fields for exactly the attributes it writes;
    present_* aliased to past_*; formats for every dtype the exporter emits; serialize -> deserialize
    keeps every field; workspace sizes equal mtx/kernels/plan.py; configurePlugin refuses without a GPU,
    saying what is supported."""
    _trt_plugins(plugins_build_dir)
    from mtx import tensorrt as mtrt
    from mtx.names import DTYPES as EXPORT_DTYPES

    nodes = _exported_mtx_nodes(parity_export)
    hq, hkv, d, cap, win, batch, seq = 32, 8, 128, 4096, 4096, 8, 512
    tokens, h, inter, e, k = 4096, 4096, 14336, 8, 2
    lines = _run_check(plugins_build_dir, [f"swa {hq} {hkv} {win} {d ** -0.5} {batch} {seq} {cap} {d}",
                                           f"moe {k} {tokens} {h} {inter} {e}",
                                           "bad swa num_heads=30 num_kv_heads=8", "bad moe"])
    creators = {c["name"]: c for c in lines[0]["creators"]}
    assert set(creators) == set(nodes) == set(mtrt.PLUGIN_NAMES)
    onnx_type = {"int32": "INT", "float32": "FLOAT"}
    for op, attrs in nodes.items():
        c = creators[op]
        assert c["interface"] == "PLUGIN CREATOR_V3ONE 1.0"
        assert (c["namespace"], c["version"]) == (attrs["plugin_namespace"][1].decode(),
                                                  attrs["plugin_version"][1].decode())
        plugin_attrs = {a: t for a, (t, _) in attrs.items() if not a.startswith("plugin_")}
        assert {f["name"]: onnx_type[f["type"]] for f in c["fields"]} == plugin_attrs, op
    swa, moe = lines[1], lines[2]
    for rep, n_out in ((swa, 3), (moe, 1)):
        assert rep["created"] and rep["nb_outputs"] == n_out
        assert rep["core"] == "PLUGIN_V3ONE_CORE 1.0" and rep["runtime"] == "PLUGIN_V3ONE_RUNTIME 1.0"
        assert rep["serialized"] == rep["deserialized"] == rep["clone_fields"]
        for dt in EXPORT_DTYPES:  # every model dtype the exporter emits
            assert all(rep["formats"][dt]), (rep["case"], dt)
            assert rep["output_types"][dt] == [dt] * n_out
        for bad in ("int8", "int32"):
            assert rep["formats"][bad][0] is False
        assert rep["configure"] == -1 and any("no NVIDIA driver" in m and "R580" in m for m in rep["configure_log"])
    assert swa["build"] == "PLUGIN_V3ONE_BUILD 2.0" and swa["aliased"] == [-1, 3, 4]  # present_* -> past_*
    assert swa["formats"]["start_pos_int32"][5] is False and swa["formats"]["inv_freq_half"][6] is False
    assert swa["formats"]["past_key_other_type"][3] is False and moe["formats"]["w1_other_type"][2] is False
    assert {f["name"]: f["value"] for f in swa["serialized"]} == pytest.approx(
        {"num_heads": hq, "num_kv_heads": hkv, "window": win, "scale": d ** -0.5})
    assert swa["configure_head_dim_96"] == -1 and "head size 96" in swa["configure_head_dim_96_log"][0]
    for dt in ("float32", "float16", "bfloat16"):
        eb = P.elem_size(dt)
        assert swa["workspace"][dt] == P.swa_gqa_workspace_bytes(batch, seq, hq, hkv, d, win, eb)
        assert moe["workspace"][dt] == P.moe_workspace_bytes(tokens, h, inter, e, k, eb)
    assert [ln["created"] for ln in lines[3:]] == [False, False]
    assert "num_heads" in lines[3]["log"][0] and "top_k" in lines[4]["log"][0]


def test_c_launches_pass_every_kernel_parameter(plugins_build_dir):
    """Each launch in mtx_kernels.c passes as many arguments as its cubin's entry point takes, pointers
    where the kernel has pointers (checked statically: the launches only run on a GPU)."""
    src = (PLUGINS / "src" / "mtx_kernels.c").read_text()
    manifest = json.loads((plugins_build_dir / "generated" / "mtx_kernels_manifest.json").read_text())["kernels"]
    params = {e["kind"]: e["params"] for e in manifest}
    launches = re.findall(r"void \*args\[\] = \{(.*?)\};\s*CHECK\(launch\(&ctx, MTX_K_(\w+),", src, re.S)
    assert {kind for _, kind in launches} == set(params)
    pointer_vars = {"query", "key", "value", "k_buf", "v_buf", "start_pos", "inv_freq", "output", "q_rot", "k_rot",
                    "part_acc", "part_ml", "null_ptr", "xs", "os", "router_weight", "w1", "w3", "w2"}
    for body, kind in launches:
        args = [a.strip().lstrip("&") for a in body.replace("\n", " ").split(",") if a.strip()]
        assert len(args) == len(params[kind]), (kind, args, [p["name"] for p in params[kind]])
        for a, p in zip(args, params[kind]):
            is_ptr = a in pointer_vars or a.startswith("reg[")
            assert is_ptr == p["type"].startswith("*"), (kind, a, p)


@pytest.fixture(scope="module")
def cuda12_build_dir(tmp_path_factory) -> Path:
    """The CUDA 12 flavour (MTX_CUDA_ROOT=build/cuda12 from scripts/get_cuda12.sh), sm_90 only to keep
    the build short: same sources, CUDA 12.9 headers, static runtime and ptxas."""
    import shutil

    root = ROOT / "build" / "cuda12"
    if not (root / "bin" / "ptxas").is_file() or shutil.which("cmake") is None:
        pytest.skip("build/cuda12 missing (scripts/get_cuda12.sh could not fetch nvidia-cuda-runtime-cu12 and "
                    "nvidia-cuda-nvcc-cu12) or no cmake: would build the CUDA 12 flavour of libmtx_kernels.so")
    pytest.importorskip("triton", reason="triton not installed: would compile the kernels to cubins")
    out = tmp_path_factory.mktemp("plugins_cu12")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for step in (["cmake", "-S", str(PLUGINS), "-B", str(out), f"-DPython3_EXECUTABLE={sys.executable}",
                  f"-DMTX_CUDA_ROOT={root}", "-DMTX_CUDA_ARCHS=90"],
                 ["cmake", "--build", str(out), "-j", str(os.cpu_count() or 2), "--target", "mtx_kernels"]):
        r = subprocess.run(step, env=env, capture_output=True, text=True)
        assert r.returncode == 0, f"{' '.join(step)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return out


def test_cuda12_flavour(cuda12_build_dir):
    """Built with CUDA 12.9 (runtime and ptxas from PyPI): same ABI, no shared CUDA runtime, cubins for
    sm_90a assembled by ptxas 12.9 without spills, and it asks for a CUDA 12 driver (R525+)."""
    so_path = cuda12_build_dir / "libmtx_kernels.so"
    assert _defined_dynamic_symbols(so_path) == C_ABI
    needed = subprocess.run(["readelf", "-d", str(so_path)], check=True, capture_output=True, text=True).stdout
    assert "libcudart" not in needed
    manifest = json.loads((cuda12_build_dir / "generated" / "mtx_kernels_manifest.json").read_text())["kernels"]
    assert {e["arch"] for e in manifest} == {90} and all(e["stack"] == 0 for e in manifest)
    assert all("release 12.9" in e["ptxas"] for e in manifest), {e["ptxas"] for e in manifest}
    so = ctypes.CDLL(str(so_path))
    so.mtx_kernels_version.restype = ctypes.c_char_p
    so.mtx_last_error.restype = ctypes.c_char_p
    assert so.mtx_kernels_version().decode().endswith("CUDA 12.9)")
    import torch

    if not torch.cuda.is_available():
        assert so.mtx_check_device(-1) == MTX_ERROR_CUDA
        assert "CUDA >= 12.0 (R525 or newer)" in so.mtx_last_error().decode()
