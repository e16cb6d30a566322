#!/bin/bash
# The three harder-data options together (position-free captions for half, stripes, up to 8 dots), then D given
# more steps per student step. As run on 2026-12-07 (fifteenth session) from the repository root; one CPU job
# at a time.
set -ex
PY=${PY:-.venv/bin/python}
OUT=bench/results/combined_data
HERE=bench/results/stripes_and_dots
RUN=/tmp/cb/run
DATA="--set data.shapes.position_in_caption=0.5 --set data.shapes.texture=stripes --set data.shapes.dots=8"
# 1. a teacher of half the asset's length (~25 min), then the recipe's chain (~10 min)
$PY -m trainer.run --config configs/shapes.yaml --set teacher.init= --set teacher.samples=120000 $DATA \
  --set run.out_dir=$RUN
# 2. what each stage sees: landing gaps entering and leaving, D's accuracy per phase
$PY bench/landing_gap.py --run $RUN --count 128 --out $OUT/landing_gap.md
# 3. D alone at the 8-step stage (the student frozen for 6,400 samples: 400 D steps)
PY=$PY bash $HERE/stage2_8_from.sh $RUN /tmp/cb/donly --set stages.1.objective=adv_cond \
  --set stages.1.samples=6400 --set stages.1.disc.warmup_samples=6400
$PY bench/d_curve.py --run combined=/tmp/cb/donly --out $OUT/d_only_stage2_8.md
# 4. the 8-step stage with 4 D steps per student step after the recipe's 400-sample warm-up (the student's 75
#    steps per phase kept: 400 + 4 x 1,200 samples), and the same after a 3,200-sample warm-up
PY=$PY bash $HERE/stage2_8_from.sh $RUN /tmp/cb/d4 --set stages.1.disc.steps_per_student_step=4 \
  --set stages.1.samples=5200
PY=$PY bash $HERE/stage2_8_from.sh $RUN /tmp/cb/d4_warm --set stages.1.disc.steps_per_student_step=4 \
  --set stages.1.samples=8000 --set stages.1.disc.warmup_samples=3200
for run in d4 d4_warm; do
  $PY bench/landing_gap.py --run /tmp/cb/$run --count 128 --out $OUT/landing_gap_stage2_8_$run.md
  for phase in 0 1; do
    $PY bench/d_curve.py --run $run=/tmp/cb/$run --window 400 --phase $phase --out $OUT/d_curve_${run}_phase$phase.md
  done
done
# 5. what blinds D once the student moves: the 8-step stage's conditional phase after the 3,200-sample warm-up,
#    4 D steps per student step, with the student's LoRA lr 10x lower; with the adversarial term negligible
#    (mse_weight 1e4: Adam is scale-free, so this is MSE distillation); with no MSE term (the paper's)
WARM="--set stages.1.objective=adv_cond --set stages.1.disc.steps_per_student_step=4 --set stages.1.samples=8000
  --set stages.1.disc.warmup_samples=3200"
PY=$PY bash $HERE/stage2_8_from.sh $RUN /tmp/cb/why_lr5e-5 $WARM --set stages.1.lora.optim.lr=5e-5
PY=$PY bash $HERE/stage2_8_from.sh $RUN /tmp/cb/why_mse_only $WARM --set stages.1.mse_weight=1e4
PY=$PY bash $HERE/stage2_8_from.sh $RUN /tmp/cb/why_adv_only $WARM --set stages.1.mse_weight=0
$PY bench/d_curve.py --run recipe_lr=/tmp/cb/d4_warm --run lora_lr_5e-5=/tmp/cb/why_lr5e-5 \
  --run mse_only=/tmp/cb/why_mse_only --run adv_only=/tmp/cb/why_adv_only --out $OUT/d_curve_what_blinds_d.md
for run in why_lr5e-5 why_mse_only why_adv_only; do
  $PY bench/landing_gap.py --run /tmp/cb/$run --count 128 --out $OUT/landing_gap_stage2_8_$run.md
done
# 6. a slow student in joint training: the 8-step stage as the recipe runs it (400-sample warm-up, D and student
#    stepping together) but the LoRA at lr 5e-5 and each phase 4x as long (4,800 samples: 300 steps)
PY=$PY bash $HERE/stage2_8_from.sh $RUN /tmp/cb/slow --set stages.1.lora.optim.lr=5e-5 --set stages.1.samples=4800
$PY bench/landing_gap.py --run /tmp/cb/slow --count 128 --out $OUT/landing_gap_stage2_8_slow.md
for phase in 0 1; do
  $PY bench/d_curve.py --run slow=/tmp/cb/slow --window 400 --phase $phase --out $OUT/d_curve_slow_phase$phase.md
done
