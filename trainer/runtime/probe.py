"""The stage-length probe (config section `probe`): how close a phase's student is to its teacher, measured
while it trains, so that a stage's length can be read off a curve (and, with `probe.stop_when_flat`, ended
where the curve flattens) instead of guessed.

Rank 0 samples the student on a fixed prompt set (the first `probe.count` samples of the shards, so any
dataset works, with fixed noise) at the stage's step count, and takes the FID of those images against the
teacher's samples of the same prompts and noise (the stage's teacher steps and guidance), in the features of
the evaluation's backend (eval/features.py: the shapes classifier for the toy, Inception otherwise). The
teacher's features are computed once per stage and kept in the stage's folder. The feature networks live in
the repository's eval/ package: the probe runs from a clone, as every documented launch does.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from trainer.config import Config, ConfigError, ProbeConfig, ShapesDataConfig
from trainer.data.loader import collate, first_samples
from trainer.method.models import Conditioning, load_unet
from trainer.method.sampling import make_grid, make_scheduler, sample_images

PROBE_NOISE_SEED = 4321
GRID_IMAGES = 16  # the probe images shown beside the curve


def flattened(history: list[float], patience: int, min_improvement: float) -> bool:
    """True once the last `patience` probes each failed to beat the best value before them by more than
    `min_improvement` (relative): the curve (lower is better) has stopped going down."""
    if len(history) <= patience:
        return False
    best_before = min(history[:-patience])
    return all(value > best_before * (1 - min_improvement) for value in history[-patience:])


def probe_prompts(shard_dir: Path, count: int) -> tuple[Conditioning, list[str]]:
    """The text conditioning (float32, CPU) and captions of the first `count` samples of the shards, in index
    order."""
    try:
        rows = first_samples(shard_dir, count)
    except ValueError as err:
        raise ValueError(f"probe: {err}") from None
    if len(rows) < count:
        raise ConfigError(f"probe.count: {count} images asked, the shards in {shard_dir} hold {len(rows)}")
    return Conditioning.from_batch(collate(rows)).to(dtype=torch.float32), [row["caption"] for row in rows]


def failure_rates(images: np.ndarray, captions: list[str], shapes: ShapesDataConfig) -> dict[str, float]:
    """The share of the probe's images each pixel rule of the evaluation flags (eval/pixel_scores.py for one
    shape per image, eval/scene_scores.py's quadrant rules for several): whether a phase draws fewer extra
    shapes as it trains, which its FID does not say."""
    if shapes.objects > 1:
        from eval.scene_scores import scene_signatures as signatures
    else:
        from eval.pixel_scores import failure_signatures as signatures
    return {rule: float(flags.mean()) for rule, flags in signatures(images, captions, shapes.texture).items()}


def _feature_backend(cfg: ProbeConfig, dev: torch.device):
    try:
        from eval.features import make_backend
    except ImportError as err:
        raise ConfigError("probe: the feature networks are in the repository's eval/ package; run from a clone "
                          f"(or set probe.every_samples: 0): {err}") from None
    weights = cfg.weights or None
    return make_backend(cfg.backend, classifier=weights, inception=weights, device=dev)


class Probe:
    """One per run, on rank 0: the prompt set, the noise, the codec and the feature network, loaded on first use."""

    def __init__(self, cfg: Config, base: Path):
        self.cfg, self.base = cfg, base
        self._cond = self._captions = self._noise = self._codec = self._backend = None
        # the toy's own data: its captions say what the pixel rules check
        self.shapes = cfg.data.shapes if cfg.data.source == "shapes" else None

    def _load(self, dev: torch.device) -> None:
        if self._cond is None:
            from trainer.pipeline import latent_shape, load_codec

            self._cond, self._captions = probe_prompts(self.cfg.shard_dir, self.cfg.probe.count)
            gen = torch.Generator().manual_seed(PROBE_NOISE_SEED)
            self._noise = torch.randn([self.cfg.probe.count, *latent_shape(self.cfg)], generator=gen)
            self._codec = load_codec(self.base, dev)
            self._backend = _feature_backend(self.cfg.probe, dev)

    @torch.no_grad()
    def images(self, unet: torch.nn.Module, steps: int, prediction_type: str, guidance: float = 1.0) -> np.ndarray:
        """uint8 [count, H, W, 3]: the probe prompts sampled by `unet` from the probe noise."""
        self._load(next(unet.parameters()).device)
        return sample_images(unet, make_scheduler(self.cfg.schedule, prediction_type), self._cond, self._noise,
                             self._codec, steps, guidance, batch_size=32)

    def features(self, images: np.ndarray) -> np.ndarray:
        return self._backend.whole_features(list(images))

    def failure_rates(self, images: np.ndarray) -> dict[str, float]:
        """The pixel rules' rates on the probe images (the toy's data only; empty otherwise)."""
        return failure_rates(images, self._captions, self.shapes) if self.shapes is not None else {}

    def for_phase(self, stage_dir: Path, teacher_dir: Path, teacher_pred: str, teacher_steps: int,
                  guidance: float, student_steps: int, student_pred: str) -> "PhaseProbe":
        return PhaseProbe(self, stage_dir / "probe_teacher_features.npy", teacher_dir, teacher_pred, teacher_steps,
                          guidance, student_steps, student_pred)


class PhaseProbe:
    """A phase's probe: `measure(student)` -> (FID against the teacher's samples, a grid of the student's, the
    pixel rules' rates on them)."""

    def __init__(self, probe: Probe, teacher_cache: Path, teacher_dir: Path, teacher_pred: str, teacher_steps: int,
                 guidance: float, student_steps: int, student_pred: str):
        self.probe, self.teacher_cache, self.teacher_dir = probe, teacher_cache, teacher_dir
        self.teacher_pred, self.teacher_steps, self.guidance = teacher_pred, teacher_steps, guidance
        self.student_steps, self.student_pred = student_steps, student_pred
        self.every_samples = probe.cfg.probe.every_samples
        self.stop_when_flat = probe.cfg.probe.stop_when_flat
        self.patience, self.min_improvement = probe.cfg.probe.patience, probe.cfg.probe.min_improvement
        self._teacher: Optional[np.ndarray] = None

    def teacher_features(self, dev: torch.device, dtype: torch.dtype) -> np.ndarray:
        """Computed once per stage (the stage's phases share the teacher) and kept beside the phases."""
        if self._teacher is None:
            if self.teacher_cache.is_file():
                self._teacher = np.load(self.teacher_cache)
            else:
                teacher = load_unet(self.teacher_dir).to(dev, dtype).eval()
                images = self.probe.images(teacher, self.teacher_steps, self.teacher_pred, self.guidance)
                del teacher
                self._teacher = self.probe.features(images)
                tmp = self.teacher_cache.with_name(self.teacher_cache.name + ".tmp.npy")
                self.teacher_cache.parent.mkdir(parents=True, exist_ok=True)
                np.save(tmp, self._teacher)
                os.replace(tmp, self.teacher_cache)  # a crash mid-write leaves no half file to read later
        return self._teacher

    @torch.no_grad()
    def measure(self, student: torch.nn.Module) -> tuple[float, np.ndarray, dict[str, float]]:
        from eval.fid import fid_of_features

        param = next(student.parameters())
        teacher = self.teacher_features(param.device, param.dtype)
        images = self.probe.images(student, self.student_steps, self.student_pred)
        fid = fid_of_features(self.probe.features(images), teacher)
        return float(fid), make_grid(images[:GRID_IMAGES], ncols=8, scale=2), self.probe.failure_rates(images)
