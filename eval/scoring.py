"""Accumulates one image set's scores batch by batch (nothing but statistics is kept, so a 10K-image
evaluation at 1024 px never holds the images) and compares a set with the reference set."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from eval.features import FeatureBackend
from eval.fid import FeatureStats, fid_of_stats
from eval.images import Images


class SetScores:
    """keep_features: also keep every image's feature rows and alignment (float32; 10K Inception rows are
    80 MB), which the bootstrap intervals of `compare` resample."""

    def __init__(self, backend: FeatureBackend, alignment: bool = True, keep_features: bool = False):
        self.backend = backend
        self.whole = FeatureStats(backend.feature_dim)
        self.patch: Optional[FeatureStats] = FeatureStats(backend.feature_dim)
        self.want_alignment = alignment
        self._align_sums: dict[str, float] = {}
        self.count = 0
        self.kept: Optional[dict[str, list]] = {"whole": [], "patch": [], "alignment": []} if keep_features else None

    def add(self, images: Images, captions: Optional[Sequence[str]] = None) -> None:
        whole = self.backend.whole_features(images)
        self.whole.update(whole)
        self._keep("whole", whole)
        if self.patch is not None:
            patch = self.backend.patch_features(images)
            if patch is None:  # images smaller than the extractor's input: no FID-Patch for this set
                self.patch = None
            else:
                self.patch.update(patch)
                self._keep("patch", patch)
        if self.want_alignment and captions is not None:
            scores = self.backend.alignment(images, captions)
            if scores is not None:
                for key, values in scores.items():
                    self._align_sums[key] = self._align_sums.get(key, 0.0) + float(np.sum(values))
                self._keep("alignment", scores.get("alignment"))
        self.count += len(images)

    def _keep(self, key: str, values) -> None:
        if self.kept is not None and values is not None:
            self.kept[key].append(np.asarray(values, dtype=np.float32))

    def rows(self, key: str) -> Optional[np.ndarray]:
        if self.kept is None or not self.kept[key]:
            return None
        return np.concatenate(self.kept[key])

    def alignment(self) -> dict[str, float]:
        return {k: v / self.count for k, v in self._align_sums.items()}

    def compare(self, reference: "SetScores", bootstrap: int = 0, seed: int = 0) -> dict:
        """{fid_whole, fid_patch (None where undefined), alignment (None without a model), alignment_detail};
        with `bootstrap` > 0 (both sets keeping their features) also `<metric>_ci`: a 95% bootstrap interval,
        the images resampled with replacement `bootstrap` times, each with its prompt in both sets (FID:
        `bootstrap_fid`; alignment: the
        percentiles of the resampled means)."""
        align = self.alignment()
        fid_patch = None
        if self.patch is not None and reference.patch is not None:
            fid_patch = fid_of_stats(self.patch, reference.patch)
        out = {
            "fid_whole": fid_of_stats(self.whole, reference.whole),
            "fid_patch": fid_patch,
            "alignment": align.get("alignment"),
            "alignment_detail": {k: v for k, v in align.items() if k != "alignment"},
        }
        if bootstrap:
            if self.kept is None or reference.kept is None:
                raise ValueError("bootstrap intervals need both sets made with keep_features=True")
            rng = np.random.default_rng(seed)
            for key in ("whole", "patch"):
                mine, theirs = self.rows(key), reference.rows(key)
                if mine is not None and theirs is not None:
                    out[f"fid_{key}_ci"] = bootstrap_fid(mine, theirs, bootstrap, rng)
            per_image = self.rows("alignment")
            if per_image is not None:
                means = [per_image[rng.integers(0, len(per_image), len(per_image))].mean() for _ in range(bootstrap)]
                out["alignment_ci"] = [float(v) for v in np.percentile(means, [2.5, 97.5])]
        return out


def bootstrap_fid(a: np.ndarray, b: np.ndarray, resamples: int, rng: np.random.Generator) -> Optional[list[float]]:
    """95% normal bootstrap interval of FID(a, b): the point value +- 1.96 standard deviations of FID over
    `resamples` resamples with replacement.

    Paired where the two sets are paired (the same length: row i of both comes from prompt i, as
    eval/fid_patch.py samples them): one draw of indices for both. Resampling them independently also
    resamples which prompts each set holds, and its spread measured that instead: 12x the spread of FID
    over fresh image sets of the same prompts, where the paired spread was 1.2x (bench/README.md).
    Not the percentile interval: a resample repeats rows and FID reads the repeats as lost diversity, so
    resampled FIDs sit above the point value (2x at the floor) and their percentiles can miss it."""
    fid = fid_of_stats(FeatureStats.of(a), FeatureStats.of(b))
    paired = len(a) == len(b)
    values = []
    for _ in range(resamples):
        i = rng.integers(0, len(a), len(a))
        j = i if paired else rng.integers(0, len(b), len(b))
        try:
            values.append(fid_of_stats(FeatureStats.of(a[i]), FeatureStats.of(b[j])))
        except ValueError:  # a degenerate resample (far fewer rows than feature dimensions)
            pass
    if len(values) < 0.9 * resamples or len(values) < 2:
        return None  # too few images for an interval
    half = 1.96 * float(np.std(values, ddof=1))
    return [fid - half, fid + half]


def paired_fid_resamples(sets: Sequence[np.ndarray], reference: np.ndarray, resamples: int,
                         rng: np.random.Generator) -> np.ndarray:
    """[resamples, len(sets)]: FID of every set against `reference` on the same draws of image indices.

    Every set and the reference hold one row per prompt, in the same prompt order (eval/fid_patch.py
    --save-features): one draw resamples the prompts of all of them at once, so a difference between two
    sets' FIDs varies only by what the sets do differently, not by which prompts a resample holds. A draw
    degenerate for any set is dropped for all. A set may hold several rows per prompt ([N, k, d]: k views of each
    image, e.g. its patches): a draw then takes each drawn image with all its views."""
    reference = np.asarray(reference, dtype=np.float64)
    sets = [np.asarray(s, dtype=np.float64) for s in sets]
    count = len(reference)
    if any(len(s) != count for s in sets):
        raise ValueError(f"paired resampling needs one row per prompt in every set: {[len(s) for s in sets]} "
                         f"rows against the reference's {count}")
    out = []
    for _ in range(resamples):
        i = rng.integers(0, count, count)
        rows = lambda x: x[i].reshape(-1, x.shape[-1])
        ref = FeatureStats.of(rows(reference))
        try:
            out.append([fid_of_stats(FeatureStats.of(rows(s)), ref) for s in sets])
        except ValueError:  # a degenerate resample (far fewer rows than feature dimensions)
            pass
    return np.asarray(out, dtype=np.float64).reshape(len(out), len(sets))
