"""`python -m trainer.launch --config configs/sdxl.yaml`: the whole progression as cluster jobs, through submitit.

    python -m trainer.launch --config configs/sdxl.yaml --partition gpu --nodes 4          # all jobs, chained
    python -m trainer.launch --config configs/sdxl.yaml --stages 3-5 --no-wait             # stages 3..5 only
    python -m trainer.launch --config configs/shapes.yaml --dry-run                       # print, submit nothing
    python -m trainer.launch --config configs/smoke.yaml --executor local --tasks-per-node 2

One job per job of the progression (the toy teacher when the recipe trains one, then each stage), each
depending `afterok` on the one before: a failing job leaves its dependents cancelled, never run. Jobs whose
export is already complete are skipped, so running the same command again submits only what is missing.
`--stages A-B` picks recipe stages A..B (1 = stages[0], 0 = the teacher). The config is validated before
anything is submitted (a bad one: one line, exit code 2).

Inside a job, every task is one rank: the distributed environment comes from submitit's JobEnvironment
(global rank, local rank, task count; rank 0's host is the master), then trainer.run's main runs the
job. Preemption: SLURM's USR2 warning (and SIGTERM) reach the trainer, which writes a checkpoint before
its next micro-step (trainer/runtime/preemption.py) and returns 75; the task then hands over to submitit's own preemption handler, which
calls `ClusterTask.checkpoint()` (the same job again) and requeues it; the requeued job resumes from that
checkpoint. A USR2 that arrives before trainer.run's main installed its handler goes straight to submitit's.

Executors: `slurm` (the default where `sbatch` exists) or `local` (submitit's local executor: the jobs
run one after the other on this machine, chained by this process, which therefore waits for them).
Exit codes: 0 every job done; 1 a job failed or was cancelled, or sbatch refused a job; 2 bad config or
arguments, a missing input (model folder part, shards, DeepSpeed JSON, unwritable output folder: one line
each, also with --dry-run), or an earlier launch of the same run is still queued: nothing submitted.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from submitit.helpers import Checkpointable

from trainer.config import Config, ConfigError, load_config
from trainer.export import is_complete
from trainer.runtime.preflight import problems
from trainer.run import EXIT_CONFIG, EXIT_JOB_FAILED, EXIT_PREEMPTED

ROOT = Path(__file__).resolve().parents[1]
# sacct states of a job that has ended, for good once squeue no longer lists it (a requeued job is listed
# again as PENDING; a preempted one is too when the cluster requeues preempted jobs)
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
                "PREEMPTED", "REVOKED")


# -- the plan -----------------------------------------------------------------------------------


@dataclass
class ClusterJob:
    """One cluster job of the launch plan: a job of the recipe (the teacher, or a stage with all its phases)
    and its submission's state."""
    number: int  # 0: the teacher; N: the recipe's N-th stage (what slurm/stageN.sh runs)
    name: str  # the job's name in the recipe: trainer.run --jobs <name>
    export: Path
    done: bool = False  # its export is complete: skipped
    job_id: str = ""  # once submitted
    after: str = ""  # the job it waits for (afterok)
    state: str = ""
    note: str = ""
    extra: dict = field(default_factory=dict)  # start, end, elapsed, exit code


def trains_teacher(cfg: Config) -> bool:
    return not cfg.teacher.init and cfg.teacher.samples > 0


def plan_jobs(cfg: Config) -> list[ClusterJob]:
    """The progression's jobs in order, each marked done when its export is complete."""
    jobs = []
    if trains_teacher(cfg):
        jobs.append(ClusterJob(0, "teacher", cfg.out_dir / "exports" / "teacher"))
    for i, stage in enumerate(cfg.stages):
        jobs.append(ClusterJob(i + 1, stage.name, cfg.out_dir / "exports" / stage.name))
    for job in jobs:
        job.done = is_complete(job.export)
    return jobs


