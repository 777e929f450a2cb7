#!/usr/bin/env bash
# Submit every incomplete stage of an experiment as chained SLURM jobs; prints one job id per line.
#   slurm/submit.sh CONFIG [key=value ...] [--dry-run] [--no-check]
# Run it from the folder the config's relative paths (data.root, run.dir) are relative to; submit prints
# them resolved. The Python that runs submit is the one every node runs (unless slurm.python names
# another): $PYTHON if set, else this checkout's .venv/bin/python, else python3 on PATH.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"; else PY=python3; fi
fi
exec "$PY" -m trainer submit "$@"
