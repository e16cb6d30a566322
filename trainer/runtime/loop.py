"""The training loop: one handwritten loop for every job (teacher training, each distillation stage).

It reads top to bottom: resume, then per optimizer step: the method's progress, learning rates,
micro-batches (the method does forward, backward and the engines' steps: trainer/method/methods.py), EMA,
logs, sample grid, checkpoint. Progress is counted
in samples seen; every sample draws its randomness from a generator seeded by (seed, its position in the
job) (trainer/runtime/randomness.py), so a resumed run continues exactly as an uninterrupted one, and gradient
accumulation computes what a larger micro-batch would.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np
import torch
from tqdm import tqdm

from trainer.runtime import collectives
from trainer.runtime.checkpoint import CheckpointManager
from trainer.config import Config
from trainer.runtime.engines import DistInfo, device, learning_rate, set_learning_rate
from trainer.data.loader import data_lanes, make_loader
from trainer.runtime.preemption import Preempted, preemption_handler
from trainer.runtime.randomness import SampleRandom
from trainer.method.sampling import save_png
from trainer.runtime.tracking import Tracker

if TYPE_CHECKING:
    from trainer.method.methods import Method


@dataclass
class Job:
    """One run of the loop: a method (its engines, their optimizers, its micro-step) trained for a length."""
    name: str
    out_dir: Path
    total_samples: int
    micro_batch: int
    grad_accum: int
    method: "Method"
    ema_decay: float = 0.0  # of the student's weights; 0: none
    # module -> uint8 grid image (rank 0 only); None: no grids
    make_grid: Optional[Callable[[torch.nn.Module], np.ndarray]] = None
    # trainer.runtime.probe.PhaseProbe: the student's FID against its teacher's samples every N samples; None: off
    probe: Optional[Any] = None


class EMA:
    """Exponential moving average of a module's weights, kept in fp32 (the engine's module is bf16) on
    the module's device."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for k, v in module.state_dict().items():
            self.shadow[k].lerp_(v.float(), 1.0 - self.decay)

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restores a saved average into the existing shadow tensors, which stay where they are."""
        if tensors.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - tensors.keys())[:3]
            raise RuntimeError(f"the checkpoint's EMA does not match the module (e.g. missing {missing})")
        for k, v in tensors.items():
            self.shadow[k].copy_(v)

    @contextmanager
    def applied_to(self, module: torch.nn.Module):
        """`module` holding the average (what the job exports) for the block, its trained weights put back
        exactly after: what the probe and the sample grids show is what gets exported."""
        kept = {k: v.detach().clone() for k, v in module.state_dict().items()}
        module.load_state_dict(self.shadow)  # cast to the module's dtype by copy_
        try:
            yield module
        finally:
            module.load_state_dict(kept)


@contextmanager
def exported_weights(module: torch.nn.Module, ema: Optional[EMA]):
    """The module as the job exports it: the EMA's weights where there is one, in eval mode."""
    was_training = module.training
    module.eval()
    try:
        if ema is None:
            yield module
        else:
            with ema.applied_to(module):
                yield module
    finally:
        module.train(was_training)


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with NaN/Inf gradients."""


class ResumeError(RuntimeError):
    """A checkpoint this run cannot continue without repeating or skipping samples (or changing the step)."""


def check_resumable(saved: dict, layout: dict, job_name: str, path: Path) -> None:
    """Any world size, micro-batch and worker count resume the same run; a different global batch or data
    lanes would not (the step, or the order of the samples, would change)."""
    if saved["job"] != job_name:
        raise ResumeError(f"{path} belongs to job '{saved['job']}', not '{job_name}'")
    then = saved.get("layout")
    if then is None:  # written before the layout was recorded: same world size assumed
        return
    if then["global_batch"] != layout["global_batch"]:
        raise ResumeError(
            f"[{job_name}] {path} was written with a global batch of {then['global_batch']} ({then['world_size']} ranks "
            f"x micro-batch {then['micro_batch']} x accumulation {then['grad_accum']}); this run's is "
            f"{layout['global_batch']} ({layout['world_size']} x {layout['micro_batch']} x {layout['grad_accum']}): "
            f"set the job's global_batch (stages[N].global_batch, teacher.global_batch) to {then['global_batch']} so that "
            f"the accumulation follows the world size")
    if then["lanes"] != layout["lanes"]:
        raise ResumeError(
            f"[{job_name}] {path} was written reading the data through {then['lanes']} lanes, this run has "
            f"{layout['lanes']} (data.lanes or the shards changed): the order of the samples would change; set "
            f"data.lanes: {then['lanes']}")


def replica_digest(module: torch.nn.Module) -> str:
    """A hash of a rank's copy of the weights. ZeRO-2 keeps full replicas on every rank; if they ever
    differ, training is silently wrong, so the final checkpoint records every rank's digest."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _to_device(batch: dict, dev: torch.device) -> dict:
    """The batch on the device, floats as float32: the cast runs after the copy (on the GPU there), so
    float16 shards cross the host and the bus at half the bytes."""
    def move(v):
        if not torch.is_tensor(v):
            return v
        v = v.to(dev, non_blocking=True)
        return v.float() if v.is_floating_point() else v
    return {k: move(v) for k, v in batch.items()}


