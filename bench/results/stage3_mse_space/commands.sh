#!/bin/bash
# stage 3 (8 -> 4 steps) from the main job's 8-step export, with the MSE term in x0 space
set -e
cd /work/main
PY=python
for arm in "x0w8 8" "x0w100 100"; do
  set -- $arm
  d=/tmp/s3/$1
  if [ ! -d $d/exports/stage3_4 ]; then
    mkdir -p $d/exports
    for e in stage1_32 stage2_8 stage2_8_lora; do cp -r runs/shapes_x0/exports/$e $d/exports/; done
    /usr/bin/time -f "%e s" $PY -m trainer.run --config configs/shapes.yaml --jobs stage3_4 \
      --set run.out_dir=$d --set data.shards=runs/shapes_x0/shards \
      --set stages.2.mse_space=x0 --set stages.2.mse_weight=$2 > $d/train.log 2>&1
  fi
done
$PY eval/fid_patch.py --reference shapes --backend shapes --count 1000 --out /tmp/s3/eval --no-tensorboard --save-features --steps 4 \
  --teacher /work/main/assets/shapes_teacher --teacher-cache runs/table_x0_results/shapes_table_eval/teacher_samples \
  --model runs/shapes_x0/exports/stage3_4 --label landing_w100 --guidance 1.0 --lora none \
  --model /tmp/s3/x0w8/exports/stage3_4 --label x0_w8 --guidance 1.0 --lora none \
  --model /tmp/s3/x0w100/exports/stage3_4 --label x0_w100 --guidance 1.0 --lora none > /tmp/s3/eval.log 2>&1
