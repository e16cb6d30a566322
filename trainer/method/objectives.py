"""Objectives: what one micro-step of a job computes. Each objective owns the engines it steps and
declares them in `engines`; the loop only feeds batches, sets learning rates and checkpoints.

- `DenoiseObjective`: ordinary diffusion training (the toy teacher), with caption dropout for CFG.
- `MSEDistillObjective`: progressive distillation as in the paper's first stage: the student's one
  step from x_t must land where the frozen teacher's n-step jump (with CFG) lands.
- `X0Objective`: the one-step model's conversion from eps/v prediction to x0 prediction.
- `AdversarialObjective`: the adversarial stages (conditional or unconditional D, multi-timestep D).
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from trainer.method.discriminator import d_accuracy, d_loss, g_loss
from trainer.method.models import Conditioning, guided_denoiser, unet_forward
from trainer.runtime.randomness import SampleRandom
from trainer.method.schedule import NoiseSchedule, move, next_timestep, teacher_jump, trailing_timesteps


class Objective(Protocol):
    engines: dict
    def micro_step(self, batch: dict, rand: SampleRandom) -> dict[str, torch.Tensor]: ...


def host_to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor onto `device` without making the host wait: a copy from pageable memory would wait
    for the GPU's queue to drain first (a hidden sync per step), one from pinned memory is queued."""
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def _randn_like(x: torch.Tensor, rand: SampleRandom) -> torch.Tensor:
    # Drawn on the CPU from each sample's generator (trainer/runtime/randomness.py), then queued to the device.
    return host_to_device(rand.randn(x.shape[1:]), x.device)


def noisy_inputs(batch: dict, rand: SampleRandom, schedule: NoiseSchedule, timesteps: torch.Tensor,
                 student_steps: int):
    """The distillation objectives' shared start: x_t at a timestep drawn from the student's grid (pure
    noise at t = T), the next timestep on that grid, and the batch's conditioning. Returns
    (x_t, t, t_next, cond), all on the batch's device. Timesteps are drawn and stepped on the CPU (where
    no copy back is ever needed) and then queued to the device."""
    x0 = batch["latent"]
    eps = _randn_like(x0, rand)
    t_host = timesteps[rand.randint(len(timesteps))]
    t_next_host = next_timestep(t_host, student_steps, schedule.num_train_timesteps, check=False)  # drawn from it
    t, t_next = host_to_device(t_host, x0.device), host_to_device(t_next_host, x0.device)
    return schedule.add_noise(x0, eps, t), t, t_next, Conditioning.from_batch(batch)


class DenoiseObjective:
    def __init__(self, engine, schedule: NoiseSchedule, prediction_type: str, caption_dropout: float):
        self.engines = {"student": engine}
        self.engine = engine
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.caption_dropout = caption_dropout

    def micro_step(self, batch: dict, rand: SampleRandom) -> dict[str, torch.Tensor]:
        x0 = batch["latent"]
        eps = _randn_like(x0, rand)
        t = host_to_device(rand.randint(self.schedule.num_train_timesteps), x0.device)
        keep = host_to_device(rand.rand() >= self.caption_dropout, x0.device)
        alpha, sigma = self.schedule.alpha_sigma(t)
        x_t = alpha * x0 + sigma * eps  # ordinary forward process: the teacher learns the real schedule
        cond = Conditioning.from_batch(batch).drop(keep)
        out = unet_forward(self.engine, x_t, t, cond)
        target = self.schedule.target(x0, eps, t, self.prediction_type)
        loss = F.mse_loss(out, target)
        self.engine.backward(loss)
        self.engine.step()
        return {"loss": loss.detach()}


class MSEDistillObjective:
    def __init__(self, engine, teacher: torch.nn.Module, schedule: NoiseSchedule, prediction_type: str,
                 teacher_prediction_type: str, student_steps: int, teacher_steps: int, cfg_scale: float,
                 loss_space: str = "landing"):
        if loss_space not in ("landing", "x0"):
            raise ValueError(f"loss_space must be landing or x0, got {loss_space!r}")
        self.loss_space = loss_space
        self.engines = {"student": engine}
        self.engine = engine
        self.teacher = teacher
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.teacher_prediction_type = teacher_prediction_type
        self.student_steps = student_steps
        self.teacher_steps = teacher_steps
        self.moves_per_step = teacher_steps // student_steps
        self.cfg_scale = cfg_scale
        self.timesteps = torch.tensor(trailing_timesteps(student_steps, schedule.num_train_timesteps))

    def micro_step(self, batch: dict, rand: SampleRandom) -> dict[str, torch.Tensor]:
        x_t, t, t_next, cond = noisy_inputs(batch, rand, self.schedule, self.timesteps, self.student_steps)
        target = teacher_jump(self.schedule, guided_denoiser(self.teacher, cond, self.cfg_scale), x_t, t,
                              self.moves_per_step, self.teacher_steps, self.teacher_prediction_type)
        out = unet_forward(self.engine, x_t, t, cond)
        landed = move(self.schedule, out, x_t, t, t_next, self.prediction_type)
        if self.loss_space == "x0":
            # The same match, measured on the x0 each landing implies from x_t: per step, the landing
            # error scaled by 1 / (a' - s' a / s). Landing-space MSE weights the high-noise steps, where
            # guidance decides shape, colour and layout, ~10x less than the middle ones.
            landed, target = (implied_x0(self.schedule, x_t, x, t, t_next) for x in (landed, target))
        loss = F.mse_loss(landed, target)
        self.engine.backward(loss)
        self.engine.step()
        return {"loss": loss.detach()}


