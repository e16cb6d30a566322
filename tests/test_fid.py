"""FID math (eval.fid): known cases, the analytic value for Gaussians, singular covariances, streaming stats."""
from __future__ import annotations

import numpy as np
import pytest

from eval.fid import FeatureStats, fid_of_features, frechet_distance


def test_identical_sets_give_zero():
    f = np.random.default_rng(0).normal(size=(2000, 16)) @ np.random.default_rng(1).normal(size=(16, 16))
    assert abs(fid_of_features(f, f)) < 1e-6
    assert fid_of_features(f, f.copy()[::-1]) == pytest.approx(0.0, abs=1e-6)  # order does not matter


def test_diagonal_gaussians_match_the_formula_by_hand():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    var1, var2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    # ||mu1-mu2||^2 = 1 + 0 + 4 = 5; tr(S1 + S2 - 2 (S1 S2)^1/2) = sum (sqrt(a) - sqrt(b))^2 = 1 + 1 + 4 = 6
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(11.0, abs=1e-9)


def test_equal_covariances_leave_only_the_mean_shift():
    a = np.random.default_rng(2).normal(size=(6, 6))
    cov = a @ a.T + 0.1 * np.eye(6)  # a full (non-diagonal) covariance
    shift = np.arange(6.0)
    assert frechet_distance(np.zeros(6), cov, shift, cov) == pytest.approx(float(shift @ shift), rel=1e-7)


def test_sampled_gaussians_approach_the_analytic_value():
    rng = np.random.default_rng(3)
    n = 200_000
    std1, std2 = np.array([1.0, 2.0, 0.5, 1.0]), np.array([1.5, 1.0, 0.5, 3.0])
    mu2 = np.array([0.5, -1.0, 0.0, 2.0])
    f1 = rng.normal(size=(n, 4)) * std1
    f2 = rng.normal(size=(n, 4)) * std2 + mu2
    analytic = float(mu2 @ mu2 + ((std1 - std2) ** 2).sum())  # 5.25 + 5.25
    assert fid_of_features(f1, f2) == pytest.approx(analytic, rel=0.01)


@pytest.mark.parametrize("n", [10, 40])
def test_singular_covariances_give_a_finite_non_negative_value(n):
    """Fewer images than dimensions, and dead (constant) features: near-singular covariance products."""
    rng = np.random.default_rng(4)
    f1, f2 = rng.normal(size=(n, 32)), rng.normal(size=(n, 32)) + 0.5
    f1[:, :5] = f2[:, :5] = 0.0
    value = fid_of_features(f1, f2)
    assert np.isfinite(value) and value > 0
    assert fid_of_features(f1, f1) == pytest.approx(0.0, abs=1e-4)


def test_streaming_stats_equal_numpy_with_a_large_offset():
    rng = np.random.default_rng(5)
    f = rng.normal(size=(1000, 8)) * 0.01 + 1e4  # mean >> std: naive sums of squares would cancel
    stats = FeatureStats()
    for i in range(0, 1000, 96):
        stats.update(f[i:i + 96])
    assert stats.n == 1000
    np.testing.assert_allclose(stats.mean, f.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(f, rowvar=False), rtol=1e-6, atol=1e-12)
    with pytest.raises(ValueError):
        stats.update(f[:, :4])


def test_bootstrap_interval_is_as_wide_as_the_spread_over_fresh_samples():
    """eval.scoring.bootstrap_fid on 128-d Gaussian rows, 1,000 per set: the interval is centred on the point
    FID, narrows with 4x the images, and is at least as wide as +-1.96 sd of FID over fresh samples (at most
    2x wider): an interval to decide comparisons with, erring wide."""
    from eval.scoring import bootstrap_fid

    rng = np.random.default_rng(0)
    draw = lambda n: (rng.normal(size=(n, 128)), rng.normal(loc=0.3, size=(n, 128)))
    fresh = np.std([fid_of_features(*draw(1000)) for _ in range(30)], ddof=1)
    widths = {}
    for n in (250, 1000):
        a, b = draw(n)
        lo, hi = bootstrap_fid(a, b, 100, np.random.default_rng(1))
        assert (lo + hi) / 2 == pytest.approx(fid_of_features(a, b))
        widths[n] = hi - lo
    assert widths[1000] < 0.75 * widths[250]
    assert 2 * 1.96 * fresh <= widths[1000] <= 2 * 2 * 1.96 * fresh


def test_bootstrap_keeps_each_image_with_its_prompt():
    """Rows i of both sets come from prompt i (clustered features, as shapes captions give): the paired
    interval is about as wide as the spread over fresh images of the same prompts, where resampling the
    two sets apart (which also changes their prompt mixes) would be several times wider."""
    from eval.scoring import bootstrap_fid

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(30, 16)) * 3
    prompts = rng.integers(0, 30, 1000)
    draw = lambda: centres[prompts] + rng.normal(size=(1000, 16))
    reference = draw()
    fresh = np.std([fid_of_features(draw(), reference) for _ in range(20)], ddof=1)
    lo, hi = bootstrap_fid(draw(), reference, 100, np.random.default_rng(1))
    unpaired = bootstrap_fid(draw(), reference[:999], 100, np.random.default_rng(1))  # lengths differ: apart
    assert (hi - lo) / (2 * 1.96) <= 2 * fresh
    assert (unpaired[1] - unpaired[0]) > 3 * (hi - lo)
