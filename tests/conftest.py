"""Shared fixtures: tiny random checkpoints written by transformers into temp dirs, exports of them,
and :func:`run_mtx` (``python -m mtx`` in a subprocess)."""

from __future__ import annotations

import os
import sys

# The Triton kernel tests (test_kernels_triton.py) run the kernels in Triton's CPU interpreter on hosts
# without a CUDA GPU. The interpreter must be chosen before triton is first imported, so it is set
# here; on GPU hosts it stays off and the same tests run the compiled kernels on the GPU. (Nothing
# else in the suite uses triton in-process; the AOT build runs in a subprocess that unsets it.)
if "TRITON_INTERPRET" not in os.environ and "triton" not in sys.modules:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import shutil
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

from mtx import synthetic_checkpoints as make_checkpoint  # noqa: E402

torch.set_num_threads(2)

#: name -> make_hf keyword arguments. Window 8 with prompts of 3-5x the window.
VARIANTS: dict[str, dict] = {
    "mistral": dict(arch="mistral", window=8),
    "mistral_full": dict(arch="mistral", window=None),
    "mixtral4": dict(arch="mixtral", window=8, experts=4, top_k=2),
    "mixtral8": dict(arch="mixtral", window=8, experts=8, top_k=2),
    "head_dim": dict(arch="mistral", window=8, head_dim=32),
    "tied": dict(arch="mistral", window=8, tie=True),
    "theta_top_level": dict(arch="mistral", window=8, rope_theta_top_level=True, theta=50000.0),
    "sharded": dict(arch="mixtral", window=8, max_shard_size="40KB"),
    # Ministral-8B's pattern (one full-attention layer, then three sliding ones), per-layer windows
    "ministral": dict(arch="ministral", window=8, layers=4,
                      layer_types=["full_attention", "sliding_attention", "sliding_attention", "sliding_attention"]),
}


@pytest.fixture(scope="session")
def ckpt_factory(tmp_path_factory):
    """ckpt_factory(name) -> folder of the tiny HF checkpoint ``name`` (made once per session)."""
    cache: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in cache:
            kw = dict(VARIANTS[name])
            arch = kw.pop("arch")
            cache[name] = make_checkpoint.make_hf(tmp_path_factory.mktemp(name), arch, **kw)
        return cache[name]

    return make


@pytest.fixture(scope="session")
def mistral_layout_factory(ckpt_factory, tmp_path_factory):
    """The same weights as ckpt_factory(name), rewritten in the mistral-inference layout."""
    cache: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in cache:
            cache[name] = make_checkpoint.to_mistral_layout(ckpt_factory(name),
                                                            tmp_path_factory.mktemp(name + "_mistral"))
        return cache[name]

    return make


@pytest.fixture(scope="session")
def cpp_build() -> Path:
    """build/cpp (cpp/ configured once, built incrementally with -j2), with scripts/setup_cpp.sh's dependencies.

    Its driver build/cpp/mtx_cpp_check serves tests/test_cpp.py and tests/test_manifest.py.
    """
    build = ROOT / "build" / "cpp"
    run = lambda cmd: subprocess.run(cmd, capture_output=True, text=True)  # noqa: E731
    r = run([str(ROOT / "scripts" / "setup_cpp.sh")])
    assert r.returncode == 0, f"scripts/setup_cpp.sh failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    steps = []
    if not (build / "CMakeCache.txt").is_file():
        steps.append(["cmake", "-S", str(ROOT / "cpp"), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                      f"-DMTX_PYTHON={sys.executable}"])
    steps.append(["cmake", "--build", str(build), "-j2"])
    for step in steps:
        r = run(step)
        assert r.returncode == 0, f"{' '.join(step)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return build


