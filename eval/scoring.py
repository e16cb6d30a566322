"""Accumulates one image set's scores batch by batch (nothing but statistics is kept, so a 10K-image
evaluation at 1024 px never holds the images) and compares a set with the reference set."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from eval.features import FeatureBackend
from eval.fid import FeatureStats, fid_of_stats
from eval.images import Images


class SetScores:
    def __init__(self, backend: FeatureBackend, alignment: bool = True):
        self.backend = backend
        self.whole = FeatureStats(backend.feature_dim)
        self.patch: Optional[FeatureStats] = FeatureStats(backend.feature_dim)
        self.want_alignment = alignment
        self._align_sums: dict[str, float] = {}
        self.count = 0

    def add(self, images: Images, captions: Optional[Sequence[str]] = None) -> None:
        self.whole.update(self.backend.whole_features(images))
        if self.patch is not None:
            patch = self.backend.patch_features(images)
            if patch is None:  # images smaller than the extractor's input: no FID-Patch for this set
                self.patch = None
            else:
                self.patch.update(patch)
        if self.want_alignment and captions is not None:
            scores = self.backend.alignment(images, captions)
            if scores is not None:
                for key, values in scores.items():
                    self._align_sums[key] = self._align_sums.get(key, 0.0) + float(np.sum(values))
        self.count += len(images)

    def alignment(self) -> dict[str, float]:
        return {k: v / self.count for k, v in self._align_sums.items()}

    def compare(self, reference: "SetScores") -> dict:
        """{fid_whole, fid_patch (None where undefined), alignment (None without a model), alignment_detail}."""
        align = self.alignment()
        fid_patch = None
        if self.patch is not None and reference.patch is not None:
            fid_patch = fid_of_stats(self.patch, reference.patch)
        return {
            "fid_whole": fid_of_stats(self.whole, reference.whole),
            "fid_patch": fid_patch,
            "alignment": align.get("alignment"),
            "alignment_detail": {k: v for k, v in align.items() if k != "alignment"},
        }