def _crossed(before: int, after: int, every: int) -> bool:
    return every > 0 and before // every != after // every


def train(job: Job, cfg: Config, info: DistInfo) -> Path:
    """Runs `job` to its end (or to a preemption) and returns its final checkpoint folder."""
    engines = job.method.engines
    missing = [name for name in engines if name not in job.method.optims]
    if missing:
        raise ValueError(f"[{job.name}] the method names no optimizer settings for engine(s) {missing}")
    student = engines["student"]
    ckpt = CheckpointManager(job.out_dir / "ckpt", cfg.log.keep_last)
    global_batch = job.micro_batch * job.grad_accum * info.world_size
    total_steps = math.ceil(job.total_samples / global_batch)
    ema = EMA(student.module, job.ema_decay) if job.ema_decay else None
    dev = device()

    # -- resume ---------------------------------------------------------------------------------
    # How this run splits the global batch; the data order depends only on the lanes and the positions.
    layout = {"world_size": info.world_size, "micro_batch": job.micro_batch, "grad_accum": job.grad_accum,
              "global_batch": global_batch, "num_workers": cfg.data.num_workers,
              "lanes": data_lanes(cfg.shard_dir, cfg.data.lanes)}
    state = {"job": job.name, "step": 0, "samples_seen": 0, "done": False}
    latest = ckpt.latest()
    if latest is not None:
        saved = ckpt.read_state(latest)
        check_resumable(saved, layout, job.name, latest)
        state = ckpt.load(latest, engines, saved.get("layout", layout)["world_size"])
        if ema is not None:
            ema.load(CheckpointManager.load_tensors(latest, "ema.safetensors", device=dev))
        if info.is_main:
            print(f"[{job.name}] resumed from {latest} at {state['samples_seen']} samples", flush=True)
    if state["done"]:
        return latest
    state["layout"] = layout

    saved_at = state["samples_seen"]  # what the newest checkpoint (if any) holds

    def save(done: bool = False) -> Path:
        nonlocal saved_at
        state["done"] = done
        tensors = {"ema.safetensors": ema.shadow} if ema is not None else None
        saved_at = state["samples_seen"]
        return ckpt.save(engines, dict(state), tensors)

    def stop(reason: str) -> None:
        """The checkpoint of the last completed step (unless the newest one holds it), then Preempted: the
        gradients accumulated in an unfinished step are dropped, and the resumed job redoes that step."""
        if state["samples_seen"] != saved_at:
            save()
        bar.close()
        tracker.close()
        raise Preempted(f"[{job.name}] stopped at {state['samples_seen']} samples ({reason}); checkpoint written")

    # -- the loop -------------------------------------------------------------------------------
    loader = make_loader(cfg.shard_dir, job.micro_batch, cfg.run.seed, info.rank, info.world_size,
                         start_position=state["samples_seen"], num_workers=cfg.data.num_workers,
                         max_bad_fraction=cfg.data.max_bad_fraction, lanes=cfg.data.lanes)
    slow = SlowMicroStepWarning(cfg.run.preemption_deadline_s, job.name, enabled=info.is_main)
    batches = iter(loader)
    tracker = Tracker(job.out_dir / "tb", enabled=info.is_main, resume_at=state["samples_seen"])
    preemption = preemption_handler()
    stop_at = state["samples_seen"] + cfg.run.stop_after_samples if cfg.run.stop_after_samples else None
    window: dict[str, list] = {}
    data_stats: dict[int, dict] = {}  # latest cumulative counters of each loader stream
    skipped = {name: engine.skipped_steps for name, engine in engines.items()}
    consecutive_skips = 0
    window_start, window_samples = time.perf_counter(), 0
    bar = tqdm(total=total_steps, initial=state["step"], desc=job.name, disable=not info.is_main, mininterval=5)
    if job.probe is not None and "probe" not in state:  # where the phase starts from: the curve's first point
        _probe(job, tracker, student.module, ema, state)

    while state["step"] < total_steps:
        job.method.set_progress(state["step"], total_steps)  # e.g. D warm-up, the t* weights' switch
        lrs = {name: learning_rate(job.method.optims[name], state["step"], total_steps) for name in engines}
        for name, engine in engines.items():
            set_learning_rate(engine, lrs[name])
        for micro in range(job.grad_accum):
            # Before every micro-step: the checkpoint starts one micro-batch after a stop signal at most.
            if preemption.agreed():
                stop(f"{preemption.signal_name or 'a stop signal on another rank'}")
            started = time.monotonic()
            batch = next(batches)
            for stats in batch.pop("data_stats"):
                data_stats[stats["stream"]] = stats
            rand = SampleRandom(cfg.run.seed, batch.pop("positions").tolist())
            for key, value in job.method.micro_step(_to_device(batch, dev), rand).items():
                window.setdefault(key, []).append(value)
            slow.check(time.monotonic() - started)
        # Engines skip a step whose gradients are not finite (check_grad_overflow): nothing is updated.
        now_skipped = {name: engine.skipped_steps for name, engine in engines.items()}
        bad = [name for name in engines if now_skipped[name] > skipped[name]]
        skipped = now_skipped
        consecutive_skips = consecutive_skips + 1 if bad else 0
        if bad:
            state["skipped_steps"] = state.get("skipped_steps", 0) + 1
            if info.is_main:
                print(f"[{job.name}] step {state['step']}: non-finite gradients in {', '.join(bad)}; step skipped", flush=True)
            if consecutive_skips >= cfg.run.max_consecutive_skips:
                raise NonFiniteError(f"[{job.name}] {consecutive_skips} consecutive steps with NaN/Inf gradients "
                                     f"(run.max_consecutive_skips={cfg.run.max_consecutive_skips}) at "
                                     f"{state['samples_seen']} samples; the last checkpoint is intact")
        before = state["samples_seen"]
        state["step"] += 1
        state["samples_seen"] += global_batch
        window_samples += global_batch
        if ema is not None:
            ema.update(student.module)
        bar.update(1)

        if state["step"] % cfg.log.every_steps == 0 or state["step"] == total_steps:
            # .item() only here: no host-device sync on the other steps
            # nanmean: a term some micro-steps could not measure (a t* no sample drew) is NaN there
            logs = {f"{job.name}/{k}": float(torch.stack(v).float().nanmean()) for k, v in window.items()}
            logs = collectives.mean_over_ranks(logs)
            elapsed = time.perf_counter() - window_start
            logs[f"{job.name}/lr"] = lrs["student"]
            logs.update({f"{job.name}/lr_{name}": lr for name, lr in lrs.items() if name != "student"})
            logs[f"{job.name}/skipped_steps"] = float(state.get("skipped_steps", 0))
            logs[f"{job.name}/data_bad_samples"] = float(sum(s["bad"] for s in data_stats.values()))
            logs[f"{job.name}/samples_per_s"] = window_samples / max(elapsed, 1e-9)
            tracker.scalars(logs, state["samples_seen"])
            bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in logs.items() if k.endswith("loss")})
            window, window_start, window_samples = {}, time.perf_counter(), 0
        if job.make_grid is not None and info.is_main and _crossed(before, state["samples_seen"], cfg.log.sample_every_samples):
            _log_grid(job, tracker, student.module, ema, state["samples_seen"])
        if job.probe is not None and _crossed(before, state["samples_seen"], job.probe.every_samples):
            if _probe(job, tracker, student.module, ema, state) and job.probe.stop_when_flat:
                state["stopped_when_flat"] = state["samples_seen"]
                if info.is_main:
                    print(f"[{job.name}] the probe's FID against the teacher has flattened: stopping at "
                          f"{state['samples_seen']} of {job.total_samples} samples (probe.stop_when_flat)", flush=True)
                break

        if state["step"] == total_steps:
            break
        if stop_at is not None and state["samples_seen"] >= stop_at:
            stop("run.stop_after_samples")
        if _crossed(before, state["samples_seen"], cfg.log.checkpoint_every_samples):
            save()

    bar.close()
    state["replica_digests"] = collectives.gather_strings(replica_digest(student.module))
    if len(set(state["replica_digests"])) != 1:
        raise RuntimeError(f"[{job.name}] ranks ended with different weights: {state['replica_digests']}")
    if job.probe is not None and state["probe"][-1][0] != state["samples_seen"]:  # the curve's last point
        _probe(job, tracker, student.module, ema, state)
    final = save(done=True)
    if job.make_grid is not None and info.is_main:
        _log_grid(job, tracker, student.module, ema, state["samples_seen"])
    tracker.close()
    return final


