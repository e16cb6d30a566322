#!/bin/bash
# Two shapes per image on top of the three data options together (bench/results/combined_data: position-free
# captions for half, stripes, up to 8 dots): the same teacher length and chain, one variable changed
# (data.shapes.objects=2). As run on 2026-12-07 (sixteenth session) from the repository root; one CPU job at a
# time.
set -ex
PY=${PY:-.venv/bin/python}
OUT=bench/results/two_objects
RUN=/tmp/ob/run
DATA="--set data.shapes.position_in_caption=0.5 --set data.shapes.texture=stripes --set data.shapes.dots=8
  --set data.shapes.objects=2"
# 1. a teacher of half the asset's length (~28 min), then the recipe's chain (~10 min)
$PY -m trainer.run --config configs/shapes.yaml --set teacher.init= --set teacher.samples=120000 $DATA \
  --set run.out_dir=$RUN
# 2. what each stage sees: landing gaps entering and leaving, D's accuracy per phase
$PY bench/landing_gap.py --run $RUN --count 128 --out $OUT/landing_gap.md
# 3. the one-step stage with run.seed 1 and 2 (from seed 0's 2-step student), and the combined data's with seed 1
for seed in 1 2; do
  PY=$PY bash bench/rerun_stage.sh $RUN /tmp/ob/seed$seed stage5_1 --set run.seed=$seed
done
PY=$PY bash bench/rerun_stage.sh /tmp/cb/run /tmp/ob/combined_seed1 stage5_1 --set run.seed=1  # combined_data's run
$PY bench/d_curve.py --run two_objects_seed0=$RUN --run two_objects_seed1=/tmp/ob/seed1 \
  --run two_objects_seed2=/tmp/ob/seed2 --run combined_seed0=/tmp/cb/run --run combined_seed1=/tmp/ob/combined_seed1 \
  --stage stage5_1 --window 400 --out $OUT/d_curve_stage5_1.md
# 4. the one-step adversarial phase 3x as long (its MSE phase kept), D's curve and the gap it leaves
PY=$PY KEEP=stage5_1.0_mse bash bench/rerun_stage.sh $RUN /tmp/ob/long stage5_1 --set stages.4.samples=7200
$PY bench/d_curve.py --run recipe_2400=$RUN --run long_7200=/tmp/ob/long --stage stage5_1 --window 800 \
  --out $OUT/d_curve_stage5_1_long.md
$PY bench/landing_gap.py --run /tmp/ob/long --count 128 --out $OUT/landing_gap_long_stage5_1.md
# 5. D alone at the 8-step stage (the student frozen for 6,400 samples), beside the combined data's
PY=$PY bash bench/rerun_stage.sh $RUN /tmp/ob/donly stage2_8 --set stages.1.objective=adv_cond \
  --set stages.1.samples=6400 --set stages.1.disc.warmup_samples=6400
$PY bench/d_curve.py --run two_objects=/tmp/ob/donly --run combined=/tmp/cb/donly --out $OUT/d_only_stage2_8.md
# 6. the one-step students on 1,000 prompts of this data against the data and against the teacher's samples
OMP_NUM_THREADS=2 $PY eval/fid_patch.py --reference shapes --backend shapes --objects 2 --position-in-caption 0.5 \
  --texture stripes --dots 8 --count 1000 --bootstrap 200 --no-tensorboard --out $OUT/steps1 \
  --teacher $RUN/exports/teacher --steps 1 --guidance 1.0 --lora none \
  --model $RUN/exports/stage5_1 --label recipe_seed0 --model /tmp/ob/seed1/exports/stage5_1 --label recipe_seed1 \
  --model /tmp/ob/seed2/exports/stage5_1 --label recipe_seed2 --model /tmp/ob/long/exports/stage5_1 \
  --label adv_phase_3x_seed0
