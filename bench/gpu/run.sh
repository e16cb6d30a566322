#!/usr/bin/env bash
# The GPU check, one short run (#7): SDXL-size distillation steps (LoRA micro-batch 4; full micro-batch 1
# with and without optimizer offload), MFU and peak memory, then the memory model against the peaks.
#   here:  bash bench/gpu/fetch_wheels.sh            (once; fills .whl/)
#   there: bash bench/gpu/run.sh                     (through the device tool, carry [".whl"]; results in $OUT)
#   smoke test on a CPU: PRESET=tiny bash bench/gpu/run.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu_check}
PRESET=${PRESET:-sdxl}
mkdir -p "$OUT"
if [[ "$PRESET" != tiny ]] && compgen -G ".whl/*.whl" > /dev/null; then  # (the smoke test uses .venv)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/site
fi
PYTHON=${PYTHON:-python3}
[[ -x .venv/bin/python && "$PRESET" == tiny ]] && PYTHON=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi 2>/dev/null | head -15
"$PYTHON" -c "import torch, deepspeed, diffusers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'deepspeed', deepspeed.__version__, 'diffusers', diffusers.__version__)"
status=0
run() { echo "== $*"; "$PYTHON" bench/step.py --preset "$PRESET" --iters 5 --warmup 2 --json "$OUT/step.json" "$@" 2>&1 \
        | grep -v -i "warn" | tee -a "$OUT/log.txt" || status=1; }
run --mode lora --micro-batch 4
run --mode full --micro-batch 1 --offload
run --mode full --micro-batch 1          # the memory model says this does not fit 80 GB: an OOM is the expected answer
run --mode lora --micro-batch 4 --objective mse --student-steps 32
"$PYTHON" bench/memory.py --preset "$PRESET" --compare "$OUT/step.json" > "$OUT/memory_compare.md" 2>&1 || status=1
tail -25 "$OUT/memory_compare.md"
exit $status
