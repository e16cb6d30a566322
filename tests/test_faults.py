"""Injected faults: non-finite losses and gradients."""
import pytest
import torch

from trainer.config import OptimConfig, ScheduleConfig
from trainer.runtime.engines import build_ds_config, init_distributed, make_engine
from trainer.method.models import build_toy_unet
from trainer.method.methods import Denoise
from trainer.runtime.randomness import SampleRandom
from trainer.method.schedule import NoiseSchedule

from conftest import ROOT, run_cli, toy_batch


@pytest.mark.parametrize("ds_file", ["zero2_cpu.json", "zero2_cpu_fp32.json"])
def test_nan_step_is_skipped_without_touching_weights_or_moments(ds_file):
    init_distributed()
    ds = build_ds_config(str(ROOT / "ds_configs" / ds_file), 4, 1, 1, OptimConfig(lr=1e-3), "test")
    engine = make_engine(build_toy_unet(), ds)
    objective = Denoise(engine, NoiseSchedule.from_config(ScheduleConfig()), "v_prediction", 0.0)
    objective.micro_step(toy_batch(), SampleRandom(1, range(4)))  # one good step: moments exist
    weights = {k: v.clone() for k, v in engine.module.state_dict().items()}
    moments = [v.clone() for st in engine.optimizer.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    skipped = engine.skipped_steps

    logs = objective.micro_step(toy_batch(nan=True), SampleRandom(2, range(4)))
    assert not torch.isfinite(logs["loss"])
    assert engine.skipped_steps == skipped + 1
    assert all(torch.equal(weights[k], v) for k, v in engine.module.state_dict().items())
    after = [v for st in engine.optimizer.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    assert all(torch.equal(a, b) for a, b in zip(moments, after, strict=True))

    objective.micro_step(toy_batch(), SampleRandom(3, range(4)))  # training goes on
    assert engine.skipped_steps == skipped + 1
    assert any(not torch.equal(weights[k], v) for k, v in engine.module.state_dict().items())


def test_consecutive_nonfinite_steps_stop_the_run_with_a_message(tmp_path):
    """An absurd learning rate blows the weights up; every later step is non-finite and skipped, and the
    run stops after run.max_consecutive_skips of them with exit code 3 and one clear line."""
    proc = run_cli(["trainer.run", "--config", "configs/smoke.yaml", "--set", f"run.out_dir={tmp_path}",
                    "--set", "teacher.optim.lr=1e30", "--set", "teacher.optim.warmup_steps=0",
                    "--set", "teacher.optim.grad_clip=0", "--set", "run.max_consecutive_skips=3"], check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "consecutive steps with NaN/Inf gradients (run.max_consecutive_skips=3)" in proc.stderr
    assert "step skipped" in proc.stdout


def _fault_run(fault: str, args: list[str], ranks: int = 1, check=False):
    import subprocess
    import sys

    from conftest import cli_env

    if ranks == 1:
        cmd = [sys.executable, str(ROOT / "tests" / "fault_runner.py"), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               str(ROOT / "tests" / "fault_runner.py"), *args]
    return subprocess.run(cmd, cwd=ROOT, env=cli_env(FAULT=fault), capture_output=True, text=True, timeout=900)


def _teacher_args(out):
    return ["--config", "configs/smoke.yaml", "--set", f"run.out_dir={out}", "--set", "log.checkpoint_every_samples=16",
            "--jobs", "teacher"]


def test_kill_during_checkpoint_write_keeps_the_previous_one(tmp_path, smoke_run):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    proc = _fault_run("kill_in_checkpoint:2", _teacher_args(out))
    assert proc.returncode == -9, proc.stderr[-2000:]
    ckpt = out / "jobs" / "teacher" / "ckpt"
    assert (ckpt / "LATEST").read_text() == "samples-000000000016"
    assert (ckpt / "samples-000000000032.tmp" / "student").is_dir()  # the partial write, never published
    # the relaunch resumes from the intact checkpoint, discards the partial one, and ends where an
    # uninterrupted run ends (the teacher's 64-sample smoke job of the shared run)
    proc = _fault_run("", _teacher_args(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "at 16 samples" in proc.stdout
    assert not list(ckpt.glob("*.tmp"))
    a = load_file(str(smoke_run / "exports/teacher/unet/diffusion_pytorch_model.safetensors"))
    b = load_file(str(out / "exports/teacher/unet/diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_disk_full_while_checkpointing_is_a_clear_error(tmp_path):
    out = tmp_path / "run"
    proc = _fault_run("enospc_in_checkpoint:2", _teacher_args(out))
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "No space left on device" in proc.stderr and "samples-000000000016) is intact" in proc.stderr
    ckpt = out / "jobs" / "teacher" / "ckpt"
    assert (ckpt / "LATEST").read_text() == "samples-000000000016" and not list(ckpt.glob("*.tmp"))
    assert (ckpt / "samples-000000000016" / "trainer_state.json").is_file()


def test_sigkill_at_three_points_with_two_ranks_resumes_bit_identical(tmp_path, two_rank_run):
    """SIGKILL mid-step (stage 1), at a phase switch (after a LoRA phase's result, before the next phase)
    and between stages (first step of the one-step stage); each relaunch resumes; the end is identical
    to an uninterrupted 2-rank run, and so is the loss curve after the resume point."""
    import json

    from safetensors.torch import load_file

    out = tmp_path / "killed"
    args = ["--config", "configs/smoke.yaml", "--set", f"run.out_dir={out}"]
    for fault in ("kill_at_step:stage1_32.0_mse:3", "kill_after_export:stage2_8.0_adv_cond_lora/result",
                  "kill_at_step:stage5_1.0_x0:1"):
        proc = _fault_run(fault, args, ranks=2)
        assert proc.returncode != 0, f"{fault}: the run was not killed"
    assert (out / "exports" / "stage2_8").is_dir() and not (out / "exports" / "stage5_1").exists()
    proc = _fault_run("", args, ranks=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("teacher", "stage1_32", "stage2_8", "stage2_8_lora", "stage5_1"):
        a = load_file(str(two_rank_run / "exports" / name / "unet" / "diffusion_pytorch_model.safetensors"))
        b = load_file(str(out / "exports" / name / "unet" / "diffusion_pytorch_model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} differs after the kills"

    def losses(run):
        rows = [json.loads(l) for l in (run / "jobs/stage1_32/stage1_32.0_mse/tb/metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["stage1_32.0_mse/loss"] for r in rows}

    reference, resumed = losses(two_rank_run), losses(out)
    assert reference.keys() == resumed.keys()
    assert all(abs(reference[k] - resumed[k]) <= 1e-7 * max(1.0, abs(reference[k])) for k in reference)


def test_no_unpickling_anywhere_in_the_package():
    """Weights load from safetensors; a torch.load must say weights_only=True; no pickle module."""
    import re

    for path in list((ROOT / "trainer").rglob("*.py")) + list((ROOT / "eval").rglob("*.py")):
        text = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"
        assert not re.search(r"^\s*(import pickle|from pickle|import dill|import cloudpickle)", text, re.M), path
        assert "allow_pickle=True" not in text, path


def test_a_shard_sample_holding_a_pickle_is_refused_not_unpickled(tmp_path):
    import io

    import numpy as np

    from trainer.data.shards import BadSample, decode_sample

    buf = io.BytesIO()
    np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)  # an object array = a pickle inside
    good = io.BytesIO()
    np.save(good, np.zeros((8, 32), np.float16))
    raw = {"__key__": "000001", "latent.npy": buf.getvalue(), "prompt_embeds.npy": good.getvalue(), "txt": b"a red circle"}
    with pytest.raises(BadSample, match="latent.npy"):
        decode_sample(raw, {"latent": [12, 16, 16], "prompt_embeds": [8, 32]}, "train-000000.tar")


def test_preemption_warning_during_setup_stops_the_run_at_once(tmp_path):
    """SLURM's USR2 can come before training starts (as rank 0 is about to write the toy base model, its
    solo work): that work does not start, the run exits 75 with nothing trained and no checkpoint, and the
    relaunch does everything."""
    proc = _fault_run("usr2_in_setup", _teacher_args(tmp_path))
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert "SIGUSR2 received" in proc.stdout and not (tmp_path / "base").exists()
    assert not (tmp_path / "jobs" / "teacher" / "ckpt").exists()
    proc = _fault_run("", _teacher_args(tmp_path))
    assert proc.returncode == 0 and (tmp_path / "exports" / "teacher" / "export.json").is_file(), proc.stderr[-2000:]


def test_a_signal_before_the_first_step_stops_without_a_checkpoint(tmp_path):
    """USR2 while the job's models and engines are built (no solo work running): the loop's first check
    stops it before any step; there is nothing to save, so no checkpoint is written."""
    proc = _fault_run("usr2_at_start:teacher", _teacher_args(tmp_path))
    assert proc.returncode == 75 and "[teacher] stopped at 0 samples" in proc.stdout, proc.stderr[-2000:]
    assert not (tmp_path / "jobs" / "teacher" / "ckpt").exists()


def test_a_signal_during_an_export_stops_every_rank(tmp_path, two_rank_run):
    """2 ranks: USR2 reaches rank 0 as it exports the teacher (its solo work; rank 1 waits): the export
    stops half-written and unpublished, both ranks stop (rank 1 with Preempted, not an error), and the
    relaunch exports exactly what the uninterrupted 2-rank run did."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    args = ["--config", "configs/smoke.yaml", "--set", f"run.out_dir={out}", "--jobs", "teacher"]
    proc = _fault_run("usr2_in_export:exports/teacher", args, ranks=2)
    assert "SIGUSR2 received during rank 0's solo work" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "MainWorkFailed" not in proc.stderr and "exitcode  : 75" in proc.stderr  # both ranks: 75
    assert not (out / "exports" / "teacher").exists()
    proc = _fault_run("", args, ranks=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_file(str(two_rank_run / "exports/teacher/unet/diffusion_pytorch_model.safetensors"))
    b = load_file(str(out / "exports/teacher/unet/diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _teacher_accumulating(out) -> list[str]:
    """The smoke teacher as 4 steps of 4 accumulated micro-batches of 8, with a loader worker."""
    return ["--config", "configs/smoke.yaml", "--set", f"run.out_dir={out}", "--jobs", "teacher",
            "--set", "teacher.samples=256", "--set", "teacher.grad_accum=4", "--set", "data.num_workers=1",
            "--set", "log.checkpoint_every_samples=100000"]


def _start(fault: str, args: list[str], trace, ranks: int):
    import subprocess
    import sys

    from conftest import cli_env

    runner = [str(ROOT / "tests" / "fault_runner.py"), *args]
    cmd = [sys.executable, *runner] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *runner]
    return subprocess.Popen(cmd, cwd=ROOT, env=cli_env(FAULT=fault, TRACE=str(trace)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for_micro_steps(trace, count: int, proc, timeout: float = 300) -> None:
    import time

    deadline = time.time() + timeout
    log = trace / "micro0.log"
    while not (log.is_file() and len(log.read_text().split()) >= count):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "training did not reach the micro-step"
        time.sleep(0.1)


def test_a_stop_signal_mid_accumulation_checkpoints_within_a_micro_step(tmp_path):
    """2 ranks, 4 accumulated micro-batches of ~1.5 s per step (a step ~6 s), a loader worker each. USR2
    reaches rank 1 alone in the middle of the second step: both ranks agree before the next micro-step,
    write the checkpoint of the first step (the unfinished step's gradients dropped) well within one
    micro-step of the signal, and stop; the relaunch ends where an uninterrupted run ends."""
    import os
    import signal
    import statistics
    import time

    from safetensors.torch import load_file

    trace = tmp_path / "trace"
    trace.mkdir()
    out = tmp_path / "run"
    proc = _start("slow_step:1.5", _teacher_accumulating(out), trace, ranks=2)
    _wait_for_micro_steps(trace, 6, proc)  # step 2, micro-batch 2
    sent = time.time()
    os.kill(int((trace / "rank1.pid").read_text()), signal.SIGUSR2)
    stdout, stderr = proc.communicate(timeout=300)
    saves = [line.split() for line in (trace / "saves0.log").read_text().splitlines()]
    assert len(saves) == 1 and saves[0][1] == "64", saves  # the first step's state: 64 samples (8 x 4 x 2)
    # "within a micro-step": bounded by the micro-steps' own measured length (1.5 s of sleep plus the
    # machine's compute), not a fixed time; finishing the step instead would take two more micro-steps
    starts = [float(x) for x in (trace / "micro0.log").read_text().split()]
    micro_step = statistics.median(b - a for a, b in zip(starts, starts[1:]))
    delay = float(saves[0][0]) - sent
    assert 0 < delay < micro_step + 1.0, f"checkpoint started {delay:.1f} s after the signal (micro-step {micro_step:.1f} s)"
    assert "[teacher] stopped at 64 samples (a stop signal on another rank)" in stdout, stdout[-2000:] + stderr[-2000:]
    proc = _fault_run("", _teacher_accumulating(out), ranks=2)
    assert proc.returncode == 0 and "resumed from" in proc.stdout and "at 64 samples" in proc.stdout, proc.stderr[-3000:]
    reference = tmp_path / "reference"
    assert _fault_run("", _teacher_accumulating(reference), ranks=2).returncode == 0
    a = load_file(str(reference / "exports/teacher/unet/diffusion_pytorch_model.safetensors"))
    b = load_file(str(out / "exports/teacher/unet/diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_to_the_whole_task_with_a_loader_worker(tmp_path, smoke_run):
    """SIGTERM to every process of the task, its DataLoader worker included (what SLURM does on preemption):
    the worker ignores it, the trainer writes its checkpoint and exits 75; the relaunch ends bit-identical
    to the uninterrupted run (one worker reads the same stream as none)."""
    import os
    import signal

    from safetensors.torch import load_file

    trace = tmp_path / "trace"
    trace.mkdir()
    out = tmp_path / "run"
    args = _teacher_args(out) + ["--set", "data.num_workers=1"]
    proc = _start("slow_step:0.5", args, trace, ranks=1)
    _wait_for_micro_steps(trace, 3, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 75, stderr[-3000:]
    assert "stopped at" in stdout and "SIGTERM" in stdout and "killed by signal" not in stderr
    proc = _fault_run("", args)
    assert proc.returncode == 0 and "resumed from" in proc.stdout, proc.stderr[-3000:]
    a = load_file(str(smoke_run / "exports/teacher/unet/diffusion_pytorch_model.safetensors"))
    b = load_file(str(out / "exports/teacher/unet/diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_resumed_job_logs_each_step_once(tmp_path):
    """SIGKILL at the 7th step, after steps logged past the last checkpoint (32 samples): the relaunch
    resumes at 32 and logs 40 and 48 again. metrics.jsonl and TensorBoard (as its reader sees the event
    files) hold every step once, ending with the run's 8 steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trainer.runtime.tracking import read_metrics

    out = tmp_path / "run"
    args = ["--config", "configs/smoke.yaml", "--set", f"run.out_dir={out}", "--set", "log.checkpoint_every_samples=32",
            "--set", "log.every_steps=1", "--jobs", "teacher"]
    proc = _fault_run("kill_at_step:teacher:7", args)
    assert proc.returncode == -9, proc.stderr[-2000:]
    tb = out / "jobs" / "teacher" / "tb"
    assert [r["step"] for r in read_metrics(tb, "teacher/loss")] == [8, 16, 24, 32, 40, 48]  # 40, 48 past the checkpoint
    proc = _fault_run("", args)
    assert proc.returncode == 0 and "at 32 samples" in proc.stdout, proc.stderr[-2000:]
    steps = [r["step"] for r in read_metrics(tb, "teacher/loss")]
    assert steps == [8 * i for i in range(1, 9)]
    events = EventAccumulator(str(tb))
    events.Reload()
    assert [e.step for e in events.Scalars("teacher/loss")] == steps
