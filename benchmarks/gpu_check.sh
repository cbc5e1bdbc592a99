#!/usr/bin/env bash
# One GPU command, from a fresh checkout on a machine with one CUDA GPU and a CUDA torch (no internet needed):
# builds coconut_fast._C in place, then benchmarks/gpu_check.py runs the GPU tests and measurements, writes
# benchmarks/results/<device>-<date>.json and prints a summary. Without CUDA: one line, exit 2.
set -uo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
PYTHON="${PYTHON:-python}"
"$PYTHON" benchmarks/gpu_check.py --preflight || exit $?

log=$(mktemp)
echo "gpu_check: building coconut_fast._C (pip install -e . --no-build-isolation --no-deps) ..."
if MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PYTHON" -m pip install -e . --no-build-isolation --no-deps -q >"$log" 2>&1; then
  build="built in $(( $(date +%s) - started )) s"
else
  build="build failed (exit $?), the Triton kernels still run"
  tail -n 20 "$log"
fi
echo "gpu_check: $build"
rm -f "$log"
exec "$PYTHON" benchmarks/gpu_check.py --started "$started" --build-status "$build" "$@"
