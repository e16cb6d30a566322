#!/usr/bin/env bash
# The main job on the embedded default: shapes -> shards -> teacher -> progression -> exports.
# Extra arguments go to `python -m trainer.run` (e.g. --set run.out_dir=/tmp/x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
start=$(date +%s)
python -m trainer.run --config configs/shapes.yaml "$@"
echo "main job wall time: $(( $(date +%s) - start )) s"
