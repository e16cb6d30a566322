#!/bin/bash
# One-step stage settings against the table's (2026-11-29): each setting retrains only the one-step stage's
# adversarial phase, from each table seed's own x0 -> MSE result (runs/table/lightning{,_seed1,_seed2}), with
# that seed, so every row pairs with the table's full-method 1-step row of the same seed.
# The settings vary the table's one-step stage as it was then (mse_weight 1; the recipe's is now 100): that
# baseline is set first, a setting's own --set after it overrides it.
# The table's runs change with the recipe: the settings of "The one-step stage's MSE phase" (bench/README) ran
# on the MSE phase of lr 2e-5 for 2,400 samples, those since on the recipe's (lr 1e-4 for 4,800).
# FROM=x0 retrains the MSE phase too (from the seed's x0 conversion), for settings of the MSE phase.
# usage: [FROM=x0] bash bench/results/one_step/commands.sh NAME [--set KEY=VALUE ...]
set -e
cd "$(dirname "$0")/../../.."
RUNS=${ONE_STEP_RUNS:-/tmp/one_step}  # where the settings are trained
PY=.venv/bin/python
FROM=${FROM:-mse}  # the last phase copied from the table's run: mse | x0
phases=$([ "$FROM" = x0 ] && echo stage5_1.0_x0 || echo "stage5_1.0_x0 stage5_1.1_mse")
name=$1; shift
for seed in 0 1 2; do
  src=runs/table/lightning$([ $seed = 0 ] || echo _seed$seed)
  out=$RUNS/$name/seed$seed
  if [ ! -f $out/exports/stage5_1/export.json ]; then
    rm -rf $out; mkdir -p $out/exports $out/jobs/stage5_1
    cp -a $src/grid_prompts.safetensors $out/
    cp -a $src/exports/stage4_2 $out/exports/
    for phase in $phases; do cp -a $src/jobs/stage5_1/$phase $out/jobs/stage5_1/; done
    $PY -m trainer.run --config $src/config.yaml --set run.out_dir=$out \
      --set data.shards=$PWD/runs/table/lightning/shards --jobs stage5_1 --set stages.4.mse_weight=1 "$@" > $out/train.log 2>&1
  fi
done
