#!/bin/bash
# The commands behind landing_gap_mse*.md, as run on 2026-11-29 (/tmp/hard: a run of configs/shapes.yaml with
# --set data.shapes.position_in_caption=0.5 --set teacher.init= --set teacher.samples=120000, stages 1-2 done)
# queued after the shapes table: the 2-step stage on position_in_caption 0.5 data, recipe (mse_weight 100) vs 1
set -ex
cd /work/main
while pgrep -f "bench/shapes_table.py" >/dev/null; do sleep 20; done
date
PY=.venv/bin/python
for d in hard2 hard3; do
  rm -rf /tmp/$d; mkdir -p /tmp/$d/exports /tmp/$d/jobs
  cp -a /tmp/hard/{config.yaml,grid_prompts.safetensors,shards,base} /tmp/$d/
  cp -a /tmp/hard/exports/{stage1_32,stage2_8,stage2_8_lora} /tmp/$d/exports/
  cp -a /tmp/hard/jobs/{stage1_32,stage2_8} /tmp/$d/jobs/
done
$PY -m trainer.run --config /tmp/hard/config.yaml --set run.out_dir=/tmp/hard2 --jobs stage3_4,stage4_2
cp -a /tmp/hard2/exports/{stage3_4,stage3_4_lora} /tmp/hard3/exports/
cp -a /tmp/hard2/jobs/stage3_4 /tmp/hard3/jobs/
$PY -m trainer.run --config /tmp/hard/config.yaml --set run.out_dir=/tmp/hard3 --set stages.3.mse_weight=1 --jobs stage4_2
date
mkdir -p bench/results/harder_data
$PY bench/landing_gap.py --run /tmp/hard2 --out bench/results/harder_data/landing_gap_mse100.md
$PY bench/landing_gap.py --run /tmp/hard3 --out bench/results/harder_data/landing_gap_mse1.md
$PY eval/fid_patch.py --reference shapes --backend shapes --position-in-caption 0.5 --count 1000 --steps 2 \
  --teacher /tmp/hard/exports/teacher --no-tensorboard --out bench/results/harder_data/steps2 \
  --model /tmp/hard2/exports/stage3_4 --label "4-step student (stage start)" \
  --model /tmp/hard2/exports/stage4_2 --label "2-step, mse_weight 100 (recipe)" \
  --model /tmp/hard3/exports/stage4_2 --label "2-step, mse_weight 1" --guidance 1
date