# 7. the 2-step stage with both phases 3x as long (4,800 samples each)
PY=$PY bash bench/rerun_stage.sh $RUN /tmp/ob/long2 stage4_2 --set stages.3.samples=4800
for phase in 0 1; do
  $PY bench/d_curve.py --run recipe_1600=$RUN --run long_4800=/tmp/ob/long2 --stage stage4_2 --phase $phase \
    --window 800 --out $OUT/d_curve_stage4_2_long_phase$phase.md
done
# 8. the 3x one-step phase again with the adversarial term negligible (mse_weight 1e4: MSE distillation), scored
#    beside the recipe's and the adversarial 3x phase's students
PY=$PY KEEP=stage5_1.0_mse bash bench/rerun_stage.sh $RUN /tmp/ob/long_mse stage5_1 --set stages.4.samples=7200 \
  --set stages.4.mse_weight=1e4
OMP_NUM_THREADS=2 $PY eval/fid_patch.py --reference shapes --backend shapes --objects 2 --position-in-caption 0.5 \
  --texture stripes --dots 8 --count 1000 --bootstrap 200 --no-tensorboard --out $OUT/steps1_long_mse_only \
  --teacher $RUN/exports/teacher --steps 1 --guidance 1.0 --lora none \
  --model $RUN/exports/stage5_1 --label recipe_seed0 --model /tmp/ob/long/exports/stage5_1 --label adv_phase_3x_seed0 \
  --model /tmp/ob/long_mse/exports/stage5_1 --label mse_only_3x_seed0
$PY bench/d_curve.py --run adv_3x=/tmp/ob/long --run mse_only_3x=/tmp/ob/long_mse --stage stage5_1 --window 800 \
  --out $OUT/d_curve_stage5_1_long_mse_only.md
# 9. both 3x one-step phases again on seed 1 (from seed 1's MSE phase), scored beside seed 1's recipe student
for v in adv mse; do
  extra=""; [ $v = mse ] && extra="--set stages.4.mse_weight=1e4"
  PY=$PY KEEP=stage5_1.0_mse bash bench/rerun_stage.sh /tmp/ob/seed1 /tmp/ob/long_${v}_seed1 stage5_1 --set run.seed=1 \
    --set stages.4.samples=7200 $extra
done
OMP_NUM_THREADS=2 $PY eval/fid_patch.py --reference shapes --backend shapes --objects 2 --position-in-caption 0.5 \
  --texture stripes --dots 8 --count 1000 --bootstrap 200 --no-tensorboard --out $OUT/steps1_long_seed1 \
  --teacher $RUN/exports/teacher --steps 1 --guidance 1.0 --lora none \
  --model /tmp/ob/seed1/exports/stage5_1 --label recipe_seed1 --model /tmp/ob/long_adv_seed1/exports/stage5_1 \
  --label adv_phase_3x_seed1 --model /tmp/ob/long_mse_seed1/exports/stage5_1 --label mse_only_3x_seed1
$PY bench/d_curve.py --run adv_3x=/tmp/ob/long_adv_seed1 --run mse_only_3x=/tmp/ob/long_mse_seed1 --stage stage5_1 \
  --window 800 --out $OUT/d_curve_stage5_1_long_seed1.md
# --- seventeenth session (2026-12-07) ---
# 10. the 2-step stage with a 10x slower LoRA (lr 5e-5), both phases 4,800 samples, beside the recipe's lr
PY=$PY bash bench/rerun_stage.sh $RUN /tmp/ob/slow2_lora stage4_2 --set stages.3.samples=4800 \
  --set stages.3.lora.optim.lr=5e-5
for phase in 0 1; do
  $PY bench/d_curve.py --run recipe_lr5e-4_1600=$RUN --run lr5e-4_4800=/tmp/ob/long2 --run lr5e-5_4800=/tmp/ob/slow2_lora \
    --stage stage4_2 --phase $phase --window 800 --out $OUT/d_curve_stage4_2_slow_lora_phase$phase.md
