"""The procedural shapes dataset: determinism, captions, coverage, and pixels that match them."""

import hashlib

import numpy as np
import pytest

from trainer.data.shapes import (BACKGROUND, COLOURS, CORNERS, FILLED_SHAPES, POSITIONS, SHAPES, STRIPE_SHADE,
                                 ShapesDataset, ShapesOptions, parse_caption, parse_scene)


def digest(data: ShapesDataset) -> str:
    h = hashlib.sha256()
    for i in range(len(data)):
        h.update(data[i].image.tobytes())
        h.update(data[i].caption.encode())
    return h.hexdigest()[:16]


def test_the_default_data_is_item_for_item_what_the_recorded_results_used():
    """The committed teacher and every recorded result were made from these pixels and captions (digests taken
    before the renderer learnt several shapes per image): a renderer change that moves them is caught here."""
    assert digest(ShapesDataset(40, seed=0)) == "b1f2d63c7e80211a"
    options = ShapesOptions(position_in_caption=0.5, texture="stripes", dots=8)
    assert digest(ShapesDataset(40, seed=0, options=options)) == "fa3bb89266878491"


def test_items_depend_only_on_seed_and_index():
    a, b = ShapesDataset(50, seed=7), ShapesDataset(50, seed=7)
    for i in range(50):
        assert np.array_equal(a[i].image, b[i].image) and a[i].caption == b[i].caption
    # Regenerating one item alone, from a dataset of another length, gives the same item.
    alone = ShapesDataset(1000, seed=7)[31]
    assert np.array_equal(alone.image, a[31].image) and alone.caption == a[31].caption
    other = ShapesDataset(50, seed=8)
    assert sum(np.array_equal(a[i].image, other[i].image) for i in range(50)) < 5


def test_captions_parse_back_and_name_the_fields():
    dataset = ShapesDataset(200, seed=1)
    for i in range(len(dataset)):
        item = dataset[i]
        assert item.caption == f"a {item.colour} {item.shape} at {item.position}"
        assert parse_caption(item.caption) == (item.shape, item.colour, item.position)


def test_a_caption_without_a_position_parses_to_none():
    assert parse_caption("a red ring") == ("ring", "red", None)
    data = ShapesDataset(200, seed=1, options=ShapesOptions(position_in_caption=0.5))
    free = [data[i] for i in range(200) if " at " not in data[i].caption]
    assert 50 < len(free) < 150
    assert all(parse_caption(item.caption) == (item.shape, item.colour, None) for item in free)


@pytest.mark.parametrize("text", ["", "a red", "a red circle at", "a red circle at middle", "a red circle on",
                                  "a pink circle at center", "the red circle at center",
                                  "a red blob at top left", "a red circle in top left"])
def test_parse_caption_rejects_other_text(text):
    with pytest.raises(ValueError):
        parse_caption(text)


def test_every_word_of_the_vocabulary_appears():
    items = [ShapesDataset(2000, seed=0)[i] for i in range(2000)]
    assert {item.shape for item in items} == set(SHAPES)
    assert {item.colour for item in items} == set(COLOURS)
    assert {item.position for item in items} == set(POSITIONS)


@pytest.mark.parametrize("resolution", [32, 64, 128])
def test_resolution_sets_the_image_size(resolution):
    image = ShapesDataset(3, resolution=resolution)[2].image
    assert image.shape == (resolution, resolution, 3) and image.dtype == np.uint8
    assert tuple(image[0, 0]) == BACKGROUND  # corners stay clean background


def test_index_out_of_range():
    with pytest.raises(IndexError):
        ShapesDataset(3)[3]


def closest_colour(image: np.ndarray) -> tuple[str, np.ndarray]:
    """Which caption colour explains the image best, and each pixel's coverage by it.

    Each anti-aliased pixel is background + coverage * (colour - background); the right colour
    leaves the smallest residual after projecting every pixel on that line.
    """
    offset = image.reshape(-1, 3).astype(float) - BACKGROUND
    best = None
    for name, rgb in COLOURS.items():
        direction = np.subtract(rgb, BACKGROUND, dtype=float)
        coverage = np.clip(offset @ direction / (direction @ direction), 0, 1)
        residual = np.abs(offset - coverage[:, None] * direction).sum()
        if best is None or residual < best[0]:
            best = (residual, name, coverage)
    return best[1], best[2].reshape(image.shape[:2])


