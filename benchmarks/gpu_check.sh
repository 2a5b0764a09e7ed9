#!/usr/bin/env bash
# One command for a lent GPU (README "Checking a GPU"): exactness on CUDA vs the CPU, quantizer
# and training timings, the study's projected GPU-hours; everything in --out.
#   bash benchmarks/gpu_check.sh --out DIR [--budget-s 480] [--quick --device cpu] [...]
# Every option goes to python -m nvfp4bench.gpu_check (--help lists them). A hard timeout
# (GPU_CHECK_TIMEOUT seconds, default 570) kills a run whose stages overrun their caps.
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout --kill-after=15 "${GPU_CHECK_TIMEOUT:-570}" python -m nvfp4bench.gpu_check "$@"
