# How the runs behind bench/results/shapes_table.md (2026-12-07, twelfth session) were made, as they ran.
# The full method: runs/lora_chain/seed0 (bench/results/lora_chain/commands.sh; seeds 1-2 there became
# runs/table/lightning_seed1, _seed2). MSE-only and conditional-only, with the overrides of bench/shapes_table.py's
# OVERRIDES (stage 1 copied from the main job's run), trained before the table so that the CPU ran one job at a time:

cd /work/main
PY=/tmp/fresh/.venv/bin/python
export OMP_NUM_THREADS=2
MSE="--set stages.1.objective=mse --set stages.1.variant=full --set stages.2.objective=mse --set stages.2.variant=full --set stages.3.objective=mse --set stages.3.variant=full --set stages.4.objective=mse --set stages.4.variant=full"
COND="--set stages.1.objective=adv_cond --set stages.1.variant=lora --set stages.2.objective=adv_cond --set stages.2.variant=lora --set stages.3.objective=adv_cond --set stages.3.variant=lora"
for M in mse cond; do
  if [ $M = mse ]; then OV="$MSE"; else OV="$COND"; fi
  for S in 0 1 2; do
    O=runs/methods/$M/seed$S
    mkdir -p $O/exports
    if [ $S = 0 ]; then cp -r runs/shapes_x0/exports/stage1_32 $O/exports/
    else for e in stage1_32 stage2_8 stage3_4 stage3_4_lora; do [ -d runs/methods/$M/seed0/exports/$e ] && cp -r runs/methods/$M/seed0/exports/$e $O/exports/; done; fi
    echo "$(date +%T) $M seed $S"
    $PY -m trainer.run --config configs/shapes.yaml --set run.out_dir=$O --set data.shards=runs/shapes_x0/shards $OV --set run.seed=$S > $O.log 2>&1
  done
done
echo "$(date +%T) done"

# then the table, which found every export finished (each trainer call ~4 s: grids only) and scored them:
mkdir -p runs/table
cp -r runs/shapes_x0/shards runs/lora_chain/seed0/shards
mv runs/lora_chain/seed1 runs/table/lightning_seed1
mv runs/lora_chain/seed2 runs/table/lightning_seed2
mv runs/methods/mse/seed0 runs/table/mse
mv runs/methods/mse/seed1 runs/table/mse_seed1
mv runs/methods/mse/seed2 runs/table/mse_seed2
mv runs/methods/cond/seed0 runs/table/adv_cond
mv runs/methods/cond/seed1 runs/table/adv_cond_seed1
mv runs/methods/cond/seed2 runs/table/adv_cond_seed2
echo "$(date +%T) table start"
OMP_NUM_THREADS=2 /tmp/fresh/.venv/bin/python bench/shapes_table.py --seeds 0,1,2 --reuse-lightning runs/lora_chain/seed0
echo "$(date +%T) table done"
