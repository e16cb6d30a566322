#!/bin/bash
# Striped data (data.shapes.texture: stripes): a teacher, the recipe's chain on it, and what its adversarial
# stages see. As run on 2026-12-07 (fourteenth session) from /work/main; RUN holds the run.
set -ex
PY=${PY:-.venv/bin/python}
RUN=${RUN:-/tmp/st/run}
OUT=bench/results/striped_data
STRIPES="--set data.shapes.texture=stripes --set teacher.init= --set teacher.samples=120000 --set run.out_dir=$RUN"
# 1. the teacher, half the asset's length (~21 min)
$PY -m trainer.run --config configs/shapes.yaml $STRIPES --jobs teacher
# 2. the recipe's chain from it (~12 min)
$PY -m trainer.run --config configs/shapes.yaml $STRIPES
# 3. landing gaps and D's accuracy per stage, and the teacher's own curvature
$PY bench/landing_gap.py --run $RUN --count 128 --out $OUT/landing_gap.md
$PY bench/landing_gap.py --run $RUN --count 128 --curvature $RUN/exports/teacher --out $OUT/curvature_teacher.md
# 4. the same on the plain data's chain (the recipe's seed-0 LoRA chain, runs/lora_chain/seed0)
$PY bench/landing_gap.py --run runs/lora_chain/seed0 --count 128 --out $OUT/landing_gap_plain_lora_chain.md
# 5. D alone at the 8-step stage (student frozen for the phase's 6,400 samples), both data, D lr 3e-4 and 1e-3
for lr in 3e-4 1e-3; do
  bash $OUT/d_only.sh $RUN /tmp/st/donly_striped_$lr --set stages.1.disc.optim.lr=$lr
  bash $OUT/d_only.sh runs/lora_chain/seed0 /tmp/st/donly_plain_$lr --set stages.1.disc.optim.lr=$lr
done
$PY bench/d_curve.py --run striped=/tmp/st/donly_striped_3e-4 --run plain=/tmp/st/donly_plain_3e-4 \
  --run striped_lr1e-3=/tmp/st/donly_striped_1e-3 --run plain_lr1e-3=/tmp/st/donly_plain_1e-3 --out $OUT/d_only_stage2_8.md
