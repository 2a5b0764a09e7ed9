#!/usr/bin/env bash
# One command for a lent GPU (README "Checking a lent GPU"): exactness on CUDA vs the CPU,
# quantizer and training timings, the study's projected GPU-hours; everything in --out.
#   bash benchmarks/gpu_check.sh --out DIR [--budget-s 480] [--quick --device cpu] [...]
# Every option goes to python -m nvfp4bench.gpu_check (--help lists them). Wheels in .whl/ (e.g.
# nibabel, which a machine with only torch lacks) are installed into a temporary folder first.
# A hard timeout (GPU_CHECK_TIMEOUT seconds, default 570) ends a run whose stages overrun.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" >/dev/null; then
    site="$(mktemp -d)/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
        .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec timeout --kill-after=15 "${GPU_CHECK_TIMEOUT:-570}" "$PY" -m nvfp4bench.gpu_check "$@"
