# Where in the chain the second copies start (2026-12-07, thirteenth session): each earlier stage's export of the
# full method's seed 0, and MSE-only's 2-step export, run at one step on the same 10,000 prompts and noise.
cd /work/main
OMP_NUM_THREADS=2 /tmp/fresh/.venv/bin/python eval/fid_patch.py --reference shapes --backend shapes --count 10000 \
  --out bench/results/failures_10k/steps1_chain --no-tensorboard --bootstrap 0 --steps 1 \
  --model runs/lora_chain/seed0/exports/stage1_32 --label stage1_32/seed0 --guidance 1.0 --lora none \
  --model runs/lora_chain/seed0/exports/stage2_8 --label stage2_8/seed0 --guidance 1.0 --lora none \
  --model runs/lora_chain/seed0/exports/stage3_4 --label stage3_4/seed0 --guidance 1.0 --lora none \
  --model runs/lora_chain/seed0/exports/stage4_2 --label stage4_2/seed0 --guidance 1.0 --lora none \
  --model runs/table/mse/exports/stage4_2 --label mse_stage4_2/seed0 --guidance 1.0 --lora none
