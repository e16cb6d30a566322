#!/bin/bash
# Three shapes per image, no caption naming a position ("a red ring, a blue square, a green cross": 9 words, what the
# toy tokenizer takes; three positioned shapes would be 18), with stripes and up to 8 dots: the two-shape run's
# teacher length and chain (bench/results/two_objects), objects 2 -> 3 and position_in_caption 0.5 -> 0. As run on
# 2026-12-07 (seventeenth session) from the repository root; one CPU job at a time.
set -ex
PY=${PY:-.venv/bin/python}
OUT=bench/results/three_objects
RUN=/tmp/ob3/run
# 1. teacher 120,000 samples (~30 min) and the recipe's chain (~10 min); landing gaps and D's accuracy per phase
$PY -m trainer.run --config configs/shapes.yaml --set teacher.init= --set teacher.samples=120000 \
  --set data.shapes.position_in_caption=0.0 --set data.shapes.texture=stripes --set data.shapes.dots=8 \
  --set data.shapes.objects=3 --set run.out_dir=$RUN
cp $RUN/grids/progression.png $OUT/
$PY bench/landing_gap.py --run $RUN --count 128 --out $OUT/landing_gap.md
# 2. every student on 1,000 prompts, FID against the data and the teacher's samples, the quadrant rules' rates
OMP_NUM_THREADS=2 $PY eval/fid_patch.py --reference shapes --backend shapes --objects 3 --position-in-caption 0.0 \
  --texture stripes --dots 8 --count 1000 --bootstrap 200 --no-tensorboard --out $OUT/scene_rules \
  --teacher $RUN/exports/teacher --guidance 1.0 --lora none \
  --model $RUN/exports/stage2_8 --label recipe_8step --model $RUN/exports/stage3_4 --label recipe_4step \
  --model $RUN/exports/stage4_2 --label recipe_2step --model $RUN/exports/stage5_1 --label recipe_1step
# 3. the one-step stage's D beside the two-shape run's
$PY bench/d_curve.py --run three_objects=$RUN --run two_objects=/tmp/ob/run --stage stage5_1 --window 400 \
  --out $OUT/d_curve_stage5_1.md
# --- eighteenth session (2026-12-07) ---
# 4. the one-step stage with the two-shape data's D-steps variant (bench/results/two_objects commands 18): the recipe's
#    MSE phase kept, then D alone for 1,600 samples and 4 D steps per student step (11,200 samples: the student's
#    150 steps), no MSE term, student lr 5e-5; unconditional and conditional
ONLY="--set stages.4.objective=mse --set stages.4.mse_samples=0"
D="--set stages.4.disc.warmup_samples=1600 --set stages.4.disc.steps_per_student_step=4 --set stages.4.mse_weight=0
  --set stages.4.optim.lr=5e-5"
for kind in uncond cond; do
  PY=$PY KEEP=stage5_1.0_mse bash bench/rerun_stage.sh $RUN /tmp/ob3/${kind}_d4 stage5_1 $ONLY \
    --set "stages.4.phases=[{kind: mse, samples: 4800}, {kind: adv_$kind, samples: 11200}]" $D
done
OMP_NUM_THREADS=2 $PY eval/fid_patch.py --reference shapes --backend shapes --objects 3 --position-in-caption 0.0 \
  --texture stripes --dots 8 --count 1000 --bootstrap 200 --no-tensorboard --out $OUT/one_step_d_steps \
  --teacher $RUN/exports/teacher --teacher-cache /tmp/ob3/tcache --guidance 1.0 --lora none \
  --model $RUN/exports/stage5_1 --label recipe_1step --model /tmp/ob3/uncond_d4/exports/stage5_1 --label uncond_d4 \
  --model /tmp/ob3/cond_d4/exports/stage5_1 --label cond_d4
$PY bench/d_curve.py --run uncond_d4=/tmp/ob3/uncond_d4 --run cond_d4=/tmp/ob3/cond_d4 --stage stage5_1 --window 1600 \
  --out $OUT/d_curve_stage5_1_d_steps.md
