"""Pixel rules for images of several captioned shapes (`data.shapes.objects` > 1), read quadrant by quadrant:
the data puts each shape clearly inside its own corner quadrant, so a quadrant holds one shape or none.

Per image (`scene_signatures`):
- second_copy: a shape where the caption names none (a quadrant that should be empty holds a blob), or a
  second copy inside a shape's own quadrant (eval/pixel_scores.py's rule on the quadrant): the paper's "Janus";
- hollow_fill: a filled shape drawn hollow (pixel_scores' rule, on its quadrant);
- missing_shape: a named shape's quadrant holds no blob;
- wrong_colour: a present shape's hue is nearest another of the data's colours;
- scene_match: every named shape present in its colour and nothing else drawn: the scene's pixel alignment
  (the kinds of shape are not checked).

Captions that name no position say which shapes, not where: their shapes are matched to the quadrants
that fit them best (fewest missing shapes, then nearest hues), and only the unmatched quadrants can hold
an extra shape. Hue is the colour with its grey part removed and scaled to 1, so a dark stripe and an
anti-aliased edge (the colour mixed with the grey background) keep their shape's hue.
"""
from __future__ import annotations

from itertools import permutations

import numpy as np

from eval.pixel_scores import COPY_FRACTION, DARK_FRACTION, SATURATION, blob_signatures
from trainer.data.shapes import CORNERS, COLOURS, STRIPE_SHADE, parse_scene

# A quadrant "holds a shape" when its largest blob of shape pixels has this many: every drawn shape has
# far more at 32 px and above (the thinnest, a ring, ~40), a stray pixel or two of colour has fewer.
MIN_SHAPE_PIXELS = 8
SIGNATURES = ("second_copy", "hollow_fill", "missing_shape", "wrong_colour", "scene_match")


def hue(rgb: np.ndarray) -> np.ndarray:
    """[..., 3] -> the colour minus its grey part, scaled so its largest channel is 1 (grey -> zeros)."""
    chroma = rgb - rgb.min(-1, keepdims=True)
    return chroma / np.maximum(chroma.max(-1, keepdims=True), 1e-9)


COLOUR_NAMES = list(COLOURS)
COLOUR_HUES = hue(np.array(list(COLOURS.values()), dtype=float))


def quadrant(image: np.ndarray, corner: str) -> np.ndarray:
    """The quarter of an [H, W, ...] image that a corner's shape is drawn in."""
    h, w = image.shape[:2]
    row, col = corner.startswith("bottom"), corner.endswith("right")
    return image[row * h // 2:(row + 1) * h // 2, col * w // 2:(col + 1) * w // 2]


def _nearest_colour(crop: np.ndarray) -> str | None:
    mask = crop.max(-1) - crop.min(-1) > SATURATION
    if not mask.any():
        return None
    return COLOUR_NAMES[int(np.argmin(((COLOUR_HUES - hue(crop[mask]).mean(0)) ** 2).sum(1)))]


def _placement(objects, found: dict[str, tuple[int, str | None]]) -> tuple[str, ...]:
    """Each object's quadrant: the named one, or (captions without positions) the assignment with the fewest
    missing shapes, then the most right colours, then the biggest blobs."""
    if all(position is not None for _, _, position in objects):
        return tuple(position for _, _, position in objects)

    def fit(corners):
        held = [found[c][0] >= MIN_SHAPE_PIXELS for c in corners]
        right = [found[c][1] == colour for c, (_, colour, _) in zip(corners, objects)]
        return sum(held), sum(h and r for h, r in zip(held, right)), sum(found[c][0] for c in corners)

    return max(permutations(CORNERS, len(objects)), key=fit)


def scene_signatures(images: np.ndarray, captions: list[str], texture: str = "none") -> dict[str, np.ndarray]:
    """uint8 [N, H, W, 3] images and their several-shape captions -> per image bool arrays (SIGNATURES)."""
    out = {key: np.zeros(len(images), bool) for key in SIGNATURES}
    dark_fraction = DARK_FRACTION * (STRIPE_SHADE if texture == "stripes" else 1.0)
    for i, (image, caption) in enumerate(zip(images.astype(int), captions)):
        objects = parse_scene(caption)
        found, blobs = {}, {}
        for corner in CORNERS:
            crop = quadrant(image, corner)
            blobs[corner] = (crop, blob_signatures(crop, "", dark_fraction)[2])
            found[corner] = (blobs[corner][1], _nearest_colour(crop))
        placed = _placement(objects, found)
        held_sizes = []
        for (shape, colour, _), corner in zip(objects, placed):
            crop, size = blobs[corner]
            if size < MIN_SHAPE_PIXELS:
                out["missing_shape"][i] = True
                continue
            held_sizes.append(size)
            copy, hollow, _ = blob_signatures(crop, shape, dark_fraction)
            out["second_copy"][i] |= copy
            out["hollow_fill"][i] |= hollow
            out["wrong_colour"][i] |= found[corner][1] != colour
        # an empty quadrant's blob counts as an extra shape at the size a copy counts at
        smallest = min(held_sizes, default=MIN_SHAPE_PIXELS / COPY_FRACTION)
        for corner in set(CORNERS) - set(placed):
            size = blobs[corner][1]
            out["second_copy"][i] |= size >= max(4, COPY_FRACTION * smallest)
        out["scene_match"][i] = not (out["second_copy"][i] or out["missing_shape"][i] or out["wrong_colour"][i])
    return out
