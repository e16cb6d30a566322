"""Pixel rules for images of several captioned shapes (`data.shapes.objects` > 1), read quadrant by quadrant:
the data puts each shape clearly inside its own corner quadrant, so a quadrant holds one shape or none.

Per image (`scene_signatures`), with k the shapes the caption names and "held" a quadrant whose largest blob
of shape pixels is at least MIN_SHAPE_AREA of the image:
- second_copy: more quadrants held than k, or a second copy inside a shape's own quadrant (eval/pixel_scores.py's
  rule on the quadrant): the paper's "Janus", a shape drawn again where the caption asks for none;
- missing_shape: fewer quadrants held than k;
- misplaced: the caption names positions and the held quadrants are not the named ones;
- wrong_colour: a held shape's hue is nearest another of the data's colours than its caption's;
- hollow_fill: a filled shape drawn hollow (pixel_scores' rule, on its quadrant);
- scene_match: none of second_copy, missing_shape, misplaced, wrong_colour: the scene drawn as captioned, its
  pixel alignment (the kinds of shape are not checked).

Captions that name no position say which shapes, not where: their shapes are matched to the quadrants that fit
them best (held, then nearest hues, then biggest blobs) for the colour and fill rules. Hue is the colour with its
grey part removed and scaled to 1, so a dark stripe and an anti-aliased edge (the colour mixed with the grey
background) keep their shape's hue.
"""
from __future__ import annotations

from itertools import permutations

import numpy as np

from eval.pixel_scores import DARK_FRACTION, FILLED, blob_signatures, shape_pixels
from trainer.data.shapes import CORNERS, COLOURS, STRIPE_SHADE, parse_scene

# A quadrant holds a shape when its largest blob of shape pixels covers this share of the image: every drawn
# shape covers over 4% (the thinnest, a ring, 44 px at 32 px), a few stray pixels of colour less than 1%.
MIN_SHAPE_AREA = 0.01
SIGNATURES = ("second_copy", "hollow_fill", "missing_shape", "misplaced", "wrong_colour", "scene_match")


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
    mask = shape_pixels(crop)
    if not mask.any():
        return None
    return COLOUR_NAMES[int(np.argmin(((COLOUR_HUES - hue(crop[mask]).mean(0)) ** 2).sum(1)))]


def _placement(objects, found: dict[str, tuple[bool, int, str | None]]) -> tuple[str, ...]:
    """Each object's quadrant: the named one, or (captions without positions) the assignment with the most held
    quadrants, then the most right colours, then the biggest blobs."""
    if all(position is not None for _, _, position in objects):
        return tuple(position for _, _, position in objects)

    def fit(corners):
        held = [found[c][0] for c in corners]
        right = [h and found[c][2] == colour for h, c, (_, colour, _) in zip(held, corners, objects)]
        return sum(held), sum(right), sum(found[c][1] for c in corners)

    return max(permutations(CORNERS, len(objects)), key=fit)


def scene_signatures(images: np.ndarray, captions: list[str], texture: str = "none") -> dict[str, np.ndarray]:
    """uint8 [N, H, W, 3] images and their several-shape captions -> per image bool arrays (SIGNATURES)."""
    out = {key: np.zeros(len(images), bool) for key in SIGNATURES}
    dark_fraction = DARK_FRACTION * (STRIPE_SHADE if texture == "stripes" else 1.0)
    for i, (image, caption) in enumerate(zip(images.astype(int), captions)):
        objects = parse_scene(caption)
        min_pixels = MIN_SHAPE_AREA * image.shape[0] * image.shape[1]
        found, blobs = {}, {}  # corner -> (held, largest blob's pixels, nearest colour); (copy, hollow if filled)
        for corner in CORNERS:
            crop = quadrant(image, corner)
            copy, hollow, size = blob_signatures(crop, True, dark_fraction)
            found[corner], blobs[corner] = (size >= min_pixels, size, _nearest_colour(crop)), (copy, hollow)
        held = {corner for corner, (h, _, _) in found.items() if h}
        placed = _placement(objects, found)
        out["second_copy"][i] = len(held) > len(objects)
        out["missing_shape"][i] = len(held) < len(objects)
        out["misplaced"][i] = objects[0][2] is not None and held != set(placed)
        for (shape, colour, _), corner in zip(objects, placed):
            if corner not in held:
                continue
            copy, hollow = blobs[corner]
            out["second_copy"][i] |= copy
            out["hollow_fill"][i] |= hollow and shape in FILLED
            out["wrong_colour"][i] |= found[corner][2] != colour
        out["scene_match"][i] = not any(out[key][i] for key in ("second_copy", "missing_shape", "misplaced",
                                                                  "wrong_colour"))
    return out