@pytest.mark.parametrize("resolution", [32, 64])
def test_pixels_show_the_captioned_colour_in_the_captioned_place(resolution):
    dataset = ShapesDataset(120, seed=3, resolution=resolution)
    half = resolution / 2
    for i in range(len(dataset)):
        item = dataset[i]
        colour, coverage = closest_colour(item.image)
        assert colour == item.colour, item.caption
        assert coverage.max() > 0.9, f"{item.caption}: no pixel reaches the full colour"
        ys, xs = np.mgrid[:resolution, :resolution]
        cx, cy = (coverage * xs).sum() / coverage.sum(), (coverage * ys).sum() / coverage.sum()
        if item.position == "center":
            assert abs(cx - half) < resolution / 8 and abs(cy - half) < resolution / 8
        else:
            vertical, horizontal = item.position.split()
            assert (cy < half) == (vertical == "top"), item.caption
            assert (cx < half) == (horizontal == "left"), item.caption
            # Clearly inside the quadrant: no coverage across the image's middle lines.
            rows = slice(0, int(half)) if vertical == "top" else slice(int(half), None)
            cols = slice(0, int(half)) if horizontal == "left" else slice(int(half), None)
            assert coverage[rows, cols].sum() == pytest.approx(coverage.sum()), item.caption


def test_position_left_out_of_a_fraction_of_the_captions_changes_nothing_else():
    full, half = ShapesDataset(400, seed=3), ShapesDataset(400, seed=3, options=ShapesOptions(position_in_caption=0.5))
    short = 0
    for i in range(400):
        a, b = full[i], half[i]
        assert np.array_equal(a.image, b.image) and (a.shape, a.colour, a.position) == (b.shape, b.colour, b.position)
        if b.caption == f"a {b.colour} {b.shape}":
            short += 1
        else:
            assert b.caption == a.caption
    assert 160 <= short <= 240  # ~half, binomial(400, 0.5) within ~4 sd
    never = ShapesDataset(50, seed=3, options=ShapesOptions(position_in_caption=0.0))
    assert all(never[i].caption.count(" at ") == 0 for i in range(50))


@pytest.mark.parametrize("fraction", [-0.1, 1.5])
def test_position_in_caption_out_of_range_is_refused(fraction):
    with pytest.raises(ValueError, match="position_in_caption"):
        ShapesDataset(10, options=ShapesOptions(position_in_caption=fraction))


def test_stripes_change_only_the_filled_shapes_insides():
    plain, striped = ShapesDataset(120, seed=4), ShapesDataset(120, seed=4, options=ShapesOptions(texture="stripes"))
    for i in range(120):
        a, b = plain[i], striped[i]
        assert a.caption == b.caption and (a.shape, a.colour, a.position) == (b.shape, b.colour, b.position)
        covered = (a.image != BACKGROUND).any(axis=-1)
        # the background and the shape's outline stay; only pixels inside a filled shape change
        assert np.array_equal(a.image[~covered], b.image[~covered]), a.caption
        changed = (a.image != b.image).any(axis=-1)
        assert changed.any() == (a.shape in FILLED_SHAPES), a.caption


def test_stripes_alternate_the_colour_and_its_shade_at_free_angles():
    data = ShapesDataset(300, seed=5, options=ShapesOptions(texture="stripes"))
    centres = []
    for i in range(300):
        item = data[i]
        if item.shape != "square":
            continue
        colour = np.array(COLOURS[item.colour], dtype=float)
        coverage = (item.image != BACKGROUND).any(axis=-1)
        ys, xs = np.nonzero(coverage)
        cy, cx = int(ys.mean()), int(xs.mean())
        inside = item.image[cy - 3:cy + 4, cx - 3:cx + 4].reshape(-1, 3).astype(float)
        brightness = inside @ colour / (colour @ colour)  # 1: the colour, STRIPE_SHADE: the dark stripe
        assert brightness.max() > 0.9 and brightness.min() < STRIPE_SHADE + 0.1, item.caption
        centres.append(item.image[cy - 3:cy + 4, cx - 3:cx + 4])
    # the angle and phase are free: no two squares' middles are striped alike
    assert len(centres) > 20
    assert not any(np.array_equal(centres[j], centres[k]) for j in range(len(centres)) for k in range(j))