done
# 11. D alone at the 2-step stage (the student frozen for 6,400 samples)
PY=$PY bash bench/rerun_stage.sh $RUN /tmp/ob/donly2 stage4_2 --set stages.3.objective=adv_cond \
  --set stages.3.samples=6400 --set stages.3.disc.warmup_samples=6400
$PY bench/d_curve.py --run two_objects=/tmp/ob/donly2 --stage stage4_2 --window 800 --out $OUT/d_only_stage4_2.md
# 12. the 2-step stage with D alone for 3,200 samples at the start of each phase, then the recipe's 1,600 joint
PY=$PY bash bench/rerun_stage.sh $RUN /tmp/ob/warm2 stage4_2 --set stages.3.samples=4800 \
  --set stages.3.disc.warmup_samples=3200
for phase in 0 1; do
  $PY bench/d_curve.py --run d_alone_3200_then_joint_1600=/tmp/ob/warm2 --stage stage4_2 --phase $phase --window 400 \
    --out $OUT/d_curve_stage4_2_d_warmup_phase$phase.md
done
$PY bench/landing_gap.py --run /tmp/ob/warm2 --count 128 --out $OUT/landing_gap_d_warmup_stage4_2.md
# 13. the 2- and 1-step students with the quadrant rules (eval/scene_scores.py) and the teacher's own rates
OMP_NUM_THREADS=2 $PY eval/fid_patch.py --reference shapes --backend shapes --objects 2 --position-in-caption 0.5 \
  --texture stripes --dots 8 --count 1000 --bootstrap 200 --no-tensorboard --out $OUT/scene_rules \
  --teacher $RUN/exports/teacher --teacher-cache /tmp/ob/tcache --guidance 1.0 --lora none \
  --model $RUN/exports/stage4_2 --label recipe_2step_seed0 \
  --model /tmp/ob/warm2/exports/stage4_2 --label d_alone_3200_2step_seed0 \
  --model /tmp/ob/slow2_lora/exports/stage4_2 --label lora_lr5e-5_3x_2step_seed0 \
  --model $RUN/exports/stage5_1 --label recipe_seed0 --model /tmp/ob/seed1/exports/stage5_1 --label recipe_seed1 \
  --model /tmp/ob/seed2/exports/stage5_1 --label recipe_seed2 \
  --model /tmp/ob/long/exports/stage5_1 --label adv_3x_seed0 --model /tmp/ob/long_mse/exports/stage5_1 --label mse_only_3x_seed0 \
  --model /tmp/ob/long_adv_seed1/exports/stage5_1 --label adv_3x_seed1 \
  --model /tmp/ob/long_mse_seed1/exports/stage5_1 --label mse_only_3x_seed1
# 14. what each quadrant rule flags in the one-step student (seed 0), beside the teacher's image of the prompt
$PY bench/scene_flags.py --model $RUN/exports/stage5_1 --teacher $RUN/exports/teacher --objects 2 \
  --position-in-caption 0.5 --texture stripes --dots 8 --count 400 --out $OUT/scene_flags_stage5_1.png \
  > $OUT/scene_flags_stage5_1.json
# 13b. the teacher as a row (its FID against the data: 61.8 [44.6, 79.0]); run before the rules' final form, so
#      its failure columns in that run's output are not the table's (those come from 13's teacher_reference)
OMP_NUM_THREADS=2 $PY eval/fid_patch.py --reference shapes --backend shapes --objects 2 --position-in-caption 0.5 \
  --texture stripes --dots 8 --count 1000 --bootstrap 200 --no-tensorboard --out /tmp/ob/scene_eval \
  --model $RUN/exports/teacher --label teacher_32
# 15. the 2-step stage with the one-step stage's student: the full UNet at lr 5e-6, both phases 4,800 samples
PY=$PY bash bench/rerun_stage.sh $RUN /tmp/ob/full2 stage4_2 --set stages.3.samples=4800 --set stages.3.variant=full \
  --set stages.3.optim.lr=5e-6
