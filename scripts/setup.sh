#!/usr/bin/env bash
# Creates .venv and installs the project (idempotent). Needs only python3 (3.10+) with venv and pip.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv || { echo "python3 -m venv failed: apt-get install python3-venv" >&2; exit 1; }
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU build first, so that the project's `torch>=2.4` is satisfied and pip pulls no CUDA build.
# On a GPU cluster, install your CUDA build of torch into .venv before running this script.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -c constraints.txt -e '.[test]'