def parse_stages(text: str, last: int) -> tuple[int, int]:
    """`2-4`, `3`, `2-` or `-3` -> an inclusive range of stage numbers (0 = the teacher)."""
    try:
        if "-" in text:
            lo, hi = text.split("-", 1)
            rng = (int(lo) if lo else 0, int(hi) if hi else last)
        else:
            rng = (int(text), int(text))
    except ValueError:
        raise ConfigError(f"--stages '{text}': expected A-B, A, A- or -B with stage numbers (0 = the teacher)") from None
    if not 0 <= rng[0] <= rng[1] <= last:
        raise ConfigError(f"--stages '{text}': the recipe's jobs are numbered 0 (teacher) to {last}")
    return rng


def select_jobs(cfg: Config, jobs: list[ClusterJob], stages: str) -> list[ClusterJob]:
    """The jobs to submit; raises ConfigError when the first one's teacher will not be there."""
    lo, hi = parse_stages(stages, len(cfg.stages)) if stages else (0, len(cfg.stages))
    chosen = [j for j in jobs if lo <= j.number <= hi]
    todo = [j for j in chosen if not j.done]
    if todo:
        first = todo[0]
        before = [j for j in jobs if j.number < first.number]
        if before and not before[-1].done and before[-1] not in chosen:
            raise ConfigError(f"{cfg.source}: job '{first.name}' needs its teacher, the export of '{before[-1].name}' "
                              f"({before[-1].export}), which is not complete: include it (--stages {before[-1].number}-{hi})")
    return chosen


# -- what runs inside a job ---------------------------------------------------------------------


