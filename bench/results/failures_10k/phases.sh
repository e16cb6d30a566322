# Which one-step phase makes the second copies (2026-12-07, thirteenth session): the one-step stage's MSE phase
# result (stage5_1.0_mse) of each seed, on the same 10,000 prompts and noise as steps1/ (its adversarial phase's
# result is the stage's export, scored there).
cd /work/main
OMP_NUM_THREADS=2 /tmp/fresh/.venv/bin/python eval/fid_patch.py --reference shapes --backend shapes --count 10000 \
  --out bench/results/failures_10k/steps1_mse_phase --no-tensorboard --bootstrap 0 --steps 1 \
  --model runs/lora_chain/seed0/jobs/stage5_1/stage5_1.0_mse/result --label mse_phase/seed0 --guidance 1.0 --lora none \
  --model runs/table/lightning_seed1/jobs/stage5_1/stage5_1.0_mse/result --label mse_phase/seed1 --guidance 1.0 --lora none \
  --model runs/table/lightning_seed2/jobs/stage5_1/stage5_1.0_mse/result --label mse_phase/seed2 --guidance 1.0 --lora none
