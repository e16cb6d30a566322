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

from .discriminator import d_accuracy, d_loss, g_loss
from .models import Conditioning, guided_denoiser, unet_forward
from .schedule import NoiseSchedule, move, next_timestep, teacher_jump, trailing_timesteps


class Objective(Protocol):
    engines: dict
    def micro_step(self, batch: dict, gen: torch.Generator) -> dict[str, torch.Tensor]: ...


def _randn_like(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    # Drawn on the CPU from the step's generator so every device and rank count reproduces it.
    return torch.randn(x.shape, generator=gen, dtype=torch.float32).to(x.device)


def noisy_inputs(batch: dict, gen: torch.Generator, schedule: NoiseSchedule, timesteps: torch.Tensor):
    """The distillation objectives' shared start: x_t at a timestep drawn from the student's grid (pure
    noise at t = T), and the batch's conditioning. Returns (x_t, t, cond)."""
    x0 = batch["latent"]
    eps = _randn_like(x0, gen)
    t = timesteps[torch.randint(0, len(timesteps), (x0.shape[0],), generator=gen)]
    return schedule.add_noise(x0, eps, t), t, Conditioning.from_batch(batch)


class DenoiseObjective:
    def __init__(self, engine, schedule: NoiseSchedule, prediction_type: str, caption_dropout: float):
        self.engines = {"student": engine}
        self.engine = engine
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.caption_dropout = caption_dropout

    def micro_step(self, batch: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
        x0 = batch["latent"]
        b = x0.shape[0]
        eps = _randn_like(x0, gen)
        t = torch.randint(0, self.schedule.num_train_timesteps, (b,), generator=gen)
        keep = torch.rand(b, generator=gen) >= self.caption_dropout
        alpha, sigma = (a.to(x0.device) for a in self.schedule.alpha_sigma(t))
        x_t = alpha * x0 + sigma * eps  # ordinary forward process: the teacher learns the real schedule
        cond = Conditioning.from_batch(batch).drop(keep)
        out = unet_forward(self.engine, x_t, t.to(x0.device), cond)
        target = self.schedule.target(x0, eps, t, self.prediction_type)
        loss = F.mse_loss(out, target)
        self.engine.backward(loss)
        self.engine.step()
        return {"loss": loss.detach()}


class MSEDistillObjective:
    def __init__(self, engine, teacher: torch.nn.Module, schedule: NoiseSchedule, prediction_type: str,
                 teacher_prediction_type: str, student_steps: int, teacher_steps: int, cfg_scale: float):
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

    def micro_step(self, batch: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
        x_t, t, cond = noisy_inputs(batch, gen, self.schedule, self.timesteps)
        target = teacher_jump(self.schedule, guided_denoiser(self.teacher, cond, self.cfg_scale), x_t,
                              t.to(x_t.device), self.moves_per_step, self.teacher_steps, self.teacher_prediction_type)
        t_next = next_timestep(t, self.student_steps, self.schedule.num_train_timesteps)
        out = unet_forward(self.engine, x_t, t.to(x_t.device), cond)
        landed = move(self.schedule, out, x_t, t, t_next, self.prediction_type)
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
        self.timesteps = torch.tensor(trailing_timesteps(student_steps, schedule.num_train_timesteps))

    def micro_step(self, batch: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
        x_t, t, cond = noisy_inputs(batch, gen, self.schedule, self.timesteps)
        with torch.no_grad():
            out = unet_forward(self.frozen, x_t, t.to(x_t.device), cond)
            target, _ = self.schedule.to_x0_eps(out, x_t, t, self.frozen_prediction_type)
        pred = unet_forward(self.engine, x_t, t.to(x_t.device), cond)  # the copy now outputs x0 itself
        loss = F.mse_loss(pred, target)
        self.engine.backward(loss)
        self.engine.step()
        return {"loss": loss.detach()}


def implied_x0(schedule: NoiseSchedule, x_t: torch.Tensor, x_next: torch.Tensor, t: torch.Tensor,
               t_next: torch.Tensor) -> torch.Tensor:
    """The x0 whose DDIM move from x_t at t lands on x_next at t_next (x_next itself when t_next = -1):
    x_next = a' x0 + s' (x_t - a x0) / s  =>  x0 = (x_next - (s'/s) x_t) / (a' - s' a / s)."""
    a, s = (v.to(x_t.device) for v in schedule.alpha_sigma(t))
    a2, s2 = (v.to(x_t.device) for v in schedule.alpha_sigma(t_next))
    return (x_next - (s2 / s) * x_t) / (a2 - s2 * a / s)


class AdversarialObjective:
    """One D step then one G step per micro-batch, on two DeepSpeed engines.

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
        self.t_star_weights = torch.tensor(t_star_weights or [1.0] * len(t_star), dtype=torch.float)
        self.mse_weight = mse_weight
        # D warm-up: only D trains (the student's engine is not stepped), giving D the head start that
        # DESIGN.md's calibration found it needs against a fast student.
        self.d_only = d_only
        self.timesteps = torch.tensor(trailing_timesteps(student_steps, schedule.num_train_timesteps))

    def _judge(self, x_next, t_next, cond, x_t, t):
        if self.conditional:
            return self.disc(x_next, t_next, cond, x_t, t)
        return self.disc(x_next, t_next, cond)

    def _set_disc_trainable(self, flag: bool) -> None:
        # ZeRO-2 asserts "gradient computed twice" if D's parameters collect grads in the G backward.
        for p in self.disc.module.parameters():
            p.requires_grad_(flag)

    def prepare(self, batch: dict, gen: torch.Generator) -> dict:
        """Teacher's jump (real) and the student's move (fake, with grad unless D warms up) from one x_t."""
        x_t, t, cond = noisy_inputs(batch, gen, self.schedule, self.timesteps)
        dev, b = x_t.device, x_t.shape[0]
        t_next = next_timestep(t, self.student_steps, self.schedule.num_train_timesteps)
        moves = self.teacher_steps // self.student_steps
        real = teacher_jump(self.schedule, guided_denoiser(self.teacher, cond, 1.0), x_t, t.to(dev), moves,
                            self.teacher_steps, self.teacher_prediction_type)
        with torch.set_grad_enabled(not self.d_only):
            out = unet_forward(self.student, x_t, t.to(dev), cond)
        fake = move(self.schedule, out, x_t, t, t_next, self.prediction_type)
        d_t = t_next
        if len(self.t_star):
            # Multi-timestep D: both landings to their x0, re-noised with the same fresh noise to a t*
            # drawn per sample.
            pick = torch.multinomial(self.t_star_weights, b, replacement=True, generator=gen)
            d_t = self.t_star[pick]
            noise = _randn_like(x_t, gen)
            real = self.schedule.renoise(implied_x0(self.schedule, x_t, real, t, t_next), noise, d_t)
            fake = self.schedule.renoise(implied_x0(self.schedule, x_t, fake, t, t_next), noise, d_t)
        return {"x_t": x_t, "t": t.to(dev), "cond": cond, "real": real, "fake": fake, "d_t": d_t.to(dev)}

    def d_step(self, p: dict) -> dict[str, torch.Tensor]:
        """L_D = -log p(real) - log(1 - p(fake)); the fake is detached (the student is not touched)."""
        real_logits = self._judge(p["real"], p["d_t"], p["cond"], p["x_t"], p["t"])
        fake_logits = self._judge(p["fake"].detach(), p["d_t"], p["cond"], p["x_t"], p["t"])
        loss_d = d_loss(real_logits, fake_logits)
        self.disc.backward(loss_d)  # one backward per engine per step: real and fake terms summed
        self.disc.step()
        acc_real, acc_fake = d_accuracy(real_logits, fake_logits)
        logs = {"d_loss": loss_d.detach(), "d_acc_real": acc_real, "d_acc_fake": acc_fake}
        for ts in self.t_star.tolist():  # per-t* terms: can D still tell them apart at this t*?
            sel = p["d_t"] == ts
            if sel.any():
                logs[f"d_acc_real_t{ts}"], logs[f"d_acc_fake_t{ts}"] = d_accuracy(real_logits[sel], fake_logits[sel])
        return logs

    def g_step(self, p: dict) -> dict[str, torch.Tensor]:
        """L_G = -log p(fake) through the (just updated) D, whose parameters must not collect gradients:
        ZeRO-2 asserts "gradient computed twice" otherwise."""
        self._set_disc_trainable(False)
        try:
            loss_g = g_loss(self._judge(p["fake"], p["d_t"], p["cond"], p["x_t"], p["t"]))
            loss_mse = F.mse_loss(p["fake"], p["real"])
            self.student.backward(loss_g + self.mse_weight * loss_mse if self.mse_weight else loss_g)
            self.student.step()
        finally:
            self._set_disc_trainable(True)
        return {"g_loss": loss_g.detach(), "mse": loss_mse.detach()}

    def micro_step(self, batch: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
        p = self.prepare(batch, gen)
        logs = self.d_step(p)
        if not self.d_only:
            logs.update(self.g_step(p))
        return logs