def distributed_env(job_env) -> dict[str, str]:
    """torch.distributed's variables for this task from submitit's JobEnvironment."""
    from trainer.runtime.dist_env import master_port

    hosts = list(job_env.hostnames) if job_env.cluster == "slurm" else ["127.0.0.1"]
    job_id = int("".join(ch for ch in str(job_env.raw_job_id) if ch.isdigit()) or 0)
    return {
        "RANK": str(job_env.global_rank),
        "LOCAL_RANK": str(job_env.local_rank),
        "WORLD_SIZE": str(job_env.num_tasks),
        "LOCAL_WORLD_SIZE": str(max(1, job_env.num_tasks // max(1, job_env.num_nodes))),
        "NODE_RANK": str(job_env.node),
        "MASTER_ADDR": hosts[0],
        "MASTER_PORT": str(master_port(job_id, int(os.environ.get("SLURM_RESTART_COUNT", "0")))),
    }


def _slurm_job_running(job_id: str) -> bool:
    """False once SLURM is cancelling or preempting the job itself (then it decides about a requeue)."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return True
    return out.stdout.strip() in ("", "RUNNING")


class ClusterTask(Checkpointable):
    """What every task (rank) of a cluster job runs: `python -m trainer.run --jobs <the job>`.

    Checkpointable: on preemption submitit pickles `checkpoint()`'s result (this same job: all state the
    trainer needs is in its checkpoints on disk) and requeues it."""

    def __init__(self, config: str, overrides: list[str], job: str, workdir: str):
        self.config, self.overrides, self.job, self.workdir = config, list(overrides), job, workdir

    def argv(self) -> list[str]:
        out = ["--config", self.config, "--jobs", self.job]
        for item in self.overrides:
            out += ["--set", item]
        return out

    def __call__(self) -> int:
        import submitit

        job_env = submitit.JobEnvironment()
        os.chdir(self.workdir)  # the recipe's relative paths mean what they meant where it was launched
        os.environ.update(distributed_env(job_env))
        submitit_handler = signal.getsignal(signal.SIGUSR2)  # submitit's checkpoint-and-requeue
        from trainer.run import main

        rc = main(self.argv())
        if rc == EXIT_PREEMPTED:
            # The trainer took over USR2/TERM and wrote its checkpoint; requeueing is submitit's part.
            # Rank 0 requeues (and exits there); the other ranks return and are restarted with it.
            if job_env.cluster == "slurm" and not _slurm_job_running(job_env.job_id):
                raise RuntimeError(f"{self.job}: checkpoint written, but SLURM is ending the job (cancelled or "
                                   f"preempted by SLURM itself): not requeueing it from here")
            print(f"[launch] {self.job}: checkpoint written (exit {rc}); requeueing", flush=True)
            if callable(submitit_handler):
                submitit_handler(signal.SIGUSR2, None)
            return rc
        if rc != 0:
            raise RuntimeError(f"python -m trainer.run {' '.join(self.argv())} exited {rc}")
        return rc


# -- submission and status ----------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainer.launch", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="YAML recipe (configs/*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key (repeatable), passed to every job")
    p.add_argument("--executor", choices=("slurm", "local"), default=None,
                   help="default: slurm where sbatch exists, else local")
    p.add_argument("--stages", default="", metavar="A-B", help="stage numbers to run (0 = the teacher), e.g. 2-5")
    p.add_argument("--dry-run", action="store_true", help="validate and print the jobs; submit nothing")
    p.add_argument("--no-wait", action="store_true", help="submit and return (slurm only)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--tasks-per-node", type=int, default=8, help="one task per GPU (default 8)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="default: = --tasks-per-node; 0 on CPU clusters")
    p.add_argument("--cpus-per-task", type=int, default=8)
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--timeout-min", type=int, default=24 * 60, help="per job; a job requeues itself after it")
    p.add_argument("--signal-delay-s", type=int, default=300,
                   help="USR2 this long before the time limit, so the job checkpoints and requeues")
    p.add_argument("--folder", default=None, help="submitit's logs and pickles (default <run.out_dir>/launch)")
    p.add_argument("--poll-s", type=float, default=15.0, help="status table refresh")
    return p.parse_args(argv)


def _run(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout


def slurm_states(ids: list[str]) -> dict[str, dict]:
    """squeue's view while a job is queued or running (with the pending reason), else sacct's (the
    latest run of a requeued job: submitit's watcher needs sacct too)."""
    ids = [i for i in ids if i]
    if not ids:
        return {}
    info: dict[str, dict] = {}
    fields = ["JobID", "State", "ExitCode", "Start", "End", "Elapsed"]
    for line in _run(["sacct", "-X", "-n", "-P", "-j", ",".join(ids), "-o", ",".join(fields)]).splitlines():
        row = dict(zip(fields, line.split("|")))
        if row.get("JobID") in ids:
            row["State"] = row["State"].split()[0]  # "CANCELLED by 0" -> CANCELLED
            info[row["JobID"]] = row
    for line in _run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i|%T|%r"]).splitlines():
        job_id, state, reason = (line.split("|") + ["", ""])[:3]
        row = info.setdefault(job_id, {"JobID": job_id})
        row["State"], row["queued"] = state, True  # squeue is live; sacct may lag behind it
        if reason and reason != "None":
            row["Reason"] = reason
    return info


def print_table(jobs: list[ClusterJob], title: str = "") -> None:
    rows = [("#", "job", "job id", "after", "state", "elapsed", "note")]
    for j in jobs:
        rows.append((str(j.number), j.name, j.job_id or "-", j.after or "-", j.state or "-",
                     j.extra.get("Elapsed", "") or "", j.note))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    if title:
        print(title)
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    sys.stdout.flush()


def make_executor(kind: str, folder: Path, args: argparse.Namespace):
    import submitit

    executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=kind)
    gpus = args.tasks_per_node if args.gpus_per_node is None else args.gpus_per_node
    params = {"nodes": args.nodes, "tasks_per_node": args.tasks_per_node, "cpus_per_task": args.cpus_per_task,
              "timeout_min": args.timeout_min}
    if gpus:
        params["gpus_per_node"] = gpus
    if kind == "slurm":
        params.update(
            slurm_signal_delay_s=args.signal_delay_s,
            # the ranks that outlive a crashed one are stopped after 120 s instead of hanging in a collective
            slurm_srun_args=["--wait=120", f"--cpus-per-task={args.cpus_per_task}"],
            slurm_setup=[f"export PYTHONPATH={ROOT}${{PYTHONPATH:+:$PYTHONPATH}}",
                         f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{args.cpus_per_task}}}"],
            slurm_additional_parameters={"requeue": True, "kill-on-invalid-dep": "yes"},
        )
        if args.partition:
            params["slurm_partition"] = args.partition
        if args.account:
            params["slurm_account"] = args.account
    else:
        os.environ["PYTHONPATH"] = f"{ROOT}{os.pathsep}{os.environ['PYTHONPATH']}" if os.environ.get("PYTHONPATH") else str(ROOT)
    executor.update_parameters(**params)
    return executor


