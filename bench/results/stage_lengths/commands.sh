# How bench/results/stage_lengths/ was made (2026-11-29, fifth session; 2-core AVX2-only EPYC).
# 1. The recipe as it was (LoRA phases 2,400 samples, full phases 1,600 in the 8-, 4- and 2-step stages),
#    with the stage-length probe on from stage 2 (stage 1 has no probe: its 128-step teacher is costly to sample):
python -m trainer.run --config configs/shapes.yaml --set run.out_dir=runs/probe --jobs stage1_32
python -m trainer.run --config configs/shapes.yaml --set run.out_dir=runs/probe \
    --set probe.every_samples=400 --set probe.count=256 --jobs stage2_8,stage3_4,stage4_2,stage5_1
python bench/probe_curves.py runs/probe --out bench/results/stage_lengths
# 2. The shortened recipe (configs/shapes.yaml now), from a copy of that run's stage 1 (unchanged):
mkdir -p runs/short/exports runs/short/jobs
cp -r runs/probe/shards runs/probe/grid_prompts.safetensors runs/short/
cp -r runs/probe/exports/stage1_32 runs/short/exports/ && cp -r runs/probe/jobs/stage1_32 runs/short/jobs/
python -m trainer.run --config configs/shapes.yaml --set run.out_dir=runs/short --jobs stage2_8,stage3_4,stage4_2,stage5_1
python bench/phase_speeds.py runs/short --stage "stage[2-5]_*"   # in phase_speeds_short.txt
# 3. Both scored on the same 1,000 prompts and noises, paired:
for pair in "8 stage2_8" "4 stage3_4" "2 stage4_2" "1 stage5_1"; do
  set -- $pair
  python eval/fid_patch.py --model runs/probe/exports/$2 --label recipe/seed0 --model runs/short/exports/$2 --label short/seed0 \
    --reference shapes --count 1000 --save-features --out bench/results/stage_lengths/steps$1 --no-tensorboard
  python bench/paired.py bench/results/stage_lengths/steps$1 --baseline recipe > bench/results/stage_lengths/steps$1/paired.txt
done
