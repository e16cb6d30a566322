"""Noise schedule and the deterministic solver the teacher and the student share.

Conventions (DDPM, discrete timesteps 0..T-1): x_t = alpha_t * x0 + sigma_t * eps with
alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t). Timestep -1 stands for the clean sample
(alpha = 1, sigma = 0), the end of every sampling trajectory.

`move` is one DDIM step: predict (x0, eps) at t and re-noise x0 with the predicted eps to t'. It is
exactly what diffusers' EulerDiscreteScheduler does for the same pair of timesteps, so a student
trained on `move` samples correctly with that scheduler.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from trainer.config import ScheduleConfig


@dataclass
class NoiseSchedule:
    alphas_cumprod: torch.Tensor  # float64, [T]
    pure_noise_at_T: bool = True
    # (alpha, sigma) float32 tables per device, so lookups stay on the timesteps' device: a GPU step
    # never waits for a device-to-host copy of t (#7, no host-device sync in the hot loop).
    _tables: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_config(cls, cfg: ScheduleConfig) -> "NoiseSchedule":
        # SDXL's "scaled_linear": linear in sqrt(beta).
        betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, cfg.num_train_timesteps, dtype=torch.float64) ** 2
        return cls(torch.cumprod(1.0 - betas, dim=0), cfg.pure_noise_at_T)

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_t, sigma_t as float32 [B,1,1,1] on t's device; t = -1 gives (1, 0)."""
        key = str(t.device)
        if key not in self._tables:
            # One extra entry (1, 0) at the end: index -1 is the clean sample. sqrt in float64, as before.
            abar = torch.cat([self.alphas_cumprod, torch.ones(1, dtype=torch.float64)])
            self._tables[key] = (abar.sqrt().float().to(t.device), (1.0 - abar).sqrt().float().to(t.device))
        alpha, sigma = self._tables[key]
        index = t.long()
        return alpha[index].view(-1, 1, 1, 1), sigma[index].view(-1, 1, 1, 1)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Forward noising; at t = T-1 the input is pure noise when pure_noise_at_T (the paper's fix:
        SDXL's schedule never reaches pure noise, but inference starts from it)."""
        alpha, sigma = self.alpha_sigma(t.to(x0.device))
        x_t = alpha * x0 + sigma * eps
        if self.pure_noise_at_T:
            at_T = (t.to(x0.device) == self.num_train_timesteps - 1).view(-1, 1, 1, 1)
            x_t = torch.where(at_T, eps, x_t)
        return x_t

    # -- conversions between what a network predicts and (x0, eps) ------------------------------

    def to_x0_eps(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction_type: str):
        alpha, sigma = self.alpha_sigma(t.to(x_t.device))
        out, x_t = out.float(), x_t.float()
        if prediction_type == "epsilon":
            eps = out
            x0 = (x_t - sigma * eps) / alpha
        elif prediction_type == "v_prediction":
            x0 = alpha * x_t - sigma * out
            eps = sigma * x_t + alpha * out
        elif prediction_type == "sample":
            x0 = out
            eps = (x_t - alpha * x0) / sigma
        else:
            raise ValueError(f"unknown prediction_type {prediction_type!r}")
        return x0, eps

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, prediction_type: str) -> torch.Tensor:
        """What a network of `prediction_type` should output for this (x0, eps) at t."""
        if prediction_type == "epsilon":
            return eps
        if prediction_type == "sample":
            return x0
        alpha, sigma = self.alpha_sigma(t.to(x0.device))
        return alpha * eps - sigma * x0

    def min_snr_weight(self, t: torch.Tensor, gamma: float, prediction_type: str, plus_one: bool = False) -> torch.Tensor:
        """[B,1,1,1] weights on t's device that turn the plain MSE on a `prediction_type` output into the x0
        error weighted by min(SNR, gamma), or with `plus_one` by min(SNR + 1, gamma) (v-prediction's own weight,
        capped: the high-noise end keeps weight 1 where min(SNR, gamma) goes to 0). The plain loss already
        weighs the x0 error by SNR (epsilon), SNR + 1 (v_prediction) or 1 (sample)."""
        alpha, sigma = self.alpha_sigma(t)
        snr = alpha.square() / sigma.square()
        implied = {"epsilon": snr, "v_prediction": snr + 1, "sample": torch.ones_like(snr)}
        if prediction_type not in implied:
            raise ValueError(f"unknown prediction_type {prediction_type!r}")
        return (snr + 1 if plus_one else snr).clamp(max=gamma) / implied[prediction_type]

    def renoise(self, x0: torch.Tensor, eps: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(t_next.to(x0.device))
        return alpha * x0 + sigma * eps


def trailing_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """Diffusers' "trailing" spacing: 4 steps of 1000 -> [999, 749, 499, 249]."""
    ts = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps)).astype(np.int64) - 1
    return ts.tolist()


# Off-grid entries: far out of every table's range, so that an unchecked off-grid t fails loudly at its
# next alpha_sigma lookup (IndexError on the CPU, a device-side assert on a GPU) instead of silently.
_OFF_GRID = -(10**9)
_next_tables: dict = {}


def _next_table(num_steps: int, num_train_timesteps: int, device: torch.device) -> torch.Tensor:
    """table[t] = the next timestep for t on the grid, _OFF_GRID elsewhere (cached per device)."""
    key = (num_steps, num_train_timesteps, str(device))
    if key not in _next_tables:
        grid = trailing_timesteps(num_steps, num_train_timesteps) + [-1]
        table = torch.full((num_train_timesteps,), _OFF_GRID, dtype=torch.long)
        table[grid[:-1]] = torch.tensor(grid[1:])
        _next_tables[key] = table.to(device)
    return _next_tables[key]


def next_timestep(t: torch.Tensor, num_steps: int, num_train_timesteps: int = 1000,
                  check: bool = True) -> torch.Tensor:
    """The timestep one step later on the trailing grid of `num_steps` (-1 after the last), on t's
    device: a table lookup, so a GPU step never copies t to the host. `check` reads t back to name an
    off-grid value; the training step passes False (its timesteps are drawn from the grid)."""
    t = t.long()
    out = _next_table(num_steps, num_train_timesteps, t.device)[t.clamp(0, num_train_timesteps - 1)]
    if check:
        bad = (out == _OFF_GRID) | (t < 0) | (t >= num_train_timesteps)
        if bool(bad.any()):
            raise ValueError(f"timestep {int(t[bad][0])} is not on the {num_steps}-step trailing grid")
    return out


# A denoiser maps (x_t, t) -> raw network output; conditioning is bound by the caller.
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def move(schedule: NoiseSchedule, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
         t_next: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """One DDIM step from x_t at t to t_next given the network's output (float32 result)."""
    x0, eps = schedule.to_x0_eps(out, x_t, t, prediction_type)
    return schedule.renoise(x0, eps, t_next)


@torch.no_grad()
def teacher_jump(schedule: NoiseSchedule, denoise: Denoiser, x_t: torch.Tensor, t: torch.Tensor,
                 num_moves: int, teacher_steps: int, prediction_type: str) -> torch.Tensor:
    """The teacher's n-step jump: `num_moves` DDIM moves along its own `teacher_steps` trailing grid.
    Classifier-free guidance, if any, lives inside `denoise` (one doubled batch per move)."""
    x = x_t.float()
    for _ in range(num_moves):
        t_next = next_timestep(t, teacher_steps, schedule.num_train_timesteps, check=False)
        x = move(schedule, denoise(x, t), x, t, t_next, prediction_type)
        t = t_next
    return x
