#!/bin/bash
# Harder data for the adversarial stages (data.shapes.texture: stripes; data.shapes.dots: 8): a teacher of half
# the asset's length on each, the recipe's chain on it, what its stages see, and how fast D alone learns.
# As run on 2026-12-07 (fourteenth session) from the repository root; one CPU job at a time.
set -ex
PY=${PY:-.venv/bin/python}
OUT=bench/results/stripes_and_dots
SHORT="--set teacher.init= --set teacher.samples=120000"
# 1. teacher (~25 min) then the recipe's chain (~10 min), each data
$PY -m trainer.run --config configs/shapes.yaml $SHORT --set data.shapes.texture=stripes --set run.out_dir=/tmp/st/run
$PY -m trainer.run --config configs/shapes.yaml $SHORT --set data.shapes.dots=8 --set run.out_dir=/tmp/st/dots
# 2. landing gaps and D's accuracy per stage: each data, and the plain data's recipe chain (LoRA stages, seed 0)
$PY bench/landing_gap.py --run /tmp/st/run --count 128 --out $OUT/landing_gap_stripes.md
$PY bench/landing_gap.py --run /tmp/st/dots --count 128 --out $OUT/landing_gap_dots.md
$PY bench/landing_gap.py --run runs/lora_chain/seed0 --count 128 --out $OUT/landing_gap_plain_lora_chain.md
# 3. D alone at the 8-step stage: its conditional phase, the student frozen for all 6,400 samples (400 D steps)
D_ALONE="--set stages.1.objective=adv_cond --set stages.1.samples=6400 --set stages.1.disc.warmup_samples=6400"
PY=$PY bash $OUT/stage2_8_from.sh runs/lora_chain/seed0 /tmp/st/donly_plain $D_ALONE
PY=$PY bash $OUT/stage2_8_from.sh /tmp/st/run /tmp/st/donly_striped $D_ALONE
PY=$PY bash $OUT/stage2_8_from.sh /tmp/st/dots /tmp/st/donly_dots $D_ALONE
PY=$PY bash $OUT/stage2_8_from.sh runs/lora_chain/seed0 /tmp/st/donly_plain_lr1e3 $D_ALONE --set stages.1.disc.optim.lr=1e-3
PY=$PY bash $OUT/stage2_8_from.sh /tmp/st/run /tmp/st/donly_striped_lr1e3 $D_ALONE --set stages.1.disc.optim.lr=1e-3
$PY bench/d_curve.py --run plain=/tmp/st/donly_plain --run striped=/tmp/st/donly_striped --run dots=/tmp/st/donly_dots \
  --run plain_lr1e-3=/tmp/st/donly_plain_lr1e3 --run striped_lr1e-3=/tmp/st/donly_striped_lr1e3 --out $OUT/d_only_stage2_8.md
# 4. the 8-step stage as the recipe runs it on dots, with a D-only warm-up of 3,200 samples instead of 400
PY=$PY bash $OUT/stage2_8_from.sh /tmp/st/dots /tmp/st/warm_dots --set stages.1.samples=4400 \
  --set stages.1.disc.warmup_samples=3200
for phase in 0 1; do
  $PY bench/d_curve.py --run dots_warmup_3200=/tmp/st/warm_dots --window 400 --phase $phase --out $OUT/long_warmup_dots_phase$phase.md
done
