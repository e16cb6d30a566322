"""`python -m trainer.run --config configs/shapes.yaml`: run a recipe's progression (or some of its jobs).

    python -m trainer.run --config configs/shapes.yaml                      # everything
    python -m trainer.run --config configs/shapes.yaml --jobs stage1_32     # one job (needs its teacher)
    python -m trainer.run --config configs/sdxl.yaml --print-plan          # every job and phase; runs nothing
    python -m trainer.run --config configs/shapes.yaml --stage 2            # the recipe's second stage
    python -m trainer.run --config configs/shapes.yaml --set stages.0.samples=512
    torchrun --standalone --nproc_per_node 2 -m trainer.run --config ...    # 2 ranks

Exit codes (shared with trainer.launch, which adds 1: a submitted job failed): 0 done; 2 bad configuration or missing inputs (nothing started: one line per problem); 3 stopped
on a fault it reports (non-finite steps, checkpoint write failed); 75 stopped with a checkpoint (preempted,
or run.stop_after_samples): run the same command again to resume.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

EXIT_JOB_FAILED = 1  # trainer.launch: a submitted job failed or was cancelled
EXIT_CONFIG = 2
EXIT_FAILED = 3  # the run stopped itself: non-finite steps, a checkpoint it could not write
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again", which is what a requeue does


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainer.run", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="YAML recipe (configs/*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key, e.g. stages.0.optim.lr=1e-5 (repeatable)")
    p.add_argument("--jobs", default="", help="comma-separated job names to run (teacher, stage names); default all")
    p.add_argument("--stage", type=int, default=0, metavar="N",
                   help="run the recipe's N-th stage (1 = stages[0]); what slurm/stageN.sh uses")
    p.add_argument("--portable", action="store_true",
                   help="exports copy every part of the base model instead of linking large ones (export.portable)")
    p.add_argument("--print-plan", action="store_true",
                   help="print every job and phase the recipe expands into (kind, what trains, length, optimizers, D) "
                        "and exit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from trainer.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides + (["export.portable=true"] if args.portable else []),
                          check_paths=not args.print_plan)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    if args.print_plan:
        from trainer.plan import format_plan

        print(format_plan(cfg, int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))))
        return 0
    only = [j for j in args.jobs.split(",") if j]
    if args.stage:
        if not 1 <= args.stage <= len(cfg.stages):
            print(f"config error: {args.config}: --stage {args.stage}: the recipe has {len(cfg.stages)} stages", file=sys.stderr)
            return EXIT_CONFIG
        only.append(cfg.stages[args.stage - 1].name)
    from trainer.pipeline import job_names
    from trainer.runtime.preflight import problems

    unknown = [name for name in only if name not in job_names(cfg)]
    if unknown:
        print(f"config error: {args.config}: --jobs: unknown job {', '.join(repr(n) for n in unknown)}; the recipe's "
              f"jobs are {', '.join(job_names(cfg))}", file=sys.stderr)
        return EXIT_CONFIG
    found = problems(cfg, int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))))
    if found:
        print("\n".join(f"input error: {args.config}: {p}" for p in found), file=sys.stderr)
        return EXIT_CONFIG
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from trainer.runtime.preemption import preemption_handler

    preemption_handler()  # before any work: a SLURM signal during set-up must not kill the process

    from trainer.runtime.collectives import shutdown
    from trainer.runtime.engines import init_distributed

    set_determinism(cfg.run.deterministic)
    info = init_distributed(cfg.run.collective_timeout_s, cfg.run.main_work_timeout_s)
    start = time.time()
    code = run_and_report(cfg, info, only, start)
    shutdown()
    return code


def run_and_report(cfg, info, only: list[str], start: float) -> int:
    """Runs the progression and turns how it ended into the exit status. Every ending here is one all ranks
    reached together; an exception that escapes is one rank's failure, and its process just dies."""
    from trainer.pipeline import run_progression
    from trainer.runtime.checkpoint import CheckpointWriteError
    from trainer.runtime.loop import NonFiniteError, ResumeError
    from trainer.runtime.preemption import Preempted

    try:
        result = run_progression(cfg, info, only or None)
    except Preempted as stop:
        if info.is_main:
            print(str(stop), flush=True)
        return EXIT_PREEMPTED
    except (NonFiniteError, CheckpointWriteError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    except ResumeError as err:  # nothing trained: the checkpoint stays as it was
        print(f"config error: {err}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    if info.is_main:
        result["wall_seconds"] = round(time.time() - start, 1)
        print("\n=== done ===")
        print(json.dumps(result, indent=1))
        print(f"TensorBoard: tensorboard --logdir {cfg.out_dir / 'jobs'}")
    return 0


def set_determinism(deterministic: bool) -> None:
    """run.deterministic: GPU runs repeat bit for bit (cudnn's autotuner picks kernels by timing, and some
    CUDA kernels accumulate in a varying order); otherwise the autotuner picks the fastest kernels. On a
    CPU the step is deterministic either way."""
    import torch

    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before the first cuBLAS call
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.use_deterministic_algorithms(deterministic)


if __name__ == "__main__":
    sys.exit(main())
