"""Objectives: what one micro-step of a job computes. Each objective owns the engines it steps and
declares them in `engines`; the loop only feeds batches, sets learning rates and checkpoints.

- `DenoiseObjective`: ordinary diffusion training (the toy teacher), with caption dropout for CFG.
- `MSEDistillObjective`: progressive distillation as in the paper's first stage: the student's one
  step from x_t must land where the frozen teacher's n-step jump (with CFG) lands.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from .models import Conditioning, guided_denoiser, unet_forward
from .schedule import NoiseSchedule, move, next_timestep, teacher_jump, trailing_timesteps


class Objective(Protocol):
    engines: dict
    def micro_step(self, batch: dict, gen: torch.Generator) -> dict[str, torch.Tensor]: ...


def _randn_like(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    # Drawn on the CPU from the step's generator so every device and rank count reproduces it.
    return torch.randn(x.shape, generator=gen, dtype=torch.float32).to(x.device)


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
        x0 = batch["latent"]
        b = x0.shape[0]
        eps = _randn_like(x0, gen)
        t = self.timesteps[torch.randint(0, len(self.timesteps), (b,), generator=gen)]
        x_t = self.schedule.add_noise(x0, eps, t)  # pure noise at t = T
        cond = Conditioning.from_batch(batch)
        target = teacher_jump(self.schedule, guided_denoiser(self.teacher, cond, self.cfg_scale), x_t,
                              t.to(x0.device), self.moves_per_step, self.teacher_steps, self.teacher_prediction_type)
        t_next = next_timestep(t, self.student_steps, self.schedule.num_train_timesteps)
        out = unet_forward(self.engine, x_t, t.to(x0.device), cond)
        landed = move(self.schedule, out, x_t, t, t_next, self.prediction_type)
        loss = F.mse_loss(landed, target)
        self.engine.backward(loss)
        self.engine.step()
        return {"loss": loss.detach()}
