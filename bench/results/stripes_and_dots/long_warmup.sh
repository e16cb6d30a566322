#!/bin/bash
# The 8-step stage as the recipe runs it (both LoRA phases, joint steps 1,200 samples each), with a D-only
# warm-up of 3,200 samples instead of 400. $1 = source run (stage1_32 done), $2 = out dir
set -ex
SRC=$1; DST=$2; PY=${PY:-.venv/bin/python}
rm -rf $DST; mkdir -p $DST/exports $DST/jobs
cp -a $SRC/{config.yaml,grid_prompts.safetensors,shards} $DST/
[ -d $SRC/base ] && cp -a $SRC/base $DST/
cp -a $SRC/exports/stage1_32 $DST/exports/
[ -d $SRC/exports/teacher ] && cp -a $SRC/exports/teacher $DST/exports/
cp -a $SRC/jobs/stage1_32 $DST/jobs/ 2>/dev/null || true
$PY -m trainer.run --config $SRC/config.yaml --set run.out_dir=$DST --jobs stage2_8 \
  --set stages.1.samples=4400 --set stages.1.disc.warmup_samples=3200
