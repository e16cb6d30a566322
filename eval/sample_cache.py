"""A reference model's sampled images kept on disk, so that several evaluations against the same teacher
(one per step count in bench/shapes_table.py) sample it once.

An entry is keyed by everything that decides the images: the model folder and its files' modification times,
steps, guidance, noise seed, dtype, device type and the prompts. A retrained model or another prompt set misses the cache.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch


def sample_key(model: Path, steps: int, guidance: float, seed: int, dtype: str, device: str,
               prompts: list[str]) -> dict:
    model = Path(model).resolve()
    newest = max((f.stat().st_mtime_ns for f in model.rglob("*") if f.is_file()), default=0)
    return {"model": str(model), "newest_file_mtime_ns": newest, "steps": steps, "guidance": guidance,
            "seed": seed, "dtype": dtype, "device": torch.device(device).type,
            "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()}


def _path(cache_dir: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir) / f"samples_{digest}.npz"


def load_samples(cache_dir: Path, key: dict) -> np.ndarray | None:
    """The cached uint8 images (N, H, W, 3) for `key`, or None."""
    path = _path(cache_dir, key)
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as saved:
        if json.loads(str(saved["key"])) != key:  # a digest collision, or a file copied from elsewhere
            return None
        return saved["images"]


def save_samples(cache_dir: Path, key: dict, images: np.ndarray) -> Path:
    """Writes atomically: a crash mid-write leaves no half entry."""
    path = _path(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, images=np.asarray(images, dtype=np.uint8), key=np.array(json.dumps(key, sort_keys=True)))
    os.replace(tmp, path)
    return path


class RecordingSampler:
    """Passes `sample` through to a sampler and keeps every image by its index."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.images: dict[int, np.ndarray] = {}

    def sample(self, captions, indices, steps, guidance, seed) -> np.ndarray:
        images = self.sampler.sample(captions, indices, steps, guidance, seed)
        self.images.update(zip(indices, images))
        return images

    def stacked(self) -> np.ndarray:
        return np.stack([self.images[i] for i in range(len(self.images))])


class ReplaySampler:
    """Serves cached images by index, in a sampler's place."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def sample(self, captions, indices, steps, guidance, seed) -> np.ndarray:
        return self.images[list(indices)]