def test_dots_are_grey_squares_on_the_background_and_leave_the_shape_alone():
    plain, dotted = ShapesDataset(100, seed=6), ShapesDataset(100, seed=6, options=ShapesOptions(dots=8))
    counts = []
    for i in range(100):
        a, b = plain[i], dotted[i]
        assert a.caption == b.caption
        changed = (a.image != b.image).any(axis=-1)
        shape = (a.image != BACKGROUND).any(axis=-1)
        grey = b.image[changed & ~shape].astype(int)
        assert (grey.max(-1) - grey.min(-1) <= 1).all()  # unsaturated: the pixel rules' shape mask skips them
        counts.append(changed.sum())
    assert min(counts) > 0  # at least one dot each
    assert len(set(counts)) > 10  # their number and places vary


@pytest.mark.parametrize("kwargs", [{"texture": "dots"}, {"dots": -1}, {"objects": 0}, {"objects": 5}])
def test_an_unknown_texture_or_a_bad_count_is_refused(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        ShapesOptions(**kwargs)


def test_a_redrawn_item_keeps_its_caption_and_its_options():
    """Another real image of the same prompt (the evaluation's FID floor): caption, shape, colour and position
    kept; size, jitter, stripes and dots drawn again, and drawn the data's way."""
    data = ShapesDataset(60, seed=3, options=ShapesOptions(position_in_caption=0.5, texture="stripes", dots=8))

    def dotted(image):  # a grey (unsaturated) pixel off the background: a dot
        grey = image[(image != BACKGROUND).any(-1)].astype(int)
        return ((grey.max(-1) - grey.min(-1)) <= 1).any()

    def striped(item):  # the colour and its dark shade both drawn
        colour = np.array(COLOURS[item.colour], dtype=float)
        brightness = item.image.reshape(-1, 3).astype(float) @ colour / (colour @ colour)
        return brightness.max() > 0.9 and ((brightness > STRIPE_SHADE - 0.1) & (brightness < STRIPE_SHADE + 0.1)).any()

    found = {"dots": 0, "stripes": 0, "filled": 0}
    for i in range(60):
        item, again = data[i], data.redrawn(i, seed=99)
        assert (again.caption, again.shape, again.colour, again.position) == \
            (item.caption, item.shape, item.colour, item.position)
        assert (again.image != item.image).any()
        assert (again.image == data.redrawn(i, seed=99).image).all()  # depends only on (seed, index)
        found["dots"] += dotted(again.image)
        if item.shape in FILLED_SHAPES:
            found["filled"] += 1
            found["stripes"] += striped(again)
    assert found["dots"] >= 55  # a few dots hide under the shape
    assert found["filled"] > 20 and found["stripes"] >= found["filled"] - 2


@pytest.mark.parametrize("count", [2, 3])
def test_several_objects_each_drawn_in_its_own_corner_and_captioned_in_reading_order(count):
    data = ShapesDataset(80, seed=8, options=ShapesOptions(objects=count))
    half = 16
    quadrants = {"top left": (slice(0, half), slice(0, half)), "top right": (slice(0, half), slice(half, None)),
                 "bottom left": (slice(half, None), slice(0, half)),
                 "bottom right": (slice(half, None), slice(half, None))}
    kinds = set()
    for i in range(80):
        item = data[i]
        positions = [position for _, _, position in item.objects]
        assert len(item.objects) == count and positions == sorted(positions, key=CORNERS.index)  # distinct corners
        assert parse_scene(item.caption) == item.objects
        for corner, (rows, cols) in quadrants.items():
            quadrant = item.image[rows, cols]
            named = [(shape, colour) for shape, colour, position in item.objects if position == corner]
            if not named:
                assert (quadrant == BACKGROUND).all(), (item.caption, corner)
                continue
            colour, coverage = closest_colour(quadrant)
            assert colour == named[0][1] and coverage.max() > 0.9, (item.caption, corner)
            kinds.add(named[0])
    assert len(kinds) > 30  # shape and colour drawn per object: nearly all 36 pairs appear


def test_several_objects_without_positions_and_redrawn():
    data = ShapesDataset(60, seed=9, options=ShapesOptions(objects=3, position_in_caption=0.0, texture="stripes"))
    for i in range(60):
        item, again = data[i], data.redrawn(i, seed=5)
        assert parse_scene(item.caption) == tuple((shape, colour, None) for shape, colour, _ in item.objects)
        assert (again.caption, again.objects) == (item.caption, item.objects)
        assert (again.image != item.image).any()
    with pytest.raises(ValueError, match="one-shape"):
        parse_caption(data[0].caption)
