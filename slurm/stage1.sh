#!/bin/bash
# Stage 1: the recipe's stages[0] (128 -> 32 steps, MSE against the CFG teacher in configs/shapes.yaml), one task per GPU.
# Its teacher is the teacher (slurm/teacher.sh's export, teacher.init, or the base model) under the same run.out_dir.
#   CONFIG=configs/my.yaml sbatch -p <partition> -A <account> --nodes=4 slurm/stage1.sh [--set key=value ...]
# Variables and preemption behaviour: slurm/common.sh.
#SBATCH --job-name=lightning-stage1
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
lightning_job --stage 1 "$@"
