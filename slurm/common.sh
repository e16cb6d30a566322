# Shared by slurm/teacher.sh and slurm/stage<N>.sh (sourced, never submitted itself).
#
# Runs one job of the recipe with one srun task per GPU; trainer.run derives rank, local rank, world size
# and the master address/port from SLURM's variables (trainer/runtime/dist_env.py). Preemption: SLURM's warning
# signal (--signal=USR2@<s>, sent to the srun tasks, i.e. the python processes) makes the trainer write a
# checkpoint and exit 75; this script then requeues the job, which resumes from that checkpoint. A job
# killed without warning resumes from its last periodic checkpoint when started again.
#
# What a user changes, without editing any file:
#   CONFIG=configs/my.yaml          the recipe (default configs/shapes.yaml), relative to the submit dir
#   OVERRIDES="k=v k2=v2"           --set overrides (whitespace-separated), or pass them after the script:
#                                   sbatch slurm/stage1.sh --set stages.0.samples=1000
#   PYTHON=/path/to/python          default: the project's .venv, else python3
#   SRUN_WAIT=120                   seconds the other ranks may outlive the first one that exits (a crash
#                                   must not leave the rest hanging in a collective)
#   sbatch -p <partition> -A <account> -N <nodes> --ntasks-per-node=<gpus> --gpus-per-node=<gpus> ...
#   (or SBATCH_PARTITION / SBATCH_ACCOUNT / SBATCH_TIMELIMIT / SBATCH_GPUS_PER_NODE in the environment)

EXIT_PREEMPTED=75  # trainer.run: stopped with a checkpoint written

PROJECT_DIR=$(cd "$LIGHTNING_SLURM_DIR/.." && pwd)
CONFIG=${CONFIG:-configs/shapes.yaml}
OVERRIDES=${OVERRIDES:-}
SRUN_WAIT=${SRUN_WAIT:-120}
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x $PROJECT_DIR/.venv/bin/python ]]; then PYTHON=$PROJECT_DIR/.venv/bin/python; else PYTHON=python3; fi
fi

lightning_log() { echo "[lightning $(date +%H:%M:%S)] $*"; }

# lightning_job <trainer.run arguments that pick the job, e.g. --stage 1> [extra trainer.run arguments]
lightning_job() {
  if [[ -z ${SLURM_JOB_ID:-} ]]; then
    echo "submit this script with sbatch (see slurm/common.sh for the variables it reads)" >&2
    exit 2
  fi
  local args=(-u -m trainer.run --config "$CONFIG" "$@") items item
  read -r -a items <<<"$OVERRIDES"  # split at whitespace, no glob expansion ([1,2] stays as it is)
  for item in "${items[@]}"; do args+=(--set "$item"); done
  export PYTHONPATH=$PROJECT_DIR${PYTHONPATH:+:$PYTHONPATH}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
  lightning_log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST," \
    "${SLURM_NTASKS:-1} tasks, in $PWD: $PYTHON ${args[*]}"

  # srun in the background so that this shell can forward signals and read the exit code. The python
  # tasks get SLURM's USR2 themselves (--signal without B:); a USR2 sent to this shell only
  # (scancel --batch, --signal=B:USR2@...) is passed on. TERM means the job is cancelled or preempted by
  # SLURM, which then decides about a requeue itself.
  local terminating=0 rc=0
  srun --wait="$SRUN_WAIT" --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" "$PYTHON" "${args[@]}" &
  local srun_pid=$!
  trap 'kill -USR2 "$srun_pid" 2>/dev/null || true' USR2
  trap 'terminating=1; kill -TERM "$srun_pid" 2>/dev/null || true' TERM
  while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid" || true; done  # a trapped signal ends `wait` early
  wait "$srun_pid" || rc=$?
  trap - USR2 TERM

  if ((rc == EXIT_PREEMPTED)) && ((terminating == 0)); then
    lightning_log "checkpoint written (exit $rc): requeueing job $SLURM_JOB_ID; it resumes from the checkpoint"
    if scontrol requeue "$SLURM_JOB_ID"; then exit 0; fi
    lightning_log "requeue refused: submit the same script again to resume"
  else
    lightning_log "srun exited $rc"
  fi
  exit "$rc"
}