class SlowMicroStepWarning:
    """Says once when a micro-step (the spacing of the preemption checks) takes longer than
    run.preemption_deadline_s: a stop signal then waits that long for its checkpoint."""

    def __init__(self, deadline_s: float, job_name: str, enabled: bool):
        self.deadline_s, self.job_name, self.enabled = deadline_s, job_name, enabled
        self.warned = False

    def check(self, seconds: float) -> None:
        if self.enabled and not self.warned and seconds > self.deadline_s:
            print(f"[{self.job_name}] warning: a micro-step took {seconds:.0f} s, more than run.preemption_deadline_s="
                  f"{self.deadline_s:g}: a stop signal waits that long for its checkpoint; a smaller micro_batch "
                  f"(global_batch kept) shortens it", flush=True)
            self.warned = True


def _probe(job: Job, tracker: Tracker, module: torch.nn.Module, ema: Optional[EMA], state: dict) -> bool:
    """Rank 0 measures the probe (the other ranks wait for it in the rank-0 wait group); every rank gets the
    curve so far into its state (checkpointed, so a resumed phase keeps it) and whether it has flattened."""
    from trainer.runtime.probe import flattened

    samples = state["samples_seen"]

    def measure() -> list:
        with exported_weights(module, ema):
            fid, grid, failures = job.probe.measure(module)
        tracker.scalars({f"{job.name}/probe_fid_vs_teacher": fid,
                         **{f"{job.name}/probe_{rule}": rate for rule, rate in failures.items()}}, samples)
        tracker.image(f"{job.name}/probe_samples", grid, samples)
        save_png(grid, job.out_dir / "grids" / f"probe-{samples:09d}.png")
        rates = "".join(f", {rule} {rate:.3f}" for rule, rate in failures.items())
        print(f"[{job.name}] probe at {samples} samples: FID {fid:.2f} against the teacher's samples{rates}", flush=True)
        return state.get("probe", []) + [[samples, fid]]

    state["probe"] = collectives.on_main(f"[{job.name}] probe", measure, log=False)
    cfg = job.probe
    return flattened([fid for _, fid in state["probe"]], cfg.patience, cfg.min_improvement)


def _log_grid(job: Job, tracker: Tracker, module: torch.nn.Module, ema: Optional[EMA], samples_seen: int) -> None:
    with exported_weights(module, ema):
        grid = job.make_grid(module)
    tracker.image(f"{job.name}/samples", grid, samples_seen)
    save_png(grid, job.out_dir / "grids" / f"samples-{samples_seen:09d}.png")
