"""Sampling with diffusers' EulerDiscreteScheduler (trailing spacing), the scheduler users get in the
export, and image grids."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import EulerDiscreteScheduler
from PIL import Image

from trainer.config import ScheduleConfig
from trainer.method.models import Conditioning, guided_denoiser


def make_scheduler(schedule: ScheduleConfig, prediction_type: str) -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(
        num_train_timesteps=schedule.num_train_timesteps,
        beta_start=schedule.beta_start,
        beta_end=schedule.beta_end,
        beta_schedule=schedule.beta_schedule,
        prediction_type=prediction_type,
        timestep_spacing="trailing",
    )


@torch.no_grad()
def sample_latents(unet: torch.nn.Module, scheduler: EulerDiscreteScheduler, cond: Conditioning,
                   noise: torch.Tensor, steps: int, guidance: float = 1.0,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Deterministic Euler sampling from `noise` (unit variance); returns float32 latents."""
    denoise = guided_denoiser(unet, cond, guidance, dtype)
    scheduler.set_timesteps(steps, device=noise.device)
    x = noise.float() * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(x, t)
        out = denoise(model_in, t.expand(x.shape[0]).long())
        x = scheduler.step(out, t, x, return_dict=False)[0]
    return x


@torch.no_grad()
def sample_images(unet: torch.nn.Module, scheduler: EulerDiscreteScheduler, cond: Conditioning, noise: torch.Tensor,
                  codec, steps: int, guidance: float = 1.0, batch_size: int | None = None) -> np.ndarray:
    """uint8 [N, H, W, 3]: `cond` sampled by `unet` from `noise` where the UNet is and in its dtype, decoded by
    `codec`; `batch_size` images at a time (None: all at once)."""
    param = next(unet.parameters())
    size = batch_size or len(noise)
    out = []
    for i in range(0, len(noise), size):
        part = Conditioning(*(None if t is None else t[i:i + size] for t in (cond.prompt_embeds, cond.pooled, cond.time_ids)))
        latents = sample_latents(unet, scheduler, part.to(param.device), noise[i:i + size].to(param.device), steps,
                                 guidance, param.dtype)
        out.append(to_uint8(codec.decode(latents.float())))
    return np.concatenate(out)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] float BCHW -> uint8 BHWC."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: np.ndarray | list, ncols: int, pad: int = 2, scale: int = 1) -> np.ndarray:
    """Uint8 HWC images -> one uint8 grid image (row-major), optionally upscaled for viewing."""
    images = [np.asarray(im) for im in images]
    h, w, c = images[0].shape
    nrows = (len(images) + ncols - 1) // ncols
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, im in enumerate(images):
        r, col = divmod(i, ncols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = im
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    return grid


def save_png(image: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path