@pytest.fixture(scope="session")
def parity_export(ckpt_factory, tmp_path_factory):
    """parity_export(variant, target, checkpoint=None, **ExportOptions) -> export folder, made once per session.

    Full-attention variants get a capacity of 64 (the whole parity run must fit, docs/ops.md §1 rule 8).
    """
    from mtx.exporter.core import export
    from mtx.exporter.options import ExportOptions

    cache: dict[tuple, Path] = {}

    def make(variant: str, target: str, checkpoint: Path | None = None, **options) -> Path:
        key = (variant, target, str(checkpoint), tuple(sorted(options.items())))
        if key not in cache:
            if variant.endswith("full"):
                options.setdefault("cache_capacity", 64)
            out = tmp_path_factory.mktemp("parity") / f"{variant}-{target}"
            export(checkpoint or ckpt_factory(variant), out, ExportOptions(target=target, **options))
            cache[key] = out
        return cache[key]

    return make


def mtx_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a ``python -m mtx`` subprocess: os.environ with this checkout first on
    PYTHONPATH, then ``extra``."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **(extra or {})}


def mtx_command(*args: object) -> list[str | bytes]:
    """``python -m mtx ARGS`` with this interpreter; arguments as str (bytes pass as they are, e.g. non-UTF-8)."""
    return [sys.executable, "-m", "mtx", *(a if isinstance(a, bytes) else str(a) for a in args)]


def _run_mtx(*args: object, timeout: float = 600, cwd: str | os.PathLike | None = None,
             env: Mapping[str, str] | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m mtx ARGS`` to completion; stdout/stderr captured as text.

    ``env``: variables set on top of :func:`mtx_env`; ``input``: text written to stdin.
    """
    return subprocess.run(mtx_command(*args), capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=mtx_env(env), input=input)


@pytest.fixture(scope="session")
def run_mtx() -> Callable[..., subprocess.CompletedProcess]:
    """run_mtx(*args, timeout=600, cwd=None, env=None, input=None) -> the CompletedProcess of
    ``python -m mtx ARGS`` (text output captured, this checkout first on PYTHONPATH; see :func:`_run_mtx`)."""
    return _run_mtx


def hf_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    """Oracle: transformers eager, one full forward over the whole sequence (no cache), float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def _cuda_toolkit_root() -> Path | None:
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if cand and (Path(cand) / "include" / "cuda_runtime_api.h").is_file():
            return Path(cand)
    nvcc = shutil.which("nvcc")
    if nvcc and (Path(nvcc).resolve().parents[1] / "include" / "cuda_runtime_api.h").is_file():
        return Path(nvcc).resolve().parents[1]
    return None


def tensorrt_root() -> Path | None:
    """TensorRT SDK or headers for the plugin build: $TensorRT_ROOT, else build/trt-headers (fetched by
    scripts/get_trt_headers.sh, which scripts/setup_env.sh runs), else None."""
    if os.environ.get("TensorRT_ROOT"):
        return Path(os.environ["TensorRT_ROOT"])
    fetched = ROOT / "build" / "trt-headers"
    return fetched if (fetched / "include" / "NvInferRuntime.h").is_file() else None


@pytest.fixture(scope="session")
def plugins_build_dir(tmp_path_factory) -> Path:
    """plugins/ configured and built (CMake) into a temp folder: libmtx_kernels.so, and
    libmtx_trt_plugins.so with mtx_trt_plugin_check when TensorRT headers are found (tensorrt_root())."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake not found: would configure and build plugins/ (libmtx_kernels.so) and check it")
    cuda = _cuda_toolkit_root()
    if cuda is None:
        pytest.skip("CUDA toolkit (cuda_runtime_api.h, nvcc) not found: would build plugins/ (libmtx_kernels.so)")
    pytest.importorskip("triton", reason="triton not installed: would compile the kernels to cubins")
    out = tmp_path_factory.mktemp("plugins_build")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the AOT compiler needs real JIT
    cmd = ["cmake", "-S", str(ROOT / "plugins"), "-B", str(out), f"-DPython3_EXECUTABLE={sys.executable}",
           f"-DCUDAToolkit_ROOT={cuda}"]
    if tensorrt_root() is not None:
        cmd.append(f"-DTensorRT_ROOT={tensorrt_root()}")
    for step in (cmd, ["cmake", "--build", str(out), "-j", str(os.cpu_count() or 2)]):
        r = subprocess.run(step, env=env, capture_output=True, text=True)
        assert r.returncode == 0, f"{' '.join(step)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return out
