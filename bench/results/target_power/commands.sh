# bench/target_power.py on the table's exports (2026-12-07, thirteenth session; 6 min on 2 cores). The runs layout is
# bench/results/shapes_table_runs.sh's: the full method's seed 0 in runs/lora_chain/seed0, everything else in runs/table.
cd /work/main
OMP_NUM_THREADS=2 /tmp/fresh/.venv/bin/python bench/target_power.py --runs runs/table --lightning runs/lora_chain/seed0 \
  > bench/results/target_power/output.txt
