#!/usr/bin/env bash
# TensorRT headers (no libraries) for compiling and CPU-testing libmtx_trt_plugins.so, into
# build/trt-headers/include. NVIDIA's own wheels carry no headers; the PyPI package kernel-lens
# (MIT, pinned below) ships the TensorRT 10.14 headers (NvInfer*.h, Apache-2.0) as package data, so
# they are taken from its wheel by package name, unzipped, and nothing else of it is installed.
# Idempotent (a stamp names the pinned package); a failure leaves no headers and the TensorRT tests
# skip saying so. Usage: scripts/get_trt_headers.sh [PYTHON]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:-${PYTHON:-python3}}
PKG="kernel-lens==2.0.1"         # carries kernel_lens/include/tensorrt/NvInfer*.h of TensorRT 10.14.1
DEST=build/trt-headers
stamp="$DEST/.source"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$PKG" ] && [ -f "$DEST/include/NvInferRuntime.h" ]; then
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if ! "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "$PKG" >"$tmp/log" 2>&1; then
  echo "get_trt_headers: could not download $PKG (TensorRT plugin tests will skip): $(tail -1 "$tmp/log")" >&2
  exit 0
fi
rm -rf "$DEST" && mkdir -p "$DEST/include"
"$PY" - "$tmp" "$DEST/include" <<'PYEOF'
import sys, zipfile, pathlib
src, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
(whl,) = src.glob("*.whl")
prefix = "kernel_lens/include/tensorrt/"
with zipfile.ZipFile(whl) as z:
    names = [n for n in z.namelist() if n.startswith(prefix) and n.endswith(".h")]
    for n in names:
        (dest / n[len(prefix):]).write_bytes(z.read(n))
if not (dest / "NvInferRuntime.h").is_file():
    raise SystemExit(f"get_trt_headers: {whl.name} has no {prefix}NvInferRuntime.h")
PYEOF
echo "$PKG" > "$stamp"
echo "get_trt_headers: TensorRT headers in $DEST/include (from $PKG)"
