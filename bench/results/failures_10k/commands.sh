# The one-step failure signatures at 10,000 images (2026-12-07, thirteenth session): the 32-step teacher and the
# full method's three one-step students of the table and MSE-only's seed 0 (runs as in bench/results/shapes_table_runs.sh).
cd /work/main
OMP_NUM_THREADS=2 /tmp/fresh/.venv/bin/python eval/fid_patch.py --reference shapes --backend shapes --count 10000 \
  --out bench/results/failures_10k --no-tensorboard --bootstrap 0 \
  --steps 32 --model assets/shapes_teacher --label teacher --guidance 1.25 --lora none
OMP_NUM_THREADS=2 /tmp/fresh/.venv/bin/python eval/fid_patch.py --reference shapes --backend shapes --count 10000 \
  --out bench/results/failures_10k/steps1 --no-tensorboard --bootstrap 0 --steps 1 \
  --model runs/lora_chain/seed0/exports/stage5_1 --label lightning/full/seed0 --guidance 1.0 --lora none \
  --model runs/table/lightning_seed1/exports/stage5_1 --label lightning/full/seed1 --guidance 1.0 --lora none \
  --model runs/table/lightning_seed2/exports/stage5_1 --label lightning/full/seed2 --guidance 1.0 --lora none \
  --model runs/table/mse/exports/stage5_1 --label mse/full/seed0 --guidance 1.0 --lora none
