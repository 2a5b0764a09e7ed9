#!/usr/bin/env bash
# The GPU check (README "Checking a GPU machine"): exactness on CUDA against the CPU, quantizer
# and training timings, the study's projected GPU-hours on this GPU; everything lands in --out.
#   bash benchmarks/gpu_check.sh --out DIR [--budget-s 1800] [--quick --device cpu] [...]
# Every option goes to python -m nvfp4bench.gpu_check (--help lists them). A hard timeout
# (GPU_CHECK_TIMEOUT seconds, default 2100) ends a run whose stages overrun, e.g. in a batch job.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec timeout --kill-after=15 "${GPU_CHECK_TIMEOUT:-2100}" "${PYTHON:-python3}" \
    -m nvfp4bench.gpu_check "$@"
