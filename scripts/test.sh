#!/usr/bin/env bash
# Sets up and runs the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export OMP_NUM_THREADS=1
# tests/test_slurm.py needs a SLURM cluster: the project's own single-node one (root on Debian only)
if [[ $(id -u) == 0 && -f /etc/debian_version ]]; then
  bash scripts/local_slurm.sh start || echo "local SLURM did not start: tests/test_slurm.py will be skipped"
else
  echo "not root on Debian: no local SLURM, tests/test_slurm.py will be skipped"
fi
python -m pytest -q "$@"
