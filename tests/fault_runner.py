"""Runs `python -m trainer.run ARGS` with one fault injected from outside the product code.

    FAULT=kill_in_checkpoint:N   SIGKILL this process inside the N-th checkpoint write, after the
                                 engines wrote their state into the temporary folder, before it is published
    FAULT=enospc_in_checkpoint:N the N-th checkpoint write fails with "No space left on device"
    FAULT=kill_at_step:JOB:K     SIGKILL at the K-th micro-step of job JOB, between its forward and backward
    FAULT=kill_after_export:NAME SIGKILL right after the export NAME (a stage, or a phase result) is published
    FAULT=kill_in_export:NAME    SIGKILL in the middle of the export NAME (its UNet written, a LoRA phase's
                                 adapter merged, not yet published)
    FAULT=usr2_in_setup          SIGUSR2 (SLURM's preemption warning) while the run is still setting up
    FAULT=slow_export:S          every export takes S seconds longer (rank 0's solo work, slowed)
    FAULT=slow_step:S            every micro-step takes S seconds longer; each rank writes its pid to
                                 $TRACE/rank<r>.pid, appends each micro-step's start to $TRACE/micro<r>.log
                                 and the time every checkpoint write starts to $TRACE/saves<r>.log
    FAULT=usr2_in_export:NAME    SIGUSR2 to this process as the export NAME starts (inside rank 0's solo work)
    FAULT=usr2_after_export:NAME SIGUSR2 to this process right after the export NAME is published
    FAULT=usr2_at_start:JOB      SIGUSR2 to this process as job JOB starts training (models and engines built)

REPORT=DIR: each rank writes DIR/rank<r>.json after main() returns: its exit status, and whether its process
group is still initialized.
"""
import errno
import os
import signal
import sys

from trainer import export
from trainer.method import phases
from trainer.runtime import checkpoint, loop
from trainer.run import main

kind, _, arg = os.environ.get("FAULT", "").partition(":")
calls = {"n": 0}


def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


if kind in ("kill_in_checkpoint", "enospc_in_checkpoint"):
    original_save = checkpoint.CheckpointManager.save

    def save(self, engines, state, tensors=None):
        calls["n"] += 1
        if calls["n"] != int(arg):
            return original_save(self, engines, state, tensors)
        # Let the engines write (a real partial checkpoint), then fail before the rename.
        first = next(iter(engines.values()))
        original_engine_save = type(first).save_checkpoint

        def engine_save(engine, *a, **k):
            if kind == "enospc_in_checkpoint":
                raise OSError(errno.ENOSPC, "No space left on device")
            original_engine_save(engine, *a, **k)
            die()

        type(first).save_checkpoint = engine_save
        return original_save(self, engines, state, tensors)

    checkpoint.CheckpointManager.save = save

elif kind == "kill_at_step":
    job_name, _, k = arg.rpartition(":")
    original_train = loop.train

    def train(job, cfg, info):
        if job.name == job_name:
            inner = job.method.micro_step

            def micro_step(batch, rand):
                calls["n"] += 1
                if calls["n"] == int(k):
                    die()
                return inner(batch, rand)

            job.method.micro_step = micro_step
        return original_train(job, cfg, info)

    loop.train = train
    phases.train = train

elif kind == "kill_after_export":
    original_export = export.export_unet

    def export_unet(weights, unet_config, out_dir, **kw):
        result = original_export(weights, unet_config, out_dir, **kw)
        if arg in str(out_dir):
            die()
        return result

    export.export_unet = export_unet
    phases.export_unet = export_unet

elif kind == "kill_in_export":
    original_export = export.export_unet

    def export_unet(weights, unet_config, out_dir, **kw):
        if arg in str(out_dir):
            then = kw.get("extra")

            def extra(tmp):
                if then is not None:
                    then(tmp)
                die()

            kw["extra"] = extra
        return original_export(weights, unet_config, out_dir, **kw)

    export.export_unet = phases.export_unet = export_unet

elif kind == "slow_export":
    import time

    original_export = export.export_unet

    def export_unet(*a, **kw):
        time.sleep(float(arg))
        return original_export(*a, **kw)

    export.export_unet = export_unet
    phases.export_unet = export_unet

elif kind == "slow_step":
    import time
    from pathlib import Path

    trace, rank = Path(os.environ["TRACE"]), os.environ.get("RANK", "0")
    (trace / f"rank{rank}.pid").write_text(str(os.getpid()))
    original_train, original_save = loop.train, checkpoint.CheckpointManager.save

    def train(job, cfg, info):
        inner = job.method.micro_step

        def micro_step(batch, rand):
            with open(trace / f"micro{rank}.log", "a") as f:
                f.write(f"{time.time()}\n")
            time.sleep(float(arg))
            return inner(batch, rand)

        job.method.micro_step = micro_step
        return original_train(job, cfg, info)

    def save(self, engines, state, tensors=None):
        with open(trace / f"saves{rank}.log", "a") as f:
            f.write(f"{time.time()} {state['samples_seen']}\n")
        return original_save(self, engines, state, tensors)

    loop.train = phases.train = train
    checkpoint.CheckpointManager.save = save

elif kind in ("usr2_in_export", "usr2_after_export"):
    original_export = export.export_unet

    def export_unet(weights, unet_config, out_dir, **kw):
        if kind == "usr2_in_export" and arg in str(out_dir):
            os.kill(os.getpid(), signal.SIGUSR2)
        result = original_export(weights, unet_config, out_dir, **kw)
        if kind == "usr2_after_export" and arg in str(out_dir):
            os.kill(os.getpid(), signal.SIGUSR2)
        return result

    export.export_unet = phases.export_unet = export_unet

elif kind == "usr2_at_start":
    original_train = loop.train

    def train(job, cfg, info):
        if job.name == arg:
            os.kill(os.getpid(), signal.SIGUSR2)
        return original_train(job, cfg, info)

    loop.train = phases.train = train

elif kind == "usr2_in_setup":
    import trainer.pipeline as pipeline
    original_prepare = pipeline.prepare_base

    def prepare_base(cfg, info):
        os.kill(os.getpid(), signal.SIGUSR2)
        return original_prepare(cfg, info)

    pipeline.prepare_base = prepare_base

code = main(sys.argv[1:])
if "REPORT" in os.environ:  # how main() left this rank: its exit status, and whether its process group lives on
    import json
    from pathlib import Path

    import torch.distributed as dist

    Path(os.environ["REPORT"], f"rank{os.environ.get('RANK', '0')}.json").write_text(
        json.dumps({"code": code, "group_alive": dist.is_initialized()}))
sys.exit(code)