class X0Objective:
    """The one-step model's conversion to x0 prediction (the paper's fix for the noisy eps 1-step model):
    a copy of the network learns to output directly the x0 that a frozen copy implies,
    ||x0^(x_t) - x0(x_t, out_frozen, t)||^2, at the stage's training timesteps."""

    def __init__(self, engine, frozen: torch.nn.Module, schedule: NoiseSchedule, frozen_prediction_type: str,
                 student_steps: int):
        self.engines = {"student": engine}
        self.engine = engine
        self.frozen = frozen
        self.schedule = schedule
        self.frozen_prediction_type = frozen_prediction_type
        self.student_steps = student_steps
        self.timesteps = torch.tensor(trailing_timesteps(student_steps, schedule.num_train_timesteps))

    def micro_step(self, batch: dict, rand: SampleRandom) -> dict[str, torch.Tensor]:
        x_t, t, _, cond = noisy_inputs(batch, rand, self.schedule, self.timesteps, self.student_steps)
        with torch.no_grad():
            out = unet_forward(self.frozen, x_t, t, cond)
            target, _ = self.schedule.to_x0_eps(out, x_t, t, self.frozen_prediction_type)
        pred = unet_forward(self.engine, x_t, t, cond)  # the copy now outputs x0 itself
        loss = F.mse_loss(pred, target)
        self.engine.backward(loss)
        self.engine.step()
        return {"loss": loss.detach()}


def implied_x0(schedule: NoiseSchedule, x_t: torch.Tensor, x_next: torch.Tensor, t: torch.Tensor,
               t_next: torch.Tensor) -> torch.Tensor:
    """The x0 whose DDIM move from x_t at t lands on x_next at t_next (x_next itself when t_next = -1):
    x_next = a' x0 + s' (x_t - a x0) / s  =>  x0 = (x_next - (s'/s) x_t) / (a' - s' a / s)."""
    a, s = schedule.alpha_sigma(t.to(x_t.device))
    a2, s2 = schedule.alpha_sigma(t_next.to(x_t.device))
    return (x_next - (s2 / s) * x_t) / (a2 - s2 * a / s)


