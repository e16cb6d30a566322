"""Procedural captioned-shapes dataset: the embedded default data.

Every item is a coloured shape on a flat dark background with a caption that names its shape,
colour and position ("a red ring at top left"). An item depends only on (seed, index), so any
item can be regenerated on its own, by any worker, in any order.

Four options (`ShapesOptions`, each off by default, the config's `data.shapes` keys of the same names):

`position_in_caption` < 1 leaves the position out of that fraction of the captions ("a red ring"): the
shape is still drawn at one of the five positions, so such a caption has five modes, and a few-step
student that cannot follow its teacher's curved trajectory blends them (the paper's "second copy").

`texture="stripes"` fills the filled shapes (circle, square, triangle, cross) with stripes of the colour and
a darker shade, at an angle and phase no caption names: fine detail with a continuum of modes per caption.

`dots=k` scatters 1..k small grey dots over the background, at places no caption names: many small,
independent decisions. Grey (unsaturated), so the pixel rules that look for the shape's colour do not see
them (the background's pixel std does).

`objects=k` > 1 draws k shapes per image, each of its own shape and colour, at k different corners (the
centre would overlap them), captioned in reading order ("a red ring at top left, a blue square at bottom
right"): a scene the student must compose in one move, and with position-free captions a choice among the
layouts as well.

Stripes and dots were meant to give a few-step student detail it cannot follow in one move; on the toy teacher
it still does, with all three options together too (bench/README.md "Harder data for the adversarial stages").
Two shapes per image on top of them is the first data on which the one-step stage's discriminator leaves
chance (bench/README.md "Two shapes per image").
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

# Ring and frame are outlined shapes: their thin strokes are the fine detail that a blurry
# few-step student loses, so detail-sensitive metrics have something to measure.
SHAPES = ("circle", "square", "triangle", "cross", "ring", "frame")
COLOURS = {
    "red": (235, 50, 50),
    "green": (50, 205, 50),
    "blue": (60, 90, 245),
    "yellow": (240, 220, 40),
    "magenta": (220, 50, 220),
    "cyan": (40, 210, 220),
}
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
BACKGROUND = (30, 30, 30)

# Geometry as fractions of the image side, so every resolution draws the same picture.
SIZE_RANGE = (0.34, 0.42)
EDGE_MARGIN = 0.02  # gap kept between the shape and its quadrant's border
MAX_JITTER = 0.06
# A 1-px stroke at a sub-pixel offset splits into two half-strength pixels and washes out at
# 32 px; 1.5 px keeps at least one pixel close to the full colour.
MIN_OUTLINE_PX = 1.5
SUPERSAMPLE = 4

TEXTURES = ("none", "stripes")
FILLED_SHAPES = ("circle", "square", "triangle", "cross")
# One dark and one light stripe per period (0.15 of the side: 4.8 px at 32 px, at least two pixels a stripe
# at any angle); the dark stripes keep this share of the colour, so a striped shape stays its colour.
STRIPE_PERIOD = 0.15
STRIPE_SHADE = 0.45
DOT_SIZE = 0.07  # of the side: 2.2 px at 32 px
DOT_GREY = (90, 170)  # grey levels; the background is 30

_POSITION_CENTRES = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}


CORNERS = POSITIONS[:4]
OBJECT_SEPARATOR = ", "


@dataclass(frozen=True)
class ShapeSample:
    """One rendered item: the image (uint8, HxWx3), its caption, and each shape it draws as (shape, colour,
    position), in caption order."""

    image: np.ndarray
    caption: str
    objects: tuple[tuple[str, str, str], ...]

    @property
    def shape(self) -> str:
        """The first (for a one-object item, the only) shape; likewise `colour` and `position`."""
        return self.objects[0][0]

    @property
    def colour(self) -> str:
        return self.objects[0][1]

    @property
    def position(self) -> str:
        return self.objects[0][2]


def make_caption(shape: str, colour: str, position: str | None) -> str:
    """The caption template: "a {colour} {shape} at {position}", or "a {colour} {shape}" without a position."""
    return f"a {colour} {shape}" if position is None else f"a {colour} {shape} at {position}"


def parse_caption(caption: str) -> tuple[str, str, str | None]:
    """Invert make_caption: (shape, colour, position), position None for a caption without one; raise
    ValueError on any other text (a several-object caption included: see parse_scene)."""
    words = caption.split(" ")
    named = len(words) >= 5 and words[3] == "at"
    if not (named or len(words) == 3) or words[0] != "a":
        raise ValueError(f"not a one-shape shapes caption: {caption!r}")
    colour, shape, position = words[1], words[2], " ".join(words[4:]) if named else None
    if colour not in COLOURS or shape not in SHAPES or (named and position not in POSITIONS):
        raise ValueError(f"not a one-shape shapes caption: {caption!r}")
    return shape, colour, position


def parse_scene(caption: str) -> tuple[tuple[str, str, str | None], ...]:
    """Every object a caption names, as parse_caption gives each; a one-shape caption gives one."""
    return tuple(parse_caption(part) for part in caption.split(OBJECT_SEPARATOR))


@dataclass(frozen=True)
class DrawnObject:
    """One shape as drawn: what its caption names, and what it leaves unnamed (size and jitter as fractions
    of the image side; stripes as angle in radians and phase in periods, None for a plain fill)."""

    shape: str
    colour: str
    position: str
    size_fraction: float
    jitter: tuple[float, float]
    stripes: tuple[float, float] | None = None


def render_scene(objects: list[DrawnObject], resolution: int,
                 dots: list[tuple[float, float, int]] = ()) -> np.ndarray:
    """Draw anti-aliased shapes in order; `stripes` stripe a filled shape's inside; `dots` (x, y as fractions,
    grey level) are drawn under the shapes."""
    canvas_side = resolution * SUPERSAMPLE
    image = Image.new("RGB", (canvas_side, canvas_side), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for x, y, grey in dots:
        side = DOT_SIZE * canvas_side
        draw.rectangle([round(x * canvas_side), round(y * canvas_side), round(x * canvas_side + side),
                        round(y * canvas_side + side)], fill=(grey, grey, grey))
    pixels = np.array(image)
    for drawn in objects:
        inside = _mask(drawn, resolution, canvas_side)
        fill = np.array(COLOURS[drawn.colour], dtype=np.uint8)
        pixels[inside] = fill
        if drawn.stripes is not None and drawn.shape in FILLED_SHAPES:
            dark = inside & _dark_stripes(canvas_side, *drawn.stripes)
            pixels[dark] = np.round(fill * STRIPE_SHADE).astype(np.uint8)

    # Box filtering an integer supersample is an exact area average: edges get the same
    # partial coverage at every resolution.
    small = Image.fromarray(pixels).resize((resolution, resolution), Image.Resampling.BOX)
    return np.array(small, dtype=np.uint8)


def _mask(drawn: DrawnObject, resolution: int, canvas_side: int) -> np.ndarray:
    """Which supersampled pixels the shape covers (bool, canvas_side x canvas_side)."""
    mask = Image.new("1", (canvas_side, canvas_side), 0)
    draw = ImageDraw.Draw(mask)
    centre_x, centre_y = _POSITION_CENTRES[drawn.position]
    cx = (centre_x + drawn.jitter[0]) * canvas_side
    cy = (centre_y + drawn.jitter[1]) * canvas_side
    half = drawn.size_fraction * canvas_side / 2
    box = [round(cx - half), round(cy - half), round(cx + half), round(cy + half)]
    outline = round(max(MIN_OUTLINE_PX, drawn.size_fraction * resolution / 12) * SUPERSAMPLE)

    shape = drawn.shape
    if shape == "circle":
        draw.ellipse(box, fill=1)
    elif shape == "square":
        draw.rectangle(box, fill=1)
    elif shape == "triangle":
        left, top, right, bottom = box
        draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=1)
    elif shape == "cross":
        bar = half / 3  # half the bar width: bars are a third of the shape wide
        draw.rectangle([box[0], round(cy - bar), box[2], round(cy + bar)], fill=1)
        draw.rectangle([round(cx - bar), box[1], round(cx + bar), box[3]], fill=1)
    elif shape == "ring":
        draw.ellipse(box, outline=1, width=outline)
    elif shape == "frame":
        draw.rectangle(box, outline=1, width=outline)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return np.array(mask, dtype=bool)


def _dark_stripes(canvas_side: int, angle: float, phase: float) -> np.ndarray:
    """The dark half of every stripe period over the whole canvas (bool)."""
    y, x = np.mgrid[0:canvas_side, 0:canvas_side] / canvas_side
    along = (x * np.cos(angle) + y * np.sin(angle)) / STRIPE_PERIOD + phase
    return np.mod(along, 1.0) < 0.5


@dataclass(frozen=True)
class ShapesOptions:
    """What the data draws beyond the plain default, each off by default (see the module's docstring):
    the share of captions naming the position, the filled shapes' texture, the most grey dots per image, the
    shapes per image. One object, so that the trainer's data, the evaluation's reference and its floor draw
    the same data."""

    position_in_caption: float = 1.0
    texture: str = "none"
    dots: int = 0
    objects: int = 1

    def __post_init__(self):
        if not 0.0 <= self.position_in_caption <= 1.0:
            raise ValueError(f"position_in_caption must be in [0, 1], got {self.position_in_caption}")
        if self.texture not in TEXTURES:
            raise ValueError(f"texture must be one of {TEXTURES}, got {self.texture!r}")
        if self.dots < 0:
            raise ValueError(f"dots must be >= 0, got {self.dots}")
        if not 1 <= self.objects <= len(CORNERS):
            raise ValueError(f"objects must be in [1, {len(CORNERS)}] (one shape per corner), got {self.objects}")


PLAIN = ShapesOptions()


class ShapesDataset:
    """`count` captioned shapes; item i depends only on (seed, i)."""

    def __init__(self, count: int, seed: int = 0, resolution: int = 32, options: ShapesOptions = PLAIN):
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        if resolution < 16:
            raise ValueError(f"resolution must be >= 16 px, got {resolution}")
        self.count = count
        self.seed = seed
        self.resolution = resolution
        self.options = options

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> ShapeSample:
        if index < 0:
            index += self.count
        if not 0 <= index < self.count:
            raise IndexError(f"index {index} out of range for {self.count} items")
        rng = np.random.default_rng([self.seed, index])
        kinds = [(SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))])
                 for _ in range(self.options.objects)]
        if self.options.objects == 1:
            positions = [POSITIONS[rng.integers(len(POSITIONS))]]
        else:  # reading order, so that one scene has one caption
            corners = sorted(rng.choice(len(CORNERS), self.options.objects, replace=False))
            positions = [CORNERS[i] for i in corners]
        objects = tuple((shape, colour, position) for (shape, colour), position in zip(kinds, positions))
        return self._sample(rng, objects)

    def redrawn(self, index: int, seed: int) -> ShapeSample:
        """Item `index` with its caption (shapes, colours, positions) kept and everything else it draws (sizes,
        jitters, stripes, dots) drawn again from (seed, index): another real image of the same prompt."""
        item = self[index]
        return self._sample(np.random.default_rng([seed, index]), item.objects, item.caption)

    def _sample(self, rng: np.random.Generator, objects: tuple[tuple[str, str, str], ...],
                caption: str | None = None) -> ShapeSample:
        """The item from the rest of its draws; its caption from them too unless given."""
        drawn = []
        for shape, colour, position in objects:
            size_fraction = rng.uniform(*SIZE_RANGE)
            # Jitter only as far as keeps the shape clearly inside its quadrant.
            room = min(MAX_JITTER, 0.25 - size_fraction / 2 - EDGE_MARGIN)
            jitter = (rng.uniform(-room, room), rng.uniform(-room, room))
            drawn.append(DrawnObject(shape, colour, position, size_fraction, jitter))
        # Drawn after the default draws and only when asked for: the default dataset stays item for item what
        # it was.
        options = self.options
        named = options.position_in_caption == 1.0 or rng.uniform() < options.position_in_caption
        if options.texture == "stripes":
            drawn = [replace(d, stripes=(rng.uniform(0, np.pi), rng.uniform())) for d in drawn]
        dots = [(rng.uniform(0, 1 - DOT_SIZE), rng.uniform(0, 1 - DOT_SIZE), int(rng.integers(*DOT_GREY)))
                for _ in range(rng.integers(1, options.dots + 1) if options.dots else 0)]
        if caption is None:
            caption = OBJECT_SEPARATOR.join(make_caption(shape, colour, position if named else None)
                                            for shape, colour, position in objects)
        return ShapeSample(render_scene(drawn, self.resolution, dots), caption, objects)
