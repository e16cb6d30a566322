"""Feature backends: one interface, two implementations.

A backend turns a batch of images (uint8 HxWx3) into
- FID features of the whole view (the whole image resized to the extractor's input size) and of the
  patch view (the centre crop of the full-resolution image at the input size; None when images are
  smaller than that), see eval.images;
- per-image text-alignment scores against the captions ("alignment" is the headline one; a backend may
  add more, e.g. per-attribute hits).

Backends:
- "shapes": the project's shapes classifier (eval.shapes_classifier): 16 px input, 128-d penultimate
  features, alignment = attribute accuracy (mean of the shape, colour and position hits).
- "inception": FID InceptionV3 (eval.inception, 299 px, 2048-d pool3 features; pytorch-fid's smaller
  --dims are available) and, when a CLIP folder is given, the CLIP score (eval.clip_score) as alignment.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from eval.images import Images, patch_view, whole_view


class FeatureBackend(ABC):
    name: str
    input_size: int
    feature_dim: int
    alignment_name: str  # what "alignment" is, for tables

    @abstractmethod
    def _features(self, views: torch.Tensor) -> np.ndarray:
        """views [N,3,S,S] in [0,1] -> features [N, feature_dim] (float64)."""

    @abstractmethod
    def alignment(self, images: Images, captions: Sequence[str]) -> Optional[dict[str, np.ndarray]]:
        """Per-image scores {"alignment": [N], ...}, or None when this backend has no alignment model."""

    def features(self, views: torch.Tensor, batch_size: int = 64) -> np.ndarray:
        return np.concatenate([self._features(views[i:i + batch_size]) for i in range(0, len(views), batch_size)])

    def whole_features(self, images: Images) -> np.ndarray:
        return self.features(whole_view(images, self.input_size))

    def patch_features(self, images: Images) -> Optional[np.ndarray]:
        views = patch_view(images, self.input_size)
        return None if views is None else self.features(views)


class ShapesBackend(FeatureBackend):
    name = "shapes"
    alignment_name = "attribute accuracy"

    def __init__(self, weights: Optional[str | Path] = None, device: str | torch.device = "cpu"):
        from eval import shapes_classifier as sc

        self._sc = sc
        self.device = torch.device(device)
        self.model = sc.load(weights or sc.DEFAULT_WEIGHTS).to(self.device)
        self.input_size = sc.INPUT_SIZE
        self.feature_dim = self.model.config["feature_dim"]

    @torch.no_grad()
    def _features(self, views: torch.Tensor) -> np.ndarray:
        return self.model.features(views.to(self.device)).double().cpu().numpy()

    @torch.no_grad()
    def alignment(self, images: Images, captions: Sequence[str]) -> dict[str, np.ndarray]:
        from trainer.data.shapes import parse_caption

        labels = self._sc.labels_of([parse_caption(c) for c in captions])
        _, pred = self._sc.predict(self.model, whole_view(images, self.input_size).to(self.device))
        hits = ((pred.cpu() == labels) | (labels == self._sc.ANY_POSITION)).float().numpy()
        out = {name: hits[:, i] for i, name in enumerate(self._sc.HEADS)}
        out["all"] = hits.all(1).astype(np.float64)
        out["alignment"] = hits.mean(1)
        return out


class InceptionBackend(FeatureBackend):
    name = "inception"
    alignment_name = "CLIP score"

    def __init__(self, inception_weights: str | Path, clip: Optional[str | Path] = None,
                 device: str | torch.device = "cpu", dims: int = 2048):
        from eval.inception import BLOCK_DIMS, INPUT_SIZE, load_fid_inception

        if dims not in BLOCK_DIMS:
            raise ValueError(f"Inception feature dims must be one of {BLOCK_DIMS}, got {dims}")
        self.device = torch.device(device)
        self.model = load_fid_inception(inception_weights, self.device)
        self.input_size, self.feature_dim = INPUT_SIZE, dims
        self.clip = None
        if clip is not None:
            from eval.clip_score import ClipScorer

            self.clip = ClipScorer(clip, self.device)

    @torch.no_grad()
    def _features(self, views: torch.Tensor) -> np.ndarray:
        return self.model.features(views.to(self.device), self.feature_dim).double().cpu().numpy()

    def alignment(self, images: Images, captions: Sequence[str]) -> Optional[dict[str, np.ndarray]]:
        if self.clip is None:
            return None
        return {"alignment": self.clip.scores(list(images), captions)}


def make_backend(name: str, *, classifier: Optional[str | Path] = None, inception: Optional[str | Path] = None,
                 clip: Optional[str | Path] = None, device: str | torch.device = "cpu",
                 inception_dims: int = 2048) -> FeatureBackend:
    if name == "shapes":
        return ShapesBackend(classifier, device)
    if name == "inception":
        if inception is None:
            from eval.inception import WEIGHTS_URL

            raise ValueError(f"--backend inception needs --inception PATH (the FID weights, {WEIGHTS_URL})")
        return InceptionBackend(inception, clip, device, inception_dims)
    raise ValueError(f"unknown backend {name!r}: expected 'shapes' or 'inception'")
