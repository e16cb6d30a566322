#!/bin/bash
# stage 3 (8 -> 4 steps) from the main job's 8-step export: LoRA phases twice as long; no full-UNet phase
set -e
cd /work/main
PY=python
for arm in "long stages.2.samples=2400" "lora stages.2.variant=lora"; do
  set -- $arm
  d=/tmp/s3b/$1
  if [ ! -d $d/exports/stage3_4 ]; then
    mkdir -p $d/exports
    for e in stage1_32 stage2_8 stage2_8_lora; do cp -r runs/shapes_x0/exports/$e $d/exports/; done
    /usr/bin/time -f "%e s" $PY -m trainer.run --config configs/shapes.yaml --jobs stage3_4 \
      --set run.out_dir=$d --set data.shards=runs/shapes_x0/shards \
      --set $2 > $d/train.log 2>&1
  fi
done
$PY eval/fid_patch.py --reference shapes --backend shapes --count 1000 --out /tmp/s3b/eval --no-tensorboard --save-features --steps 4 \
  --teacher /work/main/assets/shapes_teacher --teacher-cache runs/table_x0_results/shapes_table_eval/teacher_samples \
  --model /tmp/s3b/long/exports/stage3_4 --label lora_phases_2400 --guidance 1.0 --lora none \
  --model /tmp/s3b/lora/exports/stage3_4 --label no_full_phase --guidance 1.0 --lora none > /tmp/s3b/eval.log 2>&1
