#!/bin/bash
# Stage 3: the recipe's stages[2] (8 -> 4 steps, adversarial in configs/shapes.yaml), one task per GPU.
# Its teacher is stage 2's export under the same run.out_dir.
#   CONFIG=configs/my.yaml sbatch -p <partition> -A <account> --nodes=4 slurm/stage3.sh [--set key=value ...]
# Variables and preemption behaviour: slurm/common.sh.
#SBATCH --job-name=lightning-stage3
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
lightning_job --stage 3 "$@"
