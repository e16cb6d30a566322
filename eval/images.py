"""Image views that feature extractors see, and the image degradations the shapes classifier is trained
and checked against. Images enter as uint8 HxWx3 arrays (one array [N,H,W,3] or a list of arrays of
any sizes); views leave as float tensors [N,3,S,S] in [0,1].

- whole view: the whole image (centre-cropped to a square when it is not one) resized to S x S, bilinear
  with antialiasing when shrinking (the same filter as PIL's bilinear resize, as clean-fid recommends;
  pytorch-fid's plain bilinear interpolation aliases when it shrinks 1024 px to 299 px),
- patch view: the S x S centre crop of the full-resolution image, no resizing (the paper's FID-Patch:
  299 px crops of 1024 px images). Undefined for images smaller than S: `patch_view` returns None.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

Images = Union[np.ndarray, Sequence[np.ndarray]]


def _as_list(images: Images) -> list[np.ndarray]:
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    return [np.asarray(im) for im in images]


def to_tensor(images: Images) -> torch.Tensor:
    """Same-size uint8 images -> float [N,3,H,W] in [0,1]."""
    arr = np.stack(_as_list(images)) if not (isinstance(images, np.ndarray) and images.ndim == 4) else images
    if arr.dtype != np.uint8:
        raise TypeError(f"expected uint8 images, got {arr.dtype}")
    arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:  # e.g. np.asarray of a PIL image
        arr = arr.copy()
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float [N,3,H,W] in [0,1] -> uint8 [N,H,W,3]."""
    return (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def _centre_square(im: np.ndarray) -> np.ndarray:
    h, w = im.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return im[top:top + s, left:left + s]


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    shrink = x.shape[-1] > size
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink).clamp(0, 1)


def whole_view(images: Images, size: int) -> torch.Tensor:
    ims = _as_list(images)
    if all(im.shape == ims[0].shape for im in ims) and ims[0].shape[0] == ims[0].shape[1]:
        return resize(to_tensor(np.stack(ims)), size)
    return torch.cat([resize(to_tensor(_centre_square(im)[None]), size) for im in ims])


def patch_view(images: Images, size: int) -> Optional[torch.Tensor]:
    ims = _as_list(images)
    if any(min(im.shape[:2]) < size for im in ims):
        return None
    crops = []
    for im in ims:
        h, w = im.shape[:2]
        top, left = (h - size) // 2, (w - size) // 2
        crops.append(im[top:top + size, left:left + size])
    return to_tensor(np.stack(crops))


# --- degradations ---------------------------------------------------------------------------------

BACKGROUND = torch.tensor([30, 30, 30]) / 255.0  # trainer.data.shapes.BACKGROUND


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur (sigma [N] in pixels, 0 = none), separable, reflect padding."""
    n, c, h, w = x.shape
    radius = max(1, int(np.ceil(3 * float(sigma.max())))) if float(sigma.max()) > 0 else 1
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype)
    s = sigma.to(x.dtype).clamp_min(1e-3)[:, None]
    kernel = torch.exp(-0.5 * (offsets[None] / s) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)  # sigma ~ 0 -> a delta
    kernel = kernel.repeat_interleave(c, 0)  # [N*C, k]
    y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, kernel[:, None, None, :], groups=n * c)
    y = F.conv2d(y, kernel[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def degrade(x: torch.Tensor, blur_sigma: torch.Tensor, noise_std: torch.Tensor, tint: torch.Tensor,
            generator: Optional[torch.Generator] = None, quantize: bool = True) -> torch.Tensor:
    """Background tint (tint [N,3] added where the image is background), then blur, then Gaussian noise
    (std [N]), on float [N,3,H,W] in [0,1]; quantized to 8 bits like a saved image."""
    dist = (x - BACKGROUND.to(x)[None, :, None, None]).abs().amax(1, keepdim=True)
    background = (1 - dist / 0.2).clamp(0, 1)  # 1 on the flat background, 0 inside the shape
    y = x + tint[:, :, None, None].to(x) * background
    y = gaussian_blur(y, blur_sigma)
    y = y + noise_std.to(x)[:, None, None, None] * torch.randn(y.shape, generator=generator, dtype=y.dtype)
    y = y.clamp(0, 1)
    return (y * 255).round() / 255 if quantize else y


# At strength 1 (the top of what eval/classifier_check.py shows): blur sigma 1 px, noise std 0.08 (20/255),
# background tint up to 0.12 (30/255) per channel, all at the dataset's 32 px.
DEGRADE_MAX = {"blur_sigma": 1.0, "noise_std": 0.08, "tint": 0.12}


def degrade_at(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Every degradation at once, at `strength` x DEGRADE_MAX; the tint's direction is random per image."""
    n = x.shape[0]
    tint = (torch.rand(n, 3, generator=generator) * 2 - 1) * DEGRADE_MAX["tint"] * strength
    return degrade(x, torch.full((n,), DEGRADE_MAX["blur_sigma"] * strength),
                   torch.full((n,), DEGRADE_MAX["noise_std"] * strength), tint, generator)


def random_augment(x: torch.Tensor, generator: torch.Generator, p: float = 0.7, reach: float = 1.3) -> torch.Tensor:
    """Training augmentation: each degradation on with probability p, at a uniform strength up to
    `reach` x DEGRADE_MAX (beyond what the check shows, so that the check stays inside training)."""
    n = x.shape[0]
    on = lambda: (torch.rand(n, generator=generator) < p).float()
    strength = lambda: torch.rand(n, generator=generator) * reach
    blur = on() * strength() * DEGRADE_MAX["blur_sigma"]
    noise = on() * strength() * DEGRADE_MAX["noise_std"]
    tint = (torch.rand(n, 3, generator=generator) * 2 - 1) * (on() * strength() * DEGRADE_MAX["tint"])[:, None]
    return degrade(x, blur, noise, tint, generator)
