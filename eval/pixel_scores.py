"""Transparent pixel-level scores for generated shapes images (no learned model involved):

- colour accuracy: the mean colour of the saturated pixels is nearest to the caption's colour,
- position accuracy: the saturated pixels' centroid lies in the caption's region (over the captions that
  name one),
- background grain: the standard deviation of the unsaturated (background) pixels, in 0..255 units
  (the dataset's background is a constant, so 0 is perfect),
- edge sharpness: mean gradient magnitude over the shape's boundary band (blur lowers it),
- failure signatures (`failure_signatures`): a second copy of the shape (the paper's "Janus"), and filled
  shapes drawn hollow, per image.

`python eval/pixel_scores.py --model runs/shapes/exports/stage3_4 --count 64` samples the model with its
own steps from fixed noise and prints the scores as JSON. The learned shapes classifier with FID and
FID-Patch is eval/fid_patch.py's job (the evaluation issue); these scores need nothing trained.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.data.shapes import COLOURS, STRIPE_SHADE, ShapesDataset, parse_caption  # noqa: E402

SATURATION = 60  # max - min channel above this: shape pixel (the background is grey)


def shape_pixels(image: np.ndarray) -> np.ndarray:
    """[..., H, W, 3] int or float -> bool [..., H, W]: the saturated pixels, the shapes' (background and dots are
    grey)."""
    return image.max(-1) - image.min(-1) > SATURATION


def _region(cx: float, cy: float) -> str:
    if abs(cx - 0.5) < 0.17 and abs(cy - 0.5) < 0.17:
        return "center"
    return f"{'top' if cy < 0.5 else 'bottom'} {'left' if cx < 0.5 else 'right'}"


def background_grain(images: np.ndarray) -> float:
    """Mean over uint8 [N, H, W, 3] images of the std of their background (unsaturated) pixels, in 0..255 units;
    it reads no caption."""
    grain = []
    for image in images.astype(float):
        background = image[~shape_pixels(image)]
        if background.size:
            grain.append(float(background.std()))
    return float(np.mean(grain)) if grain else float("nan")


def score_images(images: np.ndarray, captions: list[str]) -> dict:
    """images: uint8 [N, H, W, 3]."""
    colours = np.array(list(COLOURS.values()), dtype=float)
    names = list(COLOURS)
    colour_ok = position_ok = named = 0
    sharp = []
    for image, caption in zip(images.astype(float), captions):
        _, colour, position = parse_caption(caption)
        named += position is not None
        h, w, _ = image.shape
        mask = shape_pixels(image)
        if mask.sum() < 3:
            continue
        mean = image[mask].mean(0)
        colour_ok += names[int(np.argmin(((colours - mean) ** 2).sum(1)))] == colour
        ys, xs = np.nonzero(mask)
        if position is not None:
            position_ok += _region((xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h) == position
        lum = image.mean(-1)
        gy, gx = np.gradient(lum)
        edge = mask ^ np.roll(mask, 1, 0) | mask ^ np.roll(mask, 1, 1)
        if edge.any():
            sharp.append(float(np.hypot(gx, gy)[edge].mean()))
    n = len(captions)
    return {"colour_acc": colour_ok / n, "position_acc": position_ok / named if named else float("nan"),
            "background_grain": background_grain(images),
            "edge_sharpness": float(np.mean(sharp)) if sharp else float("nan"), "count": n}


FILLED = ("circle", "square", "triangle", "cross")  # ring and frame are outlines: their hole is the shape
COPY_FRACTION = 0.3  # a second component this large (of the main one's pixels), apart from it: a second copy
HOLE_FRACTION = 0.2  # a filled shape whose enclosed holes are this share of its filled area: hollow
# An interior pixel (1 px in from the shape's edge) this much darker than the shape's full brightness (90th percentile)
# counts as a hole too: the one-step student "hollows" a fill by darkening its middle, still saturated
DARK_FRACTION = 0.6


def failure_signatures(images: np.ndarray, captions: list[str], texture: str = "none") -> dict[str, np.ndarray]:
    """Per image, the paper's one-step failure signatures by a pixel rule (uint8 [N, H, W, 3] in):
    - second_copy: besides the largest blob of shape pixels, another one of >= 30% its size (and >= 4
      pixels) outside the largest one's box grown by 2 px (a ring broken into pieces stays one shape);
    - hollow_fill: a filled shape (circle, square, triangle, cross) whose largest blob encloses holes of
      >= 20% of its filled area: the background showing through where the shape should be solid, or an
      interior darkened below 60% of the shape's full brightness (the 90th percentile of its max channel);
      with `texture="stripes"` below 60% of the dark stripes' brightness, which are part of the fill.
    Real images of the dataset score 0 on both (tests/test_pixel_scores.py)."""
    copies, hollow = np.zeros(len(images), bool), np.zeros(len(images), bool)
    dark_fraction = DARK_FRACTION * (STRIPE_SHADE if texture == "stripes" else 1.0)
    for i, (image, caption) in enumerate(zip(images.astype(int), captions)):
        copies[i], hollow[i], _ = blob_signatures(image, parse_caption(caption)[0] in FILLED, dark_fraction)
    return {"second_copy": copies, "hollow_fill": hollow}


def blob_signatures(image: np.ndarray, filled: bool, dark_fraction: float) -> tuple[bool, bool, int]:
    """One shape's signatures in an image (int [H, W, 3]) that should hold only it, as `failure_signatures`
    defines them: (second copy, hollow fill (only for a filled shape), the largest blob's pixel count; 0 and no
    signature where there are no shape pixels)."""
    from scipy import ndimage

    mask = shape_pixels(image)
    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    if count == 0:
        return False, False, 0
    sizes = np.bincount(labels.ravel())[1:]
    main = int(np.argmax(sizes)) + 1
    ys, xs = np.nonzero(labels == main)
    y0, y1, x0, x1 = ys.min() - 2, ys.max() + 2, xs.min() - 2, xs.max() + 2
    copy = False
    for other in np.flatnonzero(sizes >= max(4, COPY_FRACTION * sizes[main - 1])) + 1:
        if other == main:
            continue
        oy, ox = np.nonzero(labels == other)
        copy |= not ((y0 <= oy.mean() <= y1) and (x0 <= ox.mean() <= x1))
    hollow = False
    if filled:
        blob = labels == main
        solid = ndimage.binary_fill_holes(blob)
        brightness = image.max(-1)
        dark = ndimage.binary_erosion(solid) & (brightness < dark_fraction * np.percentile(brightness[blob], 90))
        hollow = bool(((solid & ~blob) | dark).sum() >= HOLE_FRACTION * solid.sum())
    return bool(copy), hollow, int(sizes[main - 1])


def sample_model(model_dir: Path, count: int, steps: int | None, guidance: float | None, seed: int,
                 device: str = "cpu") -> tuple[np.ndarray, list[str]]:
    """`count` images of shapes captions from an export, through eval/fid_patch.py's sampler."""
    captions = [ShapesDataset(count, seed=seed + 1)[i].caption for i in range(count)]
    return sample_prompts(model_dir, captions, steps, guidance, seed, device=device), captions


