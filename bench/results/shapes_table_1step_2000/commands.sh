#!/bin/bash
# the 1-step rows of the shapes table again at 2,000 images (seeds 0-2 of the full method, MSE-only,
# conditional-only), then the table's paired decisions on them
set -e
cd /work/main
PY=python
args=()
for m in lightning mse adv_cond; do
  for s in 0 1 2; do
    if [ $m = lightning ] && [ $s = 0 ]; then d=runs/shapes_x0
    elif [ $s = 0 ]; then d=runs/table_x0/$m
    else d=runs/table_x0/${m}_seed$s; fi
    args+=(--model $d/exports/stage5_1 --label $m/full/seed$s --guidance 1.0 --lora none)
  done
done
$PY eval/fid_patch.py --reference shapes --backend shapes --count 2000 --out bench/results/shapes_table_1step_2000/steps1 --no-tensorboard \
  --save-features --steps 1 "${args[@]}" > bench/results/shapes_table_1step_2000/eval.log 2>&1
$PY - <<'PY'
import json, sys
from pathlib import Path
sys.path.insert(0, ".")
from bench.shapes_table import paired_comparisons, paired_text
labels = {f"{m}/full/seed{s}": (m, "full", s) for m in ("lightning", "mse", "adv_cond") for s in range(3)}
out = paired_comparisons(Path("bench/results/shapes_table_1step_2000"), labels)
json.dump(out, open("bench/results/shapes_table_1step_2000/paired.json", "w"), indent=1, default=float)
for k, p in out.items():
    print(k, paired_text("full method", k.split("/")[1], p))
PY
