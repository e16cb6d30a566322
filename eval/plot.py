"""Small line charts drawn with PIL (no plotting library needed): metric vs sampling steps."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def line_panel(series: dict[str, list[tuple[float, float]]], title: str, xlabel: str, ylabel: str,
               size: tuple[int, int] = (420, 320), log2_x: bool = True) -> Image.Image:
    """One panel: each series a polyline with markers; x on a log2 axis (steps 1, 2, 4, ...)."""
    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 58, 12, 26, 40
    d.text((left, 6), title, fill="black", font=font)
    points = [(x, y) for pts in series.values() for x, y in pts if y is not None and math.isfinite(y)]
    if not points:
        d.text((left, h // 2), "no data", fill="black", font=font)
        return img
    tx = (lambda x: math.log2(x)) if log2_x else (lambda x: x)
    xs = [tx(x) for x, _ in points]
    ys = [y for _, y in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(0.0, min(ys)), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y1 = y0 + 1
    y1 += 0.05 * (y1 - y0)
    px = lambda x: left + (tx(x) - x0) / (x1 - x0) * (w - left - right)
    py = lambda y: h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for v in np.linspace(y0, y1, 5):
        d.line([left - 3, py(v), left, py(v)], fill="black")
        d.text((4, py(v) - 6), _fmt(v), fill="black", font=font)
    for x in sorted({x for x, _ in points}):
        d.line([px(x), h - bottom, px(x), h - bottom + 3], fill="black")
        d.text((px(x) - 4, h - bottom + 5), _fmt(x), fill="black", font=font)
    d.text((left + (w - left - right) // 2 - 3 * len(xlabel), h - 16), xlabel, fill="black", font=font)
    for k, (name, pts) in enumerate(series.items()):
        colour = PALETTE[k % len(PALETTE)]
        pts = sorted((x, y) for x, y in pts if y is not None and math.isfinite(y))
        xy = [(px(x), py(y)) for x, y in pts]
        if len(xy) > 1:
            d.line(xy, fill=colour, width=2)
        for x, y in xy:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    return img


def legend(names: Sequence[str], width: int) -> Image.Image:
    font = ImageFont.load_default()
    rows = max(1, len(names))
    img = Image.new("RGB", (width, 8 + 16 * rows), "white")
    d = ImageDraw.Draw(img)
    for k, name in enumerate(names):
        colour = PALETTE[k % len(PALETTE)]
        d.rectangle([10, 8 + 16 * k, 22, 18 + 16 * k], fill=colour)
        d.text((28, 6 + 16 * k), name, fill="black", font=font)
    return img


def metrics_vs_steps(rows: list[dict], metrics: Sequence[tuple[str, str]], series_key: str = "label",
                     title_suffix: str = "") -> Image.Image:
    """One panel per (metric key, title), side by side, with a shared legend underneath."""
    names = list(dict.fromkeys(r[series_key] for r in rows))
    panels = []
    for key, title in metrics:
        series = {n: [(r["steps"], r.get(key)) for r in rows if r[series_key] == n] for n in names}
        panels.append(line_panel(series, title + title_suffix, "sampling steps", key))
    gap = 24
    width = sum(p.width for p in panels) + gap * (len(panels) - 1)
    leg = legend(names, width)
    out = Image.new("RGB", (width, panels[0].height + leg.height), "white")
    x = 0
    for p in panels:
        out.paste(p, (x, 0))
        x += p.width + gap
    out.paste(leg, (0, panels[0].height))
    return out


def tile_side(image_side: int) -> int:
    """Grid tiles: small images upscaled by an integer factor to about 96 px, big ones shrunk to 256 px."""
    if image_side < 96:
        return image_side * -(-96 // image_side)
    return min(image_side, 256)


def labelled_grid(rows: list[tuple[str, Sequence[np.ndarray]]], tile: Optional[int] = None, pad: int = 2,
                  label_width: Optional[int] = None) -> np.ndarray:
    """Image rows with a text label on the left of each: uint8 HxWx3. Every image becomes a tile x tile
    square (nearest-neighbour when enlarging, so pixels stay visible)."""
    font = ImageFont.load_default()
    first = next(im for _, ims in rows for im in ims)
    tile = tile or tile_side(first.shape[0])
    ncols = max(len(ims) for _, ims in rows)
    label_width = label_width or 8 + 7 * max(len(name) for name, _ in rows)
    out = Image.new("RGB", (label_width + ncols * (tile + pad) + pad, len(rows) * (tile + pad) + pad), "white")
    d = ImageDraw.Draw(out)
    for r, (name, ims) in enumerate(rows):
        y = pad + r * (tile + pad)
        d.text((4, y + tile // 2 - 6), name, fill="black", font=font)
        for c, im in enumerate(ims):
            small = im.shape[0] < tile
            resample = Image.Resampling.NEAREST if small else Image.Resampling.LANCZOS
            out.paste(Image.fromarray(np.asarray(im)).resize((tile, tile), resample), (label_width + pad + c * (tile + pad), y))
    return np.asarray(out)
