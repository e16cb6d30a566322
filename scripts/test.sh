#!/usr/bin/env bash
# Sets up and runs the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export OMP_NUM_THREADS=1
# tests/test_slurm.py needs a SLURM cluster: the project's own single-node one (root on Debian only)
if [[ $(id -u) == 0 && -f /etc/debian_version ]]; then
  if ! bash scripts/local_slurm.sh start; then
    # In CI the cluster tests must run: a cluster that does not start is a failure, not a skip.
    [[ -n ${CI:-} ]] && { echo "local SLURM did not start" >&2; exit 1; }
    echo "local SLURM did not start: tests/test_slurm.py will be skipped"
  fi
else
  echo "not root on Debian: no local SLURM, tests/test_slurm.py will be skipped"
fi
python -m pytest -q --durations=25 "$@"
