# How bench/results/one_step_mse_decay/ was made (2026-12-06, sixth session; 2-core Intel Xeon with AVX-512).
# The baseline is the main job of 3234fa1 (`bash scripts/main.sh` in a fresh clone, runs/shapes).
# Arm "cos": the one-step stage retrained from that run's stage4_2 with its MSE phase's lr on a cosine to 0:
R=runs/cos && mkdir -p $R/exports $R/jobs && cp -r runs/shapes/shards runs/shapes/grid_prompts.safetensors $R/
for s in stage1_32 stage2_8 stage2_8_lora stage3_4 stage3_4_lora stage4_2 stage4_2_lora; do cp -r runs/shapes/exports/$s $R/exports/; done
for s in stage1_32 stage2_8 stage3_4 stage4_2; do cp -r runs/shapes/jobs/$s $R/jobs/; done
python -m trainer.run --config configs/shapes.yaml --set run.out_dir=runs/cos --set stages.4.mse_optim.decay=cosine --jobs stage5_1
# Arms "cos_lr2e5" and "cos_long": the same cosine MSE phase (copied: the trainer reruns only the adversarial
# phase), then the adversarial phase at 4x the student lr, or for twice the samples:
for arm in lr2e5 long; do R=runs/cos_$arm; cp -r runs/cos $R; rm -rf $R/jobs/stage5_1/stage5_1.2_adv_cond $R/exports/stage5_1; done
python -m trainer.run --config configs/shapes.yaml --set run.out_dir=runs/cos_lr2e5 --set stages.4.mse_optim.decay=cosine --set stages.4.optim.lr=2e-5 --jobs stage5_1
python -m trainer.run --config configs/shapes.yaml --set run.out_dir=runs/cos_long --set stages.4.mse_optim.decay=cosine --set stages.4.samples=4800 --jobs stage5_1
# All four on the same 1,000 prompts and noises, paired against the baseline:
python eval/fid_patch.py --model runs/shapes/exports/stage5_1 --label base/seed0 --model runs/cos/exports/stage5_1 --label cos/seed0 \
  --model runs/cos_lr2e5/exports/stage5_1 --label cos_lr2e5/seed0 --model runs/cos_long/exports/stage5_1 --label cos_long/seed0 \
  --teacher assets/shapes_teacher --reference shapes --count 1000 --save-features --out bench/results/one_step_mse_decay --no-tensorboard
python bench/paired.py bench/results/one_step_mse_decay --baseline base > bench/results/one_step_mse_decay/paired.txt
