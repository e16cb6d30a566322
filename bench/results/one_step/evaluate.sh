#!/bin/bash
# Scores the table's one-step students, their MSE-phase starts and each setting of commands.sh (3 seeds each)
# at 1 step on 1,000 images in one run (shared prompts and noise), then compares each with the table's rows.
# SETTING/mse scores that setting's own MSE-phase result (a FROM=x0 setting of commands.sh) as SETTING_mse.
# usage: [OUT=FOLDER] bash bench/results/one_step/evaluate.sh SETTING[/mse]...
set -e
cd "$(dirname "$0")/../../.."
RUNS=${ONE_STEP_RUNS:-/tmp/one_step}  # where the settings are trained
PY=.venv/bin/python
out=${OUT:-bench/results/one_step/eval}
models=()
for seed in 0 1 2; do
  src=runs/table/lightning$([ $seed = 0 ] || echo _seed$seed)
  models+=(--model $src/exports/stage5_1 --label table/seed$seed)
  models+=(--model $src/jobs/stage5_1/stage5_1.1_mse/result --label mse_phase/seed$seed)
done
for name in "$@"; do
  case $name in
    */mse) setting=${name%/mse}; result=jobs/stage5_1/stage5_1.1_mse/result; label=${setting}_mse ;;
    *) setting=$name; result=exports/stage5_1; label=$name ;;
  esac
  for seed in 0 1 2; do models+=(--model $RUNS/$setting/seed$seed/$result --label $label/seed$seed); done
done
$PY eval/fid_patch.py --reference shapes --backend shapes --count 1000 --steps 1 --guidance 1 --no-tensorboard \
  --save-features --out $out "${models[@]}"
$PY bench/paired.py $out --baseline table | tee $out/paired.txt