def sample_prompts(model_dir: Path, prompts: list[str], steps: int | None = None, guidance: float | None = None,
                   seed: int = 0, batch_size: int = 64, device: str = "cpu") -> np.ndarray:
    """An export's uint8 images of `prompts` (default: its own steps and guidance), image i from the noise of
    (seed, i), so the batch size changes nothing."""
    from tqdm import tqdm

    from eval.generate import ExportSampler

    sampler = ExportSampler(model_dir, device=device)
    steps = steps or sampler.default_steps
    guidance = sampler.default_guidance if guidance is None else guidance
    starts = tqdm(range(0, len(prompts), batch_size), desc=f"{Path(model_dir).name} {steps} steps", unit="batch")
    return np.concatenate([sampler.sample(prompts[i:i + batch_size], list(range(i, min(i + batch_size, len(prompts)))),
                                          steps, guidance, seed) for i in starts])


def main(argv=None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, type=Path, help="an export folder (export.json, unet/, scheduler/)")
    p.add_argument("--count", type=int, default=64)
    p.add_argument("--steps", type=int, default=None, help="default: the export's steps")
    p.add_argument("--guidance", type=float, default=None, help="default: the export's guidance")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    images, captions = sample_model(args.model, args.count, args.steps, args.guidance, args.seed, args.device)
    failures = {f"{k}_rate": float(v.mean()) for k, v in failure_signatures(images, captions).items()}
    print(json.dumps({"model": str(args.model), **score_images(images, captions), **failures}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