for phase in 0 1; do
  $PY bench/d_curve.py --run recipe_lora_lr5e-4_1600=$RUN --run lora_lr5e-5_4800=/tmp/ob/slow2_lora \
    --run full_unet_lr5e-6_4800=/tmp/ob/full2 --stage stage4_2 --phase $phase --window 800 \
    --out $OUT/d_curve_stage4_2_full_unet_phase$phase.md
done
OMP_NUM_THREADS=2 $PY eval/fid_patch.py --reference shapes --backend shapes --objects 2 --position-in-caption 0.5 \
  --texture stripes --dots 8 --count 1000 --bootstrap 200 --no-tensorboard --out $OUT/scene_rules_full_unet_2step \
  --teacher $RUN/exports/teacher --teacher-cache /tmp/ob/tcache --guidance 1.0 --lora none \
  --model /tmp/ob/full2/exports/stage4_2 --label full_unet_lr5e-6_3x_2step_seed0
$PY bench/landing_gap.py --run /tmp/ob/full2 --count 128 --out $OUT/landing_gap_full_unet_stage4_2.md
# --- eighteenth session (2026-12-07) ---
# 16. the one-step stage's adversarial phase under the paper's objectives (the recipe's MSE phase kept): conditional
#     only, unconditional only, conditional then unconditional, without the MSE term (the paper has none; w0) and
#     with the recipe's weight 100; student lr 5e-6 as the recipe's
ONLY="--set stages.4.objective=mse --set stages.4.mse_samples=0"
one_step() { src=$1 dest=$2; shift 2; PY=$PY KEEP=stage5_1.0_mse bash bench/rerun_stage.sh $src $dest stage5_1 "$@"; }
one_step $RUN /tmp/ob/cond_w0 $ONLY --set 'stages.4.phases=[{kind: mse, samples: 4800}, {kind: adv_cond}]' \
  --set stages.4.mse_weight=0
one_step $RUN /tmp/ob/uncond_w0 $ONLY --set 'stages.4.phases=[{kind: mse, samples: 4800}, {kind: adv_uncond}]' \
  --set stages.4.mse_weight=0
one_step $RUN /tmp/ob/both_w0 --set stages.4.objective=mse+adv_cond+adv_uncond --set stages.4.mse_weight=0
one_step $RUN /tmp/ob/both_w100 --set stages.4.objective=mse+adv_cond+adv_uncond
# 17. conditional only and unconditional only, w0, at a 10x higher student lr (5e-5)
for kind in cond uncond; do
  one_step $RUN /tmp/ob/${kind}_w0_lr5e-5 $ONLY --set "stages.4.phases=[{kind: mse, samples: 4800}, {kind: adv_$kind}]" \
    --set stages.4.mse_weight=0 --set stages.4.optim.lr=5e-5
done
# 18. a D given more steps: alone for 1,600 samples, then 4 D steps per student step (the student's 150 steps
#     kept: 11,200 samples in all), w0, student lr 5e-5; unconditional and conditional (19: 8 D steps, the
#     paper's order cond then uncond, and the unconditional 4-step variant on seed 1)
D="--set stages.4.disc.warmup_samples=1600 --set stages.4.mse_weight=0 --set stages.4.optim.lr=5e-5"
for kind in cond uncond; do
  one_step $RUN /tmp/ob/${kind}_d4 $ONLY --set "stages.4.phases=[{kind: mse, samples: 4800}, {kind: adv_$kind, samples: 11200}]" \
    $D --set stages.4.disc.steps_per_student_step=4
done
one_step /tmp/ob/seed1 /tmp/ob/uncond_d4_seed1 --set run.seed=1 $ONLY \
  --set 'stages.4.phases=[{kind: mse, samples: 4800}, {kind: adv_uncond, samples: 11200}]' $D --set stages.4.disc.steps_per_student_step=4
