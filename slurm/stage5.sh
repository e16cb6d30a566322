#!/bin/bash
# Stage 5: the recipe's stages[4] (2 -> 1 step: x0 conversion then adversarial in configs/sdxl.yaml; MSE then adversarial in configs/shapes.yaml, whose students predict x0 already), one task per GPU.
# Its teacher is stage 4's export under the same run.out_dir.
#   CONFIG=configs/my.yaml sbatch -p <partition> -A <account> --nodes=4 slurm/stage5.sh [--set key=value ...]
# Variables and preemption behaviour: slurm/common.sh.
#SBATCH --job-name=lightning-stage5
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=USR2@300
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
# sbatch runs a copy of this file from its spool folder: find the project through the submitted path
if [[ -z ${LIGHTNING_SLURM_DIR:-} ]]; then
  LIGHTNING_SLURM_DIR=$(dirname "$(scontrol show job "${SLURM_JOB_ID:-0}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')")
  [[ -f $LIGHTNING_SLURM_DIR/common.sh ]] || LIGHTNING_SLURM_DIR=$(dirname "${BASH_SOURCE[0]}")
fi
source "$LIGHTNING_SLURM_DIR/common.sh"
lightning_job --stage 5 "$@"
