#!/usr/bin/env bash
# The CUDA 12 toolchain for the CUDA 12 flavour of libmtx_kernels (drivers R525+), from PyPI by
# package name: headers and the static runtime (nvidia-cuda-runtime-cu12) and ptxas
# (nvidia-cuda-nvcc-cu12), unzipped into build/cuda12/{include,lib,bin}; nothing is installed.
#   scripts/get_cuda12.sh [PYTHON]
#   cmake -S plugins -B build/plugins-cu12 -DMTX_CUDA_ROOT=$PWD/build/cuda12 ...
# Idempotent (a stamp names the pinned packages). Exits non-zero when they cannot be had.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-${PYTHON:-python3}}
PKGS="nvidia-cuda-runtime-cu12==12.9.79 nvidia-cuda-nvcc-cu12==12.9.86"
DEST=build/cuda12
if [ -f "$DEST/.source" ] && [ "$(cat "$DEST/.source")" = "$PKGS" ] && [ -x "$DEST/bin/ptxas" ]; then
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$tmp" $PKGS 2>&1 | grep -v "is ignored" || true
rm -rf "$DEST" && mkdir -p "$DEST"
"$PY" - "$tmp" "$DEST" <<'PYEOF'
import os, sys, zipfile, pathlib
src, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheels = sorted(src.glob("*.whl"))
if len(wheels) != 2:
    raise SystemExit(f"get_cuda12: expected 2 wheels, got {[w.name for w in wheels]}")
moves = {"nvidia/cuda_runtime/include/": "include/", "nvidia/cuda_runtime/lib/": "lib/",
         "nvidia/cuda_nvcc/include/": "include/", "nvidia/cuda_nvcc/bin/ptxas": "bin/ptxas"}
for whl in wheels:
    with zipfile.ZipFile(whl) as z:
        for n in z.namelist():
            for a, b in moves.items():
                if n.startswith(a) and not n.endswith("/"):
                    out = dest / (b + n[len(a):] if a.endswith("/") else b)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(z.read(n))
os.chmod(dest / "bin" / "ptxas", 0o755)
for need in ("include/cuda_runtime_api.h", "include/crt/host_defines.h", "lib/libcudart_static.a", "bin/ptxas"):
    if not (dest / need).is_file():
        raise SystemExit(f"get_cuda12: {need} missing")
PYEOF
echo "$PKGS" > "$DEST/.source"
echo "get_cuda12: CUDA 12.9 runtime headers, static runtime and ptxas in $DEST"
