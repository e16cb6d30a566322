#!/bin/bash
# Does the one-step stage or its starting point make the second copies? (2026-12-07, fourteenth session)
# full_from_mse: the full method's one-step stage (seed 0's config) started from MSE-only's 2-step export;
# mse_from_full: MSE-only's one-step stage started from the full method's 2-step export. Then both at one
# step on the same 10,000 prompts and noise as steps1/ (the unswapped stages' counts are there).
set -ex
PY=${PY:-.venv/bin/python}
setup() {  # $1 = run whose config and data to use, $2 = the 2-step export to start from, $3 = out dir
  rm -rf $3; mkdir -p $3/exports
  cp -a $1/{config.yaml,grid_prompts.safetensors} $3/
  [ -d $1/shards ] && cp -a $1/shards $3/  # else the config names its shards
  for s in stage1_32 stage2_8 stage3_4; do cp -a $1/exports/$s $3/exports/; done
  cp -a $2 $3/exports/stage4_2
}
setup runs/lora_chain/seed0 runs/table/mse/exports/stage4_2 /tmp/swap/full_from_mse
$PY -m trainer.run --config runs/lora_chain/seed0/config.yaml --set run.out_dir=/tmp/swap/full_from_mse --jobs stage5_1
setup runs/table/mse runs/lora_chain/seed0/exports/stage4_2 /tmp/swap/mse_from_full
$PY -m trainer.run --config runs/table/mse/config.yaml --set run.out_dir=/tmp/swap/mse_from_full --jobs stage5_1
OMP_NUM_THREADS=2 $PY eval/fid_patch.py --reference shapes --backend shapes --count 10000 \
  --out bench/results/failures_10k/steps1_swap --no-tensorboard --bootstrap 0 --steps 1 \
  --model /tmp/swap/full_from_mse/exports/stage5_1 --label full_from_mse/seed0 --guidance 1.0 --lora none \
  --model /tmp/swap/mse_from_full/exports/stage5_1 --label mse_from_full/seed0 --guidance 1.0 --lora none
