"""bench/target_power.py's patch views and FID over several views per image (the models and the evaluation it
drives are tested elsewhere)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bench import target_power


class PixelBackend:
    """Features = the view's pixels, so a test can read back which pixels a view held."""
    input_size = 16

    def features(self, views: torch.Tensor) -> np.ndarray:
        return views.flatten(1).double().numpy()

    def whole_features(self, images: np.ndarray) -> np.ndarray:
        return np.zeros((len(images), 1))


def test_the_tiles_cover_the_image_at_native_resolution_and_the_centre_crop_is_its_middle():
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    views = target_power.Views(PixelBackend(), images)
    assert views.tiles.shape == (3, 4, 16 * 16 * 3)
    tiles = views.tiles.reshape(3, 2, 2, 3, 16, 16)  # [image, tile row, tile column, channel, y, x]
    rebuilt = tiles.transpose(0, 1, 4, 2, 5, 3).reshape(3, 32, 32, 3)
    np.testing.assert_allclose(rebuilt, images / 255.0, atol=1e-6)
    centre = views.centre.reshape(3, 3, 16, 16).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(centre, images[:, 8:24, 8:24] / 255.0, atol=1e-6)


def test_fid_over_several_views_per_image_counts_every_view():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 4, 3))
    b = rng.normal(size=(400, 4, 3))
    assert abs(target_power.fid(a, b) - target_power.fid(a.reshape(-1, 3), b.reshape(-1, 3))) < 1e-9
    shifted = a + np.array([1.0, 0, 0])
    assert abs(target_power.fid(shifted, a) - 1.0) < 1e-6  # only the means differ, by 1 in one dimension


def test_paired_resamples_take_every_view_of_each_drawn_image():
    """eval.scoring.paired_fid_resamples on [N, k, d] sets: a draw of images takes all k views of each, the
    same as resampling the images and then flattening their views."""
    from eval.fid import FeatureStats, fid_of_stats
    from eval.scoring import paired_fid_resamples

    rng = np.random.default_rng(0)
    reference, other = rng.normal(size=(200, 4, 3)), rng.normal(0.3, 1.0, size=(200, 4, 3))
    got = paired_fid_resamples([other], reference, 5, np.random.default_rng(7))
    draws = np.random.default_rng(7)
    for value in got[:, 0]:
        i = draws.integers(0, 200, 200)
        expected = fid_of_stats(FeatureStats.of(other[i].reshape(-1, 3)), FeatureStats.of(reference[i].reshape(-1, 3)))
        assert value == pytest.approx(expected)
