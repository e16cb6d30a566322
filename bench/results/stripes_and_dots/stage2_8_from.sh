#!/bin/bash
# The 8-step stage alone on a copy of a run whose stage1_32 is done: $1 = source run, $2 = out dir, the rest
# are the trainer's --set overrides (commands.sh: D alone, and a long D warm-up).
set -ex
PY=${PY:-.venv/bin/python} bash "$(dirname "$0")/../../rerun_stage.sh" "$1" "$2" stage2_8 "${@:3}"
