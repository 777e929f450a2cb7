#!/usr/bin/env bash
# Submit every incomplete stage of an experiment as chained SLURM jobs; prints one job id per line.
#   slurm/submit.sh CONFIG [key=value ...] [--dry-run]
# Run it from the folder the config's relative paths (data.root, run.dir) are relative to.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m trainer submit "$@"
