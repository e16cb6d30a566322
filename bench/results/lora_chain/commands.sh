# The records of the commands as they ran (2026-12-07, twelfth session), cwd the repository root.
# runs/shapes_x0: the main job of 5d024ba (python -m trainer.run --config configs/shapes.yaml --set run.out_dir=runs/shapes_x0)
# The chain with LoRA-only 8-, 4- and 2-step stages, seed 0, from the main job's 32-step export:
mkdir -p runs/lora_chain/seed0/exports && cp -r runs/shapes_x0/exports/stage1_32 runs/lora_chain/seed0/exports/
python -m trainer.run --config configs/shapes.yaml --jobs stage2_8,stage3_4,stage4_2,stage5_1 \
  --set run.out_dir=runs/lora_chain/seed0 --set data.shards=runs/shapes_x0/shards \
  --set stages.1.variant=lora --set stages.2.variant=lora --set stages.3.variant=lora        # 530 s
# Seeds 1 and 2: the 2- and 1-step stages from seed 0's 4-step student and LoRA (as bench/shapes_table.py seeds them)
for S in 1 2; do
  mkdir -p runs/lora_chain/seed$S/exports
  for e in stage1_32 stage2_8 stage3_4 stage3_4_lora; do cp -r runs/lora_chain/seed0/exports/$e runs/lora_chain/seed$S/exports/; done
  python -m trainer.run --config configs/shapes.yaml --set run.out_dir=runs/lora_chain/seed$S --set data.shards=runs/shapes_x0/shards \
    --set stages.1.variant=lora --set stages.2.variant=lora --set stages.3.variant=lora --set run.seed=$S   # 435, 449 s
done
# Scores: seed0_vs_recipe/results.md and seeds12/results.md hold each eval's own command line; then
python bench/paired.py runs/lora_chain/eval_seed0 --baseline recipe/full       # seed0_vs_recipe/paired.json