class AdversarialObjective:
    """One G step then one D step per micro-batch, on two DeepSpeed engines.

    real = the frozen teacher's n-move jump from x_t, fake = the student's one move from the same x_t.
    Conditional D judges (x_t, x_{t-ns}) pairs; unconditional D' judges x_{t-ns} alone (text-conditioned
    in both). With `t_star`, both landings are turned into their x0 and re-noised to t* (same fresh noise
    for real and fake) before D sees them: the multi-timestep discriminator of the 1- and 2-step stages.
    Non-saturating losses; an optional MSE term (`mse_weight`, 0 in the paper).
    """

    def __init__(self, student_engine, disc_engine, teacher: torch.nn.Module, schedule: NoiseSchedule,
                 prediction_type: str, teacher_prediction_type: str, student_steps: int, teacher_steps: int,
                 conditional: bool, t_star: list[int], t_star_weights: list[float], mse_weight: float = 0.0,
                 d_only: bool = False):
        self.engines = {"student": student_engine, "disc": disc_engine}
        self.student, self.disc = student_engine, disc_engine
        self.teacher = teacher
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.teacher_prediction_type = teacher_prediction_type
        self.student_steps, self.teacher_steps = student_steps, teacher_steps
        self.conditional = conditional
        self.t_star = torch.tensor(t_star, dtype=torch.long)
        self.t_star_values = list(t_star)
        self.t_star_weights = torch.tensor(t_star_weights or [1.0] * len(t_star), dtype=torch.float)
        self.mse_weight = mse_weight
        # D warm-up: only D trains (the student's engine is not stepped), giving D the head start that
        # DESIGN.md's calibration found it needs against a fast student.
        self.d_only = d_only
        self.timesteps = torch.tensor(trailing_timesteps(student_steps, schedule.num_train_timesteps))

    def _judge(self, x_next, t_next, cond, x_t, t, frozen: bool = False):
        # The G step calls D's module, not its engine: D is a frozen function there, and the engine's
        # forward would hook D's backward bookkeeping (ZeRO-2 buckets) onto the student's backward.
        disc = self.disc.module if frozen else self.disc
        if self.conditional:
            return disc(x_next, t_next, cond, x_t, t)
        return disc(x_next, t_next, cond)

    def judge_real_and_fake(self, p: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """D's logits for real and (detached) fake in one call: one bigger batch, and the conditional D's
        x_t branch, the same for both, runs once."""
        both = torch.cat([p["real"], p["fake"].detach()])
        logits = self._judge(both, torch.cat([p["d_t"], p["d_t"]]), p["cond"], p["x_t"], p["t"])
        return logits.chunk(2)

    def _set_disc_trainable(self, flag: bool) -> None:
        # ZeRO-2 asserts "gradient computed twice" if D's parameters collect grads in the G backward.
        for p in self.disc.module.parameters():
            p.requires_grad_(flag)

    def prepare(self, batch: dict, rand: SampleRandom) -> dict:
        """Teacher's jump (real) and the student's move (fake, with grad unless D warms up) from one x_t."""
        x_t, t, t_next, cond = noisy_inputs(batch, rand, self.schedule, self.timesteps, self.student_steps)
        dev = x_t.device
        moves = self.teacher_steps // self.student_steps
        real = teacher_jump(self.schedule, guided_denoiser(self.teacher, cond, 1.0), x_t, t, moves,
                            self.teacher_steps, self.teacher_prediction_type)
        with torch.set_grad_enabled(not self.d_only):
            out = unet_forward(self.student, x_t, t, cond)
        fake = move(self.schedule, out, x_t, t, t_next, self.prediction_type)
        d_t = t_next
        if len(self.t_star):
            # Multi-timestep D: both landings to their x0, re-noised with the same fresh noise to a t*
            # drawn per sample.
            d_t = host_to_device(self.t_star[rand.choice(self.t_star_weights)], dev)
            noise = _randn_like(x_t, rand)
            real = self.schedule.renoise(implied_x0(self.schedule, x_t, real, t, t_next), noise, d_t)
            fake = self.schedule.renoise(implied_x0(self.schedule, x_t, fake, t, t_next), noise, d_t)
        return {"x_t": x_t, "t": t, "cond": cond, "real": real, "fake": fake, "d_t": d_t}

    def d_step(self, p: dict) -> dict[str, torch.Tensor]:
        """L_D = -log p(real) - log(1 - p(fake)); the fake is detached (the student is not touched)."""
        real_logits, fake_logits = self.judge_real_and_fake(p)
        loss_d = d_loss(real_logits, fake_logits)
        self.disc.backward(loss_d)  # one backward per engine per step: real and fake terms summed
        self.disc.step()
        acc_real, acc_fake = d_accuracy(real_logits, fake_logits)
        logs = {"d_loss": loss_d.detach(), "d_acc_real": acc_real, "d_acc_fake": acc_fake}
        for ts in self.t_star_values:  # per-t* terms: can D still tell them apart at this t*?
            # NaN where no sample drew this t* (the loop averages with nanmean): no data-dependent branch,
            # so no host-device sync.
            logs[f"d_acc_real_t{ts}"], logs[f"d_acc_fake_t{ts}"] = d_accuracy(real_logits, fake_logits, p["d_t"] == ts)
        return logs

    def g_step(self, p: dict) -> dict[str, torch.Tensor]:
        """L_G = -log p(fake) through the (just updated) D, whose parameters must not collect gradients:
        ZeRO-2 asserts "gradient computed twice" otherwise."""
        self._set_disc_trainable(False)
        try:
            loss_g = g_loss(self._judge(p["fake"], p["d_t"], p["cond"], p["x_t"], p["t"], frozen=True))
            loss_mse = F.mse_loss(p["fake"], p["real"])
            self.student.backward(loss_g + self.mse_weight * loss_mse if self.mse_weight else loss_g)
            self.student.step()
        finally:
            self._set_disc_trainable(True)
        return {"g_loss": loss_g.detach(), "mse": loss_mse.detach()}

    def micro_step(self, batch: dict, rand: SampleRandom) -> dict[str, torch.Tensor]:
        """The G step, then the D step. Neither engine's weights change before its accumulation boundary,
        so with this order every micro-batch's G step judges through the same D (the step's starting one)
        and every D step sees the same student: k micro-batches of b accumulate exactly what one of k x b
        computes (tested). With D first, the boundary micro-batch's G step would see an updated D and the
        others the old one."""
        p = self.prepare(batch, rand)
        logs = {} if self.d_only else self.g_step(p)
        logs.update(self.d_step(p))
        return logs