one_step $RUN /tmp/ob/uncond_d8 $ONLY --set 'stages.4.phases=[{kind: mse, samples: 4800}, {kind: adv_uncond, samples: 20800}]' \
  $D --set stages.4.disc.steps_per_student_step=8
one_step $RUN /tmp/ob/both_d4 $ONLY \
  --set 'stages.4.phases=[{kind: mse, samples: 4800}, {kind: adv_cond, samples: 11200}, {kind: adv_uncond, samples: 11200}]' \
  $D --set stages.4.disc.steps_per_student_step=4
# 20. which part of 18 counts: its warm-up and lr with 1 D step per student step; and 18 with the student's steps
#     doubled (300: 20,800 samples)
one_step $RUN /tmp/ob/uncond_d1 $ONLY --set 'stages.4.phases=[{kind: mse, samples: 4800}, {kind: adv_uncond, samples: 4000}]' $D
for kind in uncond cond; do
  one_step $RUN /tmp/ob/${kind}_d4_long $ONLY \
    --set "stages.4.phases=[{kind: mse, samples: 4800}, {kind: adv_$kind, samples: 20800}]" $D --set stages.4.disc.steps_per_student_step=4
done
# all of them on 1,000 prompts (the teacher's samples from 13's cache)
models=""
for m in run:recipe_seed0 seed1:recipe_seed1 cond_w0:cond_w0 uncond_w0:uncond_w0 both_w0:cond_uncond_w0 \
    both_w100:cond_uncond_w100 cond_w0_lr5e-5:cond_w0_lr5e-5 uncond_w0_lr5e-5:uncond_w0_lr5e-5 cond_d4:cond_d4 \
    uncond_d4:uncond_d4 uncond_d4_seed1:uncond_d4_seed1 uncond_d8:uncond_d8 both_d4:cond_uncond_d4 uncond_d1:uncond_d1 \
    uncond_d4_long:uncond_d4_long cond_d4_long:cond_d4_long; do
  models="$models --model /tmp/ob/${m%%:*}/exports/stage5_1 --label ${m#*:}"
done
OMP_NUM_THREADS=2 $PY eval/fid_patch.py --reference shapes --backend shapes --objects 2 --position-in-caption 0.5 \
  --texture stripes --dots 8 --count 1000 --bootstrap 200 --no-tensorboard --out $OUT/one_step_objectives \
  --teacher $RUN/exports/teacher --teacher-cache /tmp/ob/tcache --guidance 1.0 --lora none $models
$PY bench/d_curve.py --run cond_w0=/tmp/ob/cond_w0 --run uncond_w0=/tmp/ob/uncond_w0 --run cond_w0_lr5e-5=/tmp/ob/cond_w0_lr5e-5 \
  --run uncond_w0_lr5e-5=/tmp/ob/uncond_w0_lr5e-5 --stage stage5_1 --window 400 --out $OUT/d_curve_stage5_1_objectives.md
$PY bench/d_curve.py --run cond_d4=/tmp/ob/cond_d4 --run uncond_d4=/tmp/ob/uncond_d4 --run uncond_d4_seed1=/tmp/ob/uncond_d4_seed1 \
  --run uncond_d1=/tmp/ob/uncond_d1 --stage stage5_1 --window 800 --out $OUT/d_curve_stage5_1_d_steps.md
$PY bench/d_curve.py --run uncond_d4_long=/tmp/ob/uncond_d4_long --run cond_d4_long=/tmp/ob/cond_d4_long \
  --run uncond_d8=/tmp/ob/uncond_d8 --stage stage5_1 --window 1600 --out $OUT/d_curve_stage5_1_d_steps_long.md
for phase in 0 1; do
  $PY bench/d_curve.py --run cond_uncond_d4=/tmp/ob/both_d4 --stage stage5_1 --phase $phase --window 1600 \
    --out $OUT/d_curve_stage5_1_cond_uncond_d4_phase$phase.md
done
