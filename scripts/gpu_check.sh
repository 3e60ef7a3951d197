#!/usr/bin/env bash
# One prepared GPU check (a CUDA machine with torch, triton, onnx, onnxruntime and transformers; no
# TensorRT, no network). Runs, in about 8 minutes on an H100/H200, and ends with a short table:
#   1. pytest: tests/test_gpu_kernels.py (marker gpu: the Triton kernels against the reference ops at
#      Mistral-7B / Mixtral shapes, the eager model on CUDA, libmtx_kernels.so through ctypes) and
#      tests/test_kernels_triton.py (its whole grid, compiled on the GPU);
#   2. scripts/bench_kernels.py: decode attention against its 2*W*Hkv*D*bytes bandwidth bound
#      (goal >= 85%) and the MoE grouped GEMM against tensor-core peak (goal >= 70% at >= 64 tokens);
#   3. scripts/gpu_generate_check.py: eager generation with the kernels against transformers (sdpa)
#      on a Mistral-7B-shaped random bfloat16 model, batch 1 and 8: tokens/s, identical greedy tokens.
# libmtx_kernels.so: $MTX_KERNELS_LIB, else build/plugins/libmtx_kernels.so, else built here when
# cmake and a CUDA toolkit are present (tests/conftest.py builds it for step 1 in any case).
#   scripts/gpu_check.sh [--dry-run] [--out DIR]      (--dry-run: print the commands, run nothing)
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
OUTDIR=${OUT:-build/gpu_check}
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) shift; OUTDIR=$1 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (expected --dry-run, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # this checkout's mtx, installed or not
LIB=${MTX_KERNELS_LIB:-build/plugins/libmtx_kernels.so}
STEPS=(
  "gpu-tests|200|$PY -m pytest -q -rs tests/test_gpu_kernels.py tests/test_kernels_triton.py --junitxml=$OUTDIR/pytest.xml"
  "bench-kernels|100|$PY scripts/bench_kernels.py --dtype bfloat16 --iters 30 --lib $LIB --out $OUTDIR/bench_kernels.json"
  "generate-7b|150|$PY scripts/gpu_generate_check.py --batch 1 8 --new-tokens 64 --out $OUTDIR/generate.json"
)
if [ "$DRY" = 1 ]; then
  echo "gpu_check.sh --dry-run: would run, writing results to $OUTDIR:"
  [ -f "$LIB" ] || echo "  [build-lib] cmake -S plugins -B build/plugins -DPython3_EXECUTABLE=$PY && cmake --build build/plugins -j"
  for s in "${STEPS[@]}"; do IFS='|' read -r name secs cmd <<< "$s"; echo "  [$name] timeout $secs $cmd"; done
  echo "  [summary] $PY scripts/gpu_check_summary.py $OUTDIR"
  exit 0
fi
mkdir -p "$OUTDIR"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check.sh: no CUDA GPU visible to torch; nothing to check (use --dry-run to see the steps)" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUTDIR/gpu.txt" 2>/dev/null || true
if [ ! -f "$LIB" ] && command -v cmake >/dev/null; then
  (cmake -S plugins -B build/plugins -DPython3_EXECUTABLE="$PY" && cmake --build build/plugins -j) > "$OUTDIR/build.log" 2>&1 \
    || echo "gpu_check.sh: building libmtx_kernels.so failed (see $OUTDIR/build.log)" >&2
fi
[ -f "$LIB" ] && export MTX_KERNELS_LIB="$PWD/${LIB#$PWD/}"   # tests/test_gpu_kernels.py uses it (no cmake needed)
: > "$OUTDIR/steps.tsv"
for s in "${STEPS[@]}"; do
  IFS='|' read -r name secs cmd <<< "$s"
  if [ "$name" = bench-kernels ] && [ ! -f "$LIB" ]; then cmd=${cmd/--lib $LIB /}; fi
  t0=$(date +%s)
  timeout "$secs" $cmd > "$OUTDIR/$name.log" 2>&1
  rc=$?
  echo -e "$name\t$rc\t$(( $(date +%s) - t0 ))" >> "$OUTDIR/steps.tsv"
  tail -3 "$OUTDIR/$name.log"
done
"$PY" scripts/gpu_check_summary.py "$OUTDIR"