def refuse_if_still_queued(record: Path) -> None:
    """A second launch while the first one's jobs are queued would train the same jobs twice."""
    if not record.is_file() or shutil.which("squeue") is None:
        return
    ids = [j["job_id"] for j in json.loads(record.read_text()).get("jobs", []) if j.get("job_id")]
    alive = _run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i"]).split() if ids else []
    if alive:
        raise RuntimeError(f"jobs {', '.join(alive)} of an earlier launch ({record}) are still queued or running: "
                           f"wait for them or scancel them first")


def submit_slurm(executor, jobs: list[ClusterJob], make_job) -> None:
    previous = ""
    for job in jobs:
        if job.done:
            continue
        params = {"name": f"lightning-{job.name}", "slurm_dependency": f"afterok:{previous}" if previous else None}
        executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
        job.job_id, job.after = executor.submit(make_job(job)).job_id, previous
        print(f"submitted {job.name} as job {job.job_id}" + (f" (afterok:{previous})" if previous else ""), flush=True)
        previous = job.job_id


def wait_slurm(jobs: list[ClusterJob], poll_s: float) -> None:
    by_id = {j.job_id: j for j in jobs if j.job_id}
    shown, seen = None, set()
    while True:
        states = slurm_states(list(by_id))
        for job_id, job in by_id.items():
            row = states.get(job_id, {})
            if row:
                seen.add(job_id)
            # known before, now in neither squeue nor sacct: the cluster keeps no accounting
            job.state = row.get("State", "UNKNOWN" if job_id in seen else "SUBMITTED")
            job.extra = row
            job.note = row.get("Reason", "") if job.state == "PENDING" else ""
            if job.state not in ("PENDING", "RUNNING", "SUBMITTED", "COMPLETED") and row.get("ExitCode", "0:0") != "0:0":
                job.note = f"exit {row['ExitCode']}"
        ended = {j.job_id for j in by_id.values() if j.state in FINAL_STATES and not j.extra.get("queued")}
        failed = [j for j in by_id.values() if j.job_id in ended and j.state != "COMPLETED"]
        for job in by_id.values():  # dependents of a failed job: SLURM cancels them (kill-on-invalid-dep)
            upstream = by_id.get(job.after)
            if upstream is not None and upstream in failed and job.state not in ("COMPLETED", "RUNNING"):
                job.note = f"never ran: {upstream.name} {upstream.state.lower()}"
                if job.job_id not in ended:
                    subprocess.run(["scancel", job.job_id], capture_output=True)
        snapshot = [(j.state, j.note) for j in jobs]
        if snapshot != shown:
            print_table(jobs, time.strftime("[%H:%M:%S]"))
            shown = snapshot
        if all(j.job_id in ended or j.state == "UNKNOWN" for j in by_id.values()):
            return
        time.sleep(poll_s)


