#!/bin/bash
# The 8-step stage alone on a copy of a run whose stage1_32 is done: $1 = source run, $2 = out dir, the rest
# are the trainer's --set overrides (commands.sh: D alone, and a long D warm-up).
set -ex
SRC=$1; DST=$2; PY=${PY:-.venv/bin/python}
rm -rf $DST; mkdir -p $DST/exports $DST/jobs
cp -a $SRC/{config.yaml,grid_prompts.safetensors,shards} $DST/
[ -d $SRC/base ] && cp -a $SRC/base $DST/
cp -a $SRC/exports/stage1_32 $DST/exports/
[ -d $SRC/exports/teacher ] && cp -a $SRC/exports/teacher $DST/exports/
cp -a $SRC/jobs/stage1_32 $DST/jobs/ 2>/dev/null || true
$PY -m trainer.run --config $SRC/config.yaml --set run.out_dir=$DST --jobs stage2_8 "${@:3}"
