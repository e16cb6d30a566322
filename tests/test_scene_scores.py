"""The quadrant rules for several-shape images (eval/scene_scores.py): the dataset's own images pass them all,
and each signature is found where it is put in on purpose."""
import numpy as np
import pytest

from eval.pixel_scores import SATURATION
from eval.scene_scores import quadrant, scene_signatures
from trainer.data.shapes import BACKGROUND, COLOURS, CORNERS, FILLED_SHAPES, ShapesDataset, ShapesOptions

N = 200


def _real(objects=2, **options):
    data = ShapesDataset(N, seed=7, options=ShapesOptions(objects=objects, **options))
    return np.stack([data[i].image for i in range(N)]), [data[i].caption for i in range(N)], [data[i] for i in range(N)]


@pytest.mark.parametrize("objects,options", [(2, {}), (3, {"position_in_caption": 0.0}),
                                             (4, {"position_in_caption": 0.5, "texture": "stripes", "dots": 8})])
def test_real_scenes_match_their_captions(objects, options):
    images, captions, _ = _real(objects, **options)
    found = scene_signatures(images, captions, options.get("texture", "none"))
    assert found["scene_match"].all()
    assert not any(found[key].any() for key in ("second_copy", "hollow_fill", "missing_shape", "misplaced",
                                                "wrong_colour"))


def _shape_mask(crop):
    return crop.max(-1).astype(int) - crop.min(-1) > SATURATION


@pytest.mark.parametrize("named", [1.0, 0.0])
def test_a_shape_copied_into_an_empty_quadrant_is_a_second_copy(named):
    """The paper's Janus in a scene: a drawn shape pasted into a quadrant the caption leaves empty (with
    position-free captions too: two objects, three occupied quadrants)."""
    images, captions, items = _real(2, position_in_caption=named)
    copied = images.copy()
    for image, item in zip(copied, items):
        empty = [c for c in CORNERS if c not in [p for _, _, p in item.objects]][0]
        source = quadrant(image, item.objects[0][2]).copy()
        quadrant(image, empty)[:] = source
    found = scene_signatures(copied, captions)
    assert found["second_copy"].all() and not found["scene_match"].any()
    assert not found["missing_shape"].any() and not found["wrong_colour"].any()


@pytest.mark.parametrize("named", [1.0, 0.0])
def test_a_shape_moved_to_an_empty_quadrant_is_misplaced_where_the_caption_names_positions(named):
    images, captions, items = _real(2, position_in_caption=named)
    moved = images.copy()
    for image, item in zip(moved, items):
        empty = [c for c in CORNERS if c not in [p for _, _, p in item.objects]][0]
        source = quadrant(image, item.objects[0][2])
        quadrant(image, empty)[:] = source
        source[:] = BACKGROUND
    found = scene_signatures(moved, captions)
    assert not found["second_copy"].any() and not found["missing_shape"].any() and not found["wrong_colour"].any()
    assert found["misplaced"].all() if named else found["scene_match"].all()


def test_a_missing_shape_and_a_wrong_colour_are_found():
    images, captions, items = _real(2)
    erased, recoloured = images.copy(), images.copy()
    swap = {name: list(COLOURS)[(i + 1) % len(COLOURS)] for i, name in enumerate(COLOURS)}
    for i, item in enumerate(items):
        _, colour, position = item.objects[1]
        quadrant(erased[i], position)[:] = BACKGROUND
        crop = quadrant(recoloured[i], position)
        crop[_shape_mask(crop)] = COLOURS[swap[colour]]
    missing = scene_signatures(erased, captions)
    assert missing["missing_shape"].all() and missing["misplaced"].all() and not missing["second_copy"].any()
    assert not missing["scene_match"].any()
    wrong = scene_signatures(recoloured, captions)
    assert wrong["wrong_colour"].all() and not wrong["missing_shape"].any() and not wrong["misplaced"].any()
    assert not wrong["scene_match"].any()


def test_a_hollowed_filled_shape_in_a_scene_is_a_hollow_fill():
    from scipy import ndimage

    images, captions, items = _real(2)
    hollowed = images.copy()
    for i, item in enumerate(items):
        for _, _, position in item.objects:
            crop = quadrant(hollowed[i], position)
            crop[ndimage.binary_erosion(_shape_mask(crop), iterations=2)] = BACKGROUND
    found = scene_signatures(hollowed, captions)["hollow_fill"]
    filled = np.array([any(shape in FILLED_SHAPES for shape, _, _ in item.objects) for item in items])
    assert found[filled].mean() > 0.9 and not found[~filled].any()
