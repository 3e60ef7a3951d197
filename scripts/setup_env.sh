#!/usr/bin/env bash
# Create .venv (if needed) and install mtx with its test, kernel and serving extras.
# CPU hosts get torch==2.13.0 (a CPU wheel); set MTX_TORCH to override, e.g. on a GPU host:
#   MTX_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130" make test
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${MTX_VENV:-.venv}
stamp="$VENV/.mtx-installed"
scripts/setup_cpp.sh   # C++ runtime deps (Debian packages, ORT headers into build/); idempotent
want="$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  scripts/get_trt_headers.sh "$VENV/bin/python"   # idempotent; restores a removed build/trt-headers
  scripts/get_cuda12.sh "$VENV/bin/python" || true
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
# torch first and pinned, so nothing later pulls a multi-GB CUDA build on a CPU machine.
pip install -q ${MTX_TORCH:-torch==2.13.0} 2>&1 | grep -v "is ignored" || true
pip install -q -e ".[test,kernels,serve]" 2>&1 | grep -v "is ignored" || true
"$VENV/bin/python" -c "import torch, onnx, onnxruntime, transformers, triton, mtx" 
# TensorRT headers (no libraries) into build/trt-headers, for building and CPU-testing the plugins;
# the CUDA 12 runtime and ptxas into build/cuda12, for the CUDA 12 flavour of libmtx_kernels.
scripts/get_trt_headers.sh "$VENV/bin/python"
scripts/get_cuda12.sh "$VENV/bin/python" || echo "setup_env: no CUDA 12 toolchain (the CUDA 12 flavour test will skip)" >&2
echo "$want" > "$stamp"
