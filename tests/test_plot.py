"""eval/plot.py: every chart drawn from small made-up data, written as PNG, read back with PIL."""
from __future__ import annotations

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from eval import plot
from eval.plot import PALETTE, labelled_grid, legend, line_panel, metrics_vs_steps, save_png, tile_side

METRICS = [("fid_whole", "FID-Whole"), ("fid_patch", "FID-Patch"), ("alignment", "alignment")]


def _rows(steps=(1, 2, 4, 8, 32), ci: bool = False) -> list[dict]:
    rows = []
    for label, base in (("teacher", 80.0), ("lightning/full", 100.0)):
        for s in steps:
            fid = base + 200.0 / s
            row = {"label": label, "steps": s, "fid_whole": fid, "fid_patch": base * 1.2 + 100.0 / s,
                   "alignment": 0.9 - 0.05 / s}
            if ci:
                row["fid_whole_ci"] = [fid - 15.0, fid + 20.0]
            rows.append(row)
    return rows


def _written(img: Image.Image, path) -> np.ndarray:
    save_png(img, path)
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def _not_blank(arr: np.ndarray) -> None:
    ink = (arr < 200).any(-1).mean()  # text, axes, lines
    assert 0.005 < ink < 0.5, ink
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 20  # antialiased lines and text, not a flat fill


def _has_colour(arr: np.ndarray, rgb, tol: int = 12, min_pixels: int = 30) -> bool:
    close = (np.abs(arr.astype(int) - np.array(rgb)) <= tol).all(-1)
    return int(close.sum()) >= min_pixels


def test_metrics_vs_steps_png_opens_has_a_sensible_size_and_draws_every_series(tmp_path):
    arr = _written(metrics_vs_steps(_rows(), METRICS), tmp_path / "fid_vs_steps.png")
    h, w, _ = arr.shape
    assert 3 * 300 <= w <= 3 * 600 and 250 <= h <= 600  # three panels side by side, a legend underneath
    _not_blank(arr)
    assert _has_colour(arr, PALETTE[0]) and _has_colour(arr, PALETTE[1])  # both series' lines
    assert not _has_colour(arr, PALETTE[2])  # and no third one


