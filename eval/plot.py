"""Charts for the evaluation outputs, drawn with matplotlib (Agg canvas, no GUI, no pyplot global state),
and the labelled image grid (tiled with PIL, so pixels stay exact).

Charts come back as PIL images, so callers `.save(path)` them as before. Rendering is deterministic: fixed
dpi, fixed style (a private rc_context, so a user's matplotlibrc does not change the output), matplotlib's
bundled DejaVu font, and no timestamp or "Software" text in the PNG, so two runs write identical bytes.

Error bars: a point of a series may be (x, y) or (x, y, lo, hi); in `metrics_vs_steps` a row carries an
interval for metric `key` as `key_ci` = [lo, hi] (e.g. a bootstrap interval) or `key_err` = half-width.
"""
from __future__ import annotations

import io
import math
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg  # the Agg canvas directly: no pyplot, no GUI
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
MAX_FIXED_TICKS = 10  # more measured x values than this: evenly spaced ticks
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "*"]
DPI = 100  # figure sizes below are pixels / DPI, so a `size` in pixels comes out exactly that size

# A fixed style, independent of the user's matplotlibrc.
STYLE = {
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "axes.grid": False,
    "figure.facecolor": "white",
    "axes.facecolor": "white",
    "savefig.facecolor": "white",
    "lines.linewidth": 1.8,
    "lines.markersize": 5,
    "path.simplify": False,
}


def _colour(k: int) -> tuple[float, float, float]:
    r, g, b = PALETTE[k % len(PALETTE)]
    return (r / 255, g / 255, b / 255)


def _fmt(v: float) -> str:
    """Tick text: integers without a decimal point (step counts), others to 3 significant digits."""
    if math.isfinite(v) and float(v).is_integer() and abs(v) < 1e6:
        return str(int(v))
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float, np.floating, np.integer)) and math.isfinite(float(v))


def _clean(pts) -> list[tuple[float, float, Optional[float], Optional[float]]]:
    """Points as (x, y, lo, hi) sorted by x; points without a finite y dropped, lo/hi None when absent."""
    out = []
    for p in pts:
        x, y = p[0], p[1]
        if not (_finite(x) and _finite(y)):
            continue
        lo, hi = (p[2], p[3]) if len(p) >= 4 else (None, None)
        if not (_finite(lo) and _finite(hi)):
            lo = hi = None
        out.append((float(x), float(y), None if lo is None else float(lo), None if hi is None else float(hi)))
    return sorted(out, key=lambda p: p[0])


def _use_log2(xs: Sequence[float], log2_x: bool) -> bool:
    """Log2 x only where it helps: all steps positive and spanning at least two doublings (1..4, 2..8, ...)."""
    return log2_x and len(xs) > 0 and min(xs) > 0 and max(xs) / min(xs) >= 4


def _draw(ax, series: dict[str, list[tuple]], title: str, xlabel: str, ylabel: str, log2_x: bool) -> bool:
    """One panel into `ax`; False (and a 'no data' note) when no series has a finite point."""
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    cleaned = {name: _clean(pts) for name, pts in series.items()}
    xs = sorted({p[0] for pts in cleaned.values() for p in pts})
    if not xs:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="0.4")
        ax.set_xticks([])
        ax.set_yticks([])
        return False
    for k, (name, pts) in enumerate(cleaned.items()):
        if not pts:
            continue
        x = [p[0] for p in pts]
        y = [p[1] for p in pts]
        colour = _colour(k)
        ax.plot(x, y, color=colour, marker=MARKERS[k % len(MARKERS)], label=name, zorder=3)
        bars = [p for p in pts if p[2] is not None]
        if bars:
            yerr = np.array([[max(0.0, p[1] - p[2]) for p in bars], [max(0.0, p[3] - p[1]) for p in bars]])
            ax.errorbar([p[0] for p in bars], [p[1] for p in bars], yerr=yerr, fmt="none", ecolor=colour,
                        elinewidth=1.2, capsize=3, zorder=2)
    log_x = _use_log2(xs, log2_x)
    if log_x:
        ax.set_xscale("log", base=2)
        pad = 2 ** 0.25
        ax.set_xlim(xs[0] / pad, xs[-1] * pad)
    elif len(xs) == 1:
        ax.set_xlim(xs[0] - 1, xs[0] + 1)
    # ticks at the step counts actually measured, labelled as plain numbers (a long curve, such as a probe's
    # every few hundred samples, gets evenly spaced ticks instead: its labels would overlap)
    ax.xaxis.set_major_locator(FixedLocator(xs) if log_x or len(xs) <= MAX_FIXED_TICKS else MaxNLocator(MAX_FIXED_TICKS))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _fmt(v)))
    ax.xaxis.set_minor_locator(NullLocator())
    # y from 0 when the values are non-negative and 0 is not far below them (FID), so gaps between curves
    # read in proportion; values in a narrow band far from 0 (alignment 0.85..0.9) keep a zoomed axis
    lows = [p[2] if p[2] is not None else p[1] for pts in cleaned.values() for p in pts]
    highs = [p[3] if p[3] is not None else p[1] for pts in cleaned.values() for p in pts]
    if min(lows) >= 0 and min(lows) <= 0.5 * max(highs):
        ax.set_ylim(bottom=0)
    ax.margins(y=0.08)
    ax.grid(True, which="major", color="0.88", linewidth=0.8, zorder=0)
    ax.set_axisbelow(True)
    return True