def run_local(executor, jobs: list[ClusterJob], make_job, poll_s: float) -> None:
    """submitit's local executor has no dependencies: this process chains the jobs itself."""
    failed = None
    for job in jobs:
        if job.done:
            continue
        if failed is not None:
            job.state, job.note = "NOT RUN", f"never ran: {failed.name} failed"
            continue
        executor.update_parameters(name=f"lightning-{job.name}")
        handle = executor.submit(make_job(job))
        job.job_id, job.state = str(handle.job_id), "RUNNING"
        print(f"started {job.name} as local job {job.job_id}", flush=True)
        print_table(jobs, time.strftime("[%H:%M:%S]"))
        while not handle.done():
            time.sleep(poll_s)
        try:
            handle.results()
            job.state = "COMPLETED"
        except Exception as err:  # the job's traceback is in its log
            job.state, job.note = "FAILED", f"{type(err).__name__} (log: {handle.paths.stderr})"
            failed = job
        print_table(jobs, time.strftime("[%H:%M:%S]"))
    literal = executor.folder if hasattr(executor, "folder") else None
    if literal is not None and "%j" in str(literal) and Path(literal).is_dir() and not any(Path(literal).iterdir()):
        Path(literal).rmdir()  # submitit's local executor makes the un-substituted folder too


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        all_jobs = plan_jobs(cfg)
        jobs = select_jobs(cfg, all_jobs, args.stages)
        kind = args.executor or ("slurm" if shutil.which("sbatch") else "local")
        if kind == "local" and args.no_wait:
            raise ConfigError("--no-wait needs the slurm executor (local jobs are chained by this process)")
        for name in ("nodes", "tasks_per_node", "cpus_per_task", "timeout_min"):
            if getattr(args, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive")
        folder = Path(args.folder) if args.folder else cfg.out_dir / "launch"
        if not args.dry_run and kind == "slurm":
            refuse_if_still_queued(folder / "submitted.json")
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except RuntimeError as err:
        print(f"launch refused: {err}", file=sys.stderr)
        return EXIT_CONFIG
    # What every job will need, checked now: nothing is queued that would fail after its wait.
    found = problems(cfg, args.nodes * args.tasks_per_node)
    if found:
        print("\n".join(f"input error: {cfg.source}: {p}" for p in found), file=sys.stderr)
        return EXIT_CONFIG

    for job in jobs:
        job.state = "DONE (skipped)" if job.done else ""
    todo = [j for j in jobs if not j.done]
    config = str(Path(args.config).resolve())
    workdir = os.getcwd()
    make_job = lambda job: ClusterTask(config, args.overrides, job.name, workdir)
    gpus = args.tasks_per_node if args.gpus_per_node is None else args.gpus_per_node
    print(f"{cfg.source}: {len(todo)} of {len(jobs)} selected jobs to run on {kind}: {args.nodes} node(s) x "
          f"{args.tasks_per_node} tasks, {gpus} GPUs/node, {args.cpus_per_task} CPUs/task, {args.timeout_min} min")
    if args.dry_run:
        for i, job in enumerate(todo):
            job.state, job.after = "would submit", todo[i - 1].name if i else ""
            print(f"  {job.name}: python -m trainer.run {' '.join(make_job(job).argv())}")
        print_table(jobs)
        return 0
    if not todo:
        print_table(jobs)
        return 0

    folder.mkdir(parents=True, exist_ok=True)
    executor = make_executor(kind, folder, args)
    if kind == "local":
        run_local(executor, jobs, make_job, min(args.poll_s, 2.0))
    else:
        try:
            submit_slurm(executor, jobs, make_job)
        except Exception as err:  # sbatch refused (partition, account, limits): take back what went in
            taken_back = [j.job_id for j in todo if j.job_id]
            if taken_back:
                subprocess.run(["scancel", *taken_back], capture_output=True)
            print(f"submission failed{f' (cancelled jobs {taken_back})' if taken_back else ''}: "
                  f"{str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__}", file=sys.stderr)
            return EXIT_JOB_FAILED
        (folder / "submitted.json").write_text(json.dumps(
            {"config": config, "jobs": [{"name": j.name, "job_id": j.job_id} for j in todo]}, indent=1))
        if args.no_wait:
            states = slurm_states([j.job_id for j in todo])
            for job in todo:
                job.state = states.get(job.job_id, {}).get("State", "SUBMITTED")
            print_table(jobs)
            print(f"logs: {folder}/<job id>/; status: sacct -j {','.join(j.job_id for j in todo)}")
            return 0
        wait_slurm(jobs, args.poll_s)
    bad = [j for j in todo if j.state != "COMPLETED"]
    if bad:
        print(f"not completed: {', '.join(f'{j.name} ({j.state.lower()})' for j in bad)}; logs in {folder}", file=sys.stderr)
        return EXIT_JOB_FAILED
    print(f"all done; exports in {cfg.out_dir / 'exports'}")
    return 0


if __name__ == "__main__":
    # The jobs are pickled by reference to trainer.launch, which the tasks import; not to __main__.
    from trainer.launch import main as launch_main

    sys.exit(launch_main())