def test_metrics_vs_steps_is_byte_identical_across_runs(tmp_path):
    save_png(metrics_vs_steps(_rows(ci=True), METRICS), tmp_path / "a.png")
    save_png(metrics_vs_steps(_rows(ci=True), METRICS), tmp_path / "b.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_intervals_draw_error_bars(tmp_path):
    plain = _written(metrics_vs_steps(_rows(), METRICS[:1]), tmp_path / "plain.png")
    bars = _written(metrics_vs_steps(_rows(ci=True), METRICS[:1]), tmp_path / "bars.png")
    assert plain.shape == bars.shape
    assert (plain != bars).any(-1).sum() > 100

    fig = Figure()
    ax = fig.add_subplot()
    plot._draw(ax, {"a": [(1, 10.0, 8.0, 13.0), (2, 6.0)]}, "t", "steps", "fid", log2_x=True)
    segments = [seg for coll in ax.collections for seg in coll.get_segments()]
    assert len(segments) == 1 and np.allclose(segments[0], [[1, 8.0], [1, 13.0]])  # the bar spans [lo, hi]


def test_log2_x_with_ticks_at_the_measured_steps():
    fig = Figure()
    ax = fig.add_subplot()
    plot._draw(ax, {"a": [(s, 100.0 / s) for s in (1, 2, 4, 8, 32)]}, "t", "steps", "fid", log2_x=True)
    FigureCanvasAgg(fig).draw()
    assert ax.get_xscale() == "log"
    assert list(ax.get_xticks()) == [1, 2, 4, 8, 32]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4", "8", "32"]
    assert ax.get_ylim()[0] == 0  # FID axis starts at 0
    assert all(line.get_visible() for line in ax.xaxis.get_gridlines() + ax.yaxis.get_gridlines())

    fig = Figure()
    ax = fig.add_subplot()
    plot._draw(ax, {"a": [(25, 3.0), (50, 2.0)]}, "t", "steps", "y", log2_x=True)  # not two doublings: linear
    assert ax.get_xscale() == "linear" and list(ax.get_xticks()) == [25, 50]

    fig = Figure()
    ax = fig.add_subplot()
    plot._draw(ax, {"a": [(1, 0.85), (4, 0.9)]}, "t", "steps", "alignment", log2_x=False)
    assert ax.get_xscale() == "linear" and ax.get_ylim()[0] > 0.5  # a narrow band far from 0 stays zoomed


def test_a_long_linear_curve_gets_evenly_spaced_ticks():
    """A probe curve (a point every 400 samples, 24 of them) would overlap its labels with a tick per point."""
    xs = [400.0 * i for i in range(24)]
    fig = Figure()
    ax = fig.add_subplot()
    plot._draw(ax, {"a": [(x, 10.0 - i * 0.1) for i, x in enumerate(xs)]}, "t", "samples", "fid", log2_x=False)
    FigureCanvasAgg(fig).draw()
    ticks = [t for t in ax.get_xticks() if xs[0] <= t <= xs[-1]]
    assert 3 <= len(ticks) <= plot.MAX_FIXED_TICKS + 1 and ticks != xs


def test_missing_metric_values_give_a_no_data_panel(tmp_path):
    rows = [{"label": "a", "steps": 4, "fid_whole": 12.0, "fid_patch": None, "alignment": None},
            {"label": "a", "steps": 2, "fid_whole": float("nan"), "fid_patch": None}]
    arr = _written(metrics_vs_steps(rows, METRICS), tmp_path / "sparse.png")
    _not_blank(arr)


def test_line_panel_is_the_size_asked_with_a_legend(tmp_path):
    img = line_panel({"a": [(1, 3.0), (2, 2.0), (4, 1.5)], "b": [(1, 4.0), (4, 2.5)]}, "title", "steps", "y",
                     size=(420, 320))
    arr = _written(img, tmp_path / "panel.png")
    assert arr.shape == (320, 420, 3)
    _not_blank(arr)
    assert _has_colour(arr, PALETTE[0]) and _has_colour(arr, PALETTE[1])


def test_legend_strip(tmp_path):
    arr = _written(legend(["teacher", "lightning/full", "mse/full"], 600), tmp_path / "legend.png")
    assert arr.shape[1] == 600 and 10 <= arr.shape[0] <= 100
    assert (arr < 200).any(-1).mean() > 0.002
    for k in range(3):
        assert _has_colour(arr, PALETTE[k], min_pixels=10)


@pytest.mark.parametrize("side,expected", [(32, 96), (20, 100), (96, 96), (299, 256), (1024, 256)])
def test_tile_side(side, expected):
    assert tile_side(side) == expected


def test_labelled_grid_tiles_images_exactly_and_labels_rows(tmp_path):
    rng = np.random.default_rng(0)
    ref = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    black = [np.zeros((32, 32, 3), np.uint8)] * 2
    grid = labelled_grid([("reference", ref), ("teacher 2 st", black)], pad=2)
    arr = _written(Image.fromarray(grid), tmp_path / "grid.png")
    assert grid.dtype == np.uint8 and arr.shape == grid.shape
    tile = 96
    assert arr.shape[0] == 2 * (tile + 2) + 2
    label_width = arr.shape[1] - 3 * (tile + 2) - 2
    assert 40 < label_width < 200
    first = arr[2:2 + tile, label_width + 2:label_width + 2 + tile]
    assert np.array_equal(first, np.kron(ref[0], np.ones((3, 3, 1), np.uint8)))  # nearest-neighbour x3
    assert (arr[:, :label_width] < 128).any(-1).sum() > 30  # the labels are drawn
    assert (arr[2 + tile + 2:, label_width + 2 + 2 * (tile + 2):] == 255).all()  # the short row's gap is white