def _render(fig: Figure) -> Image.Image:
    """Figure -> RGB PIL image through an in-memory PNG (fixed dpi, no metadata)."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    buf.seek(0)
    img = Image.open(buf)
    img.load()
    return img.convert("RGB")


def save_png(img: Image.Image, path) -> None:
    """Writes a chart as PNG (PIL's encoder writes no timestamp: the same image gives the same bytes)."""
    img.save(path, format="PNG")


def line_panel(series: dict[str, list[tuple[float, float]]], title: str, xlabel: str, ylabel: str,
               size: tuple[int, int] = (420, 320), log2_x: bool = True) -> Image.Image:
    """One panel, `size` pixels: each series a line with markers (and error bars for (x, y, lo, hi)
    points), an in-panel legend, grid, ticks at the x values measured; log2 x when they span powers of two."""
    w, h = size
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(w / DPI, h / DPI), dpi=DPI)
        ax = fig.add_subplot(1, 1, 1)
        if _draw(ax, series, title, xlabel, ylabel, log2_x) and len(series) > 0:
            ax.legend(loc="best", frameon=True, framealpha=0.9)
        fig.tight_layout(pad=0.4)
        return _render(fig)


def legend(names: Sequence[str], width: int) -> Image.Image:
    """A legend strip `width` pixels wide: one colour/marker entry per name, in as many columns as fit."""
    with matplotlib.rc_context(STYLE):
        ncol = max(1, min(len(names), int(width // 160)))
        rows = max(1, -(-len(names) // ncol))
        fig = Figure(figsize=(width / DPI, (10 + 18 * rows) / DPI), dpi=DPI)
        handles = [Line2D([], [], color=_colour(k), marker=MARKERS[k % len(MARKERS)], label=n)
                   for k, n in enumerate(names)]
        if handles:
            fig.legend(handles=handles, loc="center", ncol=ncol, frameon=False)
        return _render(fig)


def metrics_vs_steps(rows: list[dict], metrics: Sequence[tuple[str, str]], series_key: str = "label",
                     title_suffix: str = "") -> Image.Image:
    """One panel per (metric key, title), side by side, one line per `series_key` value, a shared legend
    underneath. Rows need "steps" and the metric keys (None or missing: no point); `key_ci` = [lo, hi] or
    `key_err` = half-width add error bars."""
    names = list(dict.fromkeys(r[series_key] for r in rows))

    def point(r: dict, key: str) -> tuple:
        y = r.get(key)
        ci, err = r.get(f"{key}_ci"), r.get(f"{key}_err")
        if ci is not None and len(ci) == 2:
            return (r["steps"], y, ci[0], ci[1])
        if _finite(err) and _finite(y):
            return (r["steps"], y, y - err, y + err)
        return (r["steps"], y)

    n = max(1, len(metrics))
    legend_rows = max(1, -(-len(names) // 4))
    panel_w, panel_h, legend_h = 420, 320, 12 + 18 * legend_rows
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(n * panel_w / DPI, (panel_h + legend_h) / DPI), dpi=DPI)
        axes = fig.subplots(1, n, squeeze=False)[0]
        for ax, (key, title) in zip(axes, metrics):
            series = {name: [point(r, key) for r in rows if r[series_key] == name] for name in names}
            _draw(ax, series, title + title_suffix, "sampling steps", key, log2_x=True)
        handles = [Line2D([], [], color=_colour(k), marker=MARKERS[k % len(MARKERS)], label=name)
                   for k, name in enumerate(names)]
        bottom = legend_h / (panel_h + legend_h)
        if handles:
            fig.legend(handles=handles, loc="lower center", ncol=min(4, len(handles)), frameon=False,
                       bbox_to_anchor=(0.5, 0.0))
        fig.tight_layout(pad=0.6, w_pad=2.0, rect=(0, bottom, 1, 1))
        return _render(fig)


def tile_side(image_side: int) -> int:
    """Grid tiles: small images upscaled by an integer factor to about 96 px, big ones shrunk to 256 px."""
    if image_side < 96:
        return image_side * -(-96 // image_side)
    return min(image_side, 256)


def labelled_grid(rows: list[tuple[str, Sequence[np.ndarray]]], tile: Optional[int] = None, pad: int = 2,
                  label_width: Optional[int] = None) -> np.ndarray:
    """Image rows with a text label on the left of each: uint8 HxWx3. Every image becomes a tile x tile
    square (nearest-neighbour when enlarging, so pixels stay visible). Tiled with PIL rather than
    matplotlib, whose imshow would resample the images."""
    font = ImageFont.load_default()
    first = next(im for _, ims in rows for im in ims)
    tile = tile or tile_side(first.shape[0])
    ncols = max(len(ims) for _, ims in rows)
    label_width = label_width or 12 + max(math.ceil(font.getlength(name)) for name, _ in rows)
    out = Image.new("RGB", (label_width + ncols * (tile + pad) + pad, len(rows) * (tile + pad) + pad), "white")
    d = ImageDraw.Draw(out)
    for r, (name, ims) in enumerate(rows):
        y = pad + r * (tile + pad)
        top, bottom = d.textbbox((0, 0), name, font=font)[1::2]
        d.text((4, y + (tile - top - bottom) // 2), name, fill="black", font=font)
        for c, im in enumerate(ims):
            small = im.shape[0] < tile
            resample = Image.Resampling.NEAREST if small else Image.Resampling.LANCZOS
            out.paste(Image.fromarray(np.asarray(im)).resize((tile, tile), resample), (label_width + pad + c * (tile + pad), y))
    return np.asarray(out)
