#!/usr/bin/env bash
# Run the whole grid (arch x scale x recipe x fold x seed), skipping cells whose result JSON is
# complete; options narrow it, spread it over GPUs (--gpus, --jobs) or submit it to Slurm
# (--slurm). The default is the full 5-fold grid (360 cells); `--preset holdout|multiseed|cv`
# runs one of the study's three run matrices instead. `bash run_all.sh --help` lists the
# options; `--dry-run` lists the cells.
# Everything is decided in nvfp4bench/grid/cli.py; this script only forwards to it.
# Python: $PYTHON if set, else the active virtual environment's, else this checkout's .venv,
# else python3 on PATH.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ -n "${PYTHON:-}" ]; then py=$PYTHON
elif [ -n "${VIRTUAL_ENV:-}" ]; then py=$VIRTUAL_ENV/bin/python
elif [ -x "$here/.venv/bin/python" ]; then py=$here/.venv/bin/python
else py=python3
fi
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" -m nvfp4bench.grid "$@"
