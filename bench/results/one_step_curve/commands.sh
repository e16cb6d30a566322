# How bench/results/one_step_curve/ was made (2026-12-06, eighth session; 2-core Intel Xeon with AVX-512, alone).
# Runs as in bench/results/one_step_mse_decay/commands.sh: runs/shapes is the main job of 3234fa1, runs/cos its
# one-step stage retrained with the MSE phase's lr on a cosine; each new arm copies runs/cos and retrains only
# the adversarial phase (stage5_1.2_adv_cond) with the cosine MSE phase's result as its start:
arm() { name=$1; shift; R=runs/cos_$name; rm -rf $R && cp -r runs/cos $R && rm -rf $R/jobs/stage5_1/stage5_1.2_adv_cond $R/exports/stage5_1
  sets=(); for s in "$@"; do sets+=(--set "$s"); done
  python -m trainer.run --config configs/shapes.yaml --set run.out_dir=$R --set stages.4.mse_optim.decay=cosine "${sets[@]}" --jobs stage5_1; }
arm t10 'stages.4.disc.t_star=[10]' 'stages.4.disc.t_star_weights=[1]' 'stages.4.disc.t_star_late_weights=[1]'
arm w300_lr2e5 stages.4.mse_weight=300 stages.4.optim.lr=2e-5
arm lr1e5 stages.4.optim.lr=1e-5
python eval/fid_patch.py --model runs/shapes/exports/stage5_1 --label base/seed0 --model runs/cos/exports/stage5_1 --label cos/seed0 \
  --model runs/cos_lr2e5/exports/stage5_1 --label cos_lr2e5/seed0 \
  --model runs/cos_t10/exports/stage5_1 --label cos_t10/seed0 --model runs/cos_w300_lr2e5/exports/stage5_1 --label cos_w300_lr2e5/seed0 \
  --model runs/cos_lr1e5/exports/stage5_1 --label cos_lr1e5/seed0 \
  --teacher assets/shapes_teacher --teacher-cache /tmp/ab/teacher_cache --reference shapes --count 1000 --save-features \
  --out bench/results/one_step_curve --no-tensorboard
python bench/paired.py bench/results/one_step_curve --baseline base > bench/results/one_step_curve/paired.txt
