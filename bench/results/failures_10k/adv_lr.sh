#!/bin/bash
# The one-step stage's adversarial phase at a lower student lr or shorter: its second copies against its
# FID-Patch gain (2026-12-07, fifteenth session). Each variant reruns only the adversarial phase of seed 0's
# one-step stage (its MSE phase's result copied: the same start), then all at one step on the same 10,000
# prompts and noise as steps1/ (the recipe's export there: 6 copies, FID-Whole 5.47, FID-Patch 31.56).
set -ex
PY=${PY:-.venv/bin/python}
SRC=${SRC:-runs/lora_chain/seed0}
variant() {  # $1 = out dir, the rest: --set overrides of stage5_1 (stages.4); SRC = the run copied
  PY=$PY KEEP=stage5_1.0_mse bash bench/rerun_stage.sh $SRC $1 stage5_1 "${@:2}"
}
variant /tmp/advlr/recipe
variant /tmp/advlr/lr2.5e-6 --set stages.4.optim.lr=2.5e-6
variant /tmp/advlr/lr1.25e-6 --set stages.4.optim.lr=1.25e-6
variant /tmp/advlr/half --set stages.4.samples=1200
args=()
for v in recipe lr2.5e-6 lr1.25e-6 half; do
  args+=(--model /tmp/advlr/$v/exports/stage5_1 --label adv_phase/$v --guidance 1.0 --lora none)
done
OMP_NUM_THREADS=2 $PY eval/fid_patch.py --reference shapes --backend shapes --count 10000 \
  --out bench/results/failures_10k/steps1_adv_lr --no-tensorboard --bootstrap 0 --steps 1 "${args[@]}"
# seeds 1 and 2 of the table at the lowest lr (their recipe exports: 6 and 8 copies in steps1/)
for seed in 1 2; do
  SRC=runs/table/lightning_seed$seed variant /tmp/advlr/seed${seed}_lr1.25e-6 --set stages.4.optim.lr=1.25e-6
done
OMP_NUM_THREADS=2 $PY eval/fid_patch.py --reference shapes --backend shapes --count 10000 \
  --out bench/results/failures_10k/steps1_adv_lr_seeds --no-tensorboard --bootstrap 0 --steps 1 \
  --model /tmp/advlr/seed1_lr1.25e-6/exports/stage5_1 --label adv_phase/lr1.25e-6/seed1 --guidance 1.0 --lora none \
  --model /tmp/advlr/seed2_lr1.25e-6/exports/stage5_1 --label adv_phase/lr1.25e-6/seed2 --guidance 1.0 --lora none
