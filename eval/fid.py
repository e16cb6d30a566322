"""Fréchet distance between Gaussians fitted to two feature sets (FID when the features are Inception's).

    d^2 = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))

The matrix square root is scipy.linalg.sqrtm. As in the reference implementations (TTUR's fid.py,
pytorch-fid): if the product is near singular and sqrtm returns non-finite values, eps*I is added to both
covariances and the root taken again; a complex result whose diagonal has only negligible imaginary parts
(round-off on a near-singular product) is replaced by its real part, otherwise it is an error.
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg


class FeatureStats:
    """Streaming mean and covariance of feature rows, accumulated in float64 (no feature matrix kept)."""

    def __init__(self, dim: int | None = None):
        self.n = 0
        self.dim = dim
        self._sum = None
        self._outer = None
        self._shift = None  # the first batch's mean: sums of shifted rows keep the covariance accurate

    def update(self, features) -> "FeatureStats":
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2:
            raise ValueError(f"features must be [N, D], got shape {f.shape}")
        if self._sum is None:
            self.dim = self.dim or f.shape[1]
            self._sum = np.zeros(self.dim)
            self._outer = np.zeros((self.dim, self.dim))
            self._shift = f.mean(0) if f.shape[1] == self.dim else None
        if f.shape[1] != self.dim:
            raise ValueError(f"feature dimension {f.shape[1]} != {self.dim}")
        f = f - self._shift
        self.n += f.shape[0]
        self._sum += f.sum(0)
        self._outer += f.T @ f
        return self

    @property
    def mean(self) -> np.ndarray:
        return self._sum / self.n + self._shift

    @property
    def cov(self) -> np.ndarray:
        """Unbiased (N - 1) covariance, as np.cov(rowvar=False)."""
        if self.n < 2:
            raise ValueError("a covariance needs at least 2 feature rows")
        mu = self._sum / self.n  # of the shifted rows
        return (self._outer - self.n * np.outer(mu, mu)) / (self.n - 1)

    @classmethod
    def of(cls, features) -> "FeatureStats":
        return cls().update(features)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shapes do not match: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}")
    diff = mu1 - mu2

    # A singular product (more feature dimensions than images, or dead features) makes scipy warn; the
    # result is checked below instead.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"fid: sqrtm gave imaginary parts up to {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
    # Round-off can make identical statistics come out a hair below zero.
    return max(value, 0.0) if value > -1e-6 * max(1.0, float(np.trace(sigma1))) else value


def fid_of_stats(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(a.mean, a.cov, b.mean, b.cov)


def fid_of_features(f1, f2) -> float:
    return fid_of_stats(FeatureStats.of(f1), FeatureStats.of(f2))
