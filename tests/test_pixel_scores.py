"""The failure-signature pixel rule (eval/pixel_scores.py failure_signatures): zero on the dataset's own
images, and it finds the two signatures where they are put in on purpose."""
import numpy as np
from scipy import ndimage

from eval.pixel_scores import SATURATION, failure_signatures, score_images
from trainer.data.shapes import ShapesDataset, ShapesOptions, parse_caption

N = 400


def _real():
    data = ShapesDataset(N, seed=11)
    return np.stack([data[i].image for i in range(N)]), [data[i].caption for i in range(N)]


def test_real_images_show_no_failure_signature():
    images, captions = _real()
    found = failure_signatures(images, captions)
    assert found["second_copy"].sum() == 0 and found["hollow_fill"].sum() == 0


def test_a_second_copy_elsewhere_is_found():
    """The shape pasted again into the opposite half of the image (the paper's Janus); a shape shifted by a
    pixel (one blob) is not a copy."""
    images, captions = _real()
    copied, shifted = images.copy(), images.copy()
    for i, image in enumerate(images):
        mask = image.max(-1).astype(int) - image.min(-1) > SATURATION
        flip = np.flip(np.flip(image, 0), 1)
        flip_mask = np.flip(np.flip(mask, 0), 1)
        copied[i][flip_mask & ~mask] = flip[flip_mask & ~mask]
        shifted[i][np.roll(mask, 1, 1)] = image[mask].mean(0).astype(np.uint8)
    apart = np.array([_far_apart(images[i]) for i in range(N)])
    assert failure_signatures(copied, captions)["second_copy"][apart].mean() > 0.95
    assert failure_signatures(shifted, captions)["second_copy"].sum() == 0


def _far_apart(image) -> bool:
    """Whether the shape and its 180-degree turn do not touch (else the 'copy' is one blob)."""
    mask = image.max(-1).astype(int) - image.min(-1) > SATURATION
    both = mask | np.flip(np.flip(mask, 0), 1)
    return ndimage.label(both, structure=np.ones((3, 3)))[1] >= 2


def test_filled_shapes_with_the_background_through_their_middle_are_hollow():
    """Filled shapes whose inside (the shape eroded by 2 px) is painted with the background: hollow; the
    same for rings and frames is their normal look and is not counted."""
    images, captions = _real()
    hollowed = images.copy()
    for i, image in enumerate(images):
        mask = image.max(-1).astype(int) - image.min(-1) > SATURATION
        inside = ndimage.binary_erosion(mask, iterations=2)
        hollowed[i][inside] = image[~mask].mean(0).astype(np.uint8)
    found = failure_signatures(hollowed, captions)["hollow_fill"]
    filled = np.array([parse_caption(c)[0] in ("circle", "square", "triangle", "cross") for c in captions])
    big_enough = np.array([ndimage.binary_erosion(im.max(-1).astype(int) - im.min(-1) > SATURATION, iterations=2).sum() >= 9
                           for im in images])
    assert found[filled & big_enough].mean() > 0.9
    assert found[~filled].sum() == 0


def test_filled_shapes_darkened_in_their_middle_are_hollow():
    """The one-step student's version: the inside keeps its hue (still saturated, so still "shape pixels")
    but at 40% of the brightness; half that darkening is not counted."""
    images, captions = _real()
    filled = np.array([parse_caption(c)[0] in ("circle", "square", "triangle", "cross") for c in captions])
    found = {}
    for factor in (0.4, 0.8):
        darkened = images.copy()
        for i, image in enumerate(images):
            mask = image.max(-1).astype(int) - image.min(-1) > SATURATION
            inside = ndimage.binary_erosion(mask, iterations=2)
            darkened[i][inside] = (image[inside] * factor).astype(np.uint8)
        found[factor] = failure_signatures(darkened, captions)["hollow_fill"]
    big_enough = np.array([ndimage.binary_erosion(im.max(-1).astype(int) - im.min(-1) > SATURATION, iterations=2).sum() >= 9
                           for im in images])
    assert found[0.4][filled & big_enough].mean() > 0.9 and found[0.4][~filled].sum() == 0
    assert found[0.8].sum() == 0


def test_captions_without_a_position_score_colour_everywhere_and_position_where_named():
    data = ShapesDataset(N, seed=11, options=ShapesOptions(position_in_caption=0.5))
    images, captions = np.stack([data[i].image for i in range(N)]), [data[i].caption for i in range(N)]
    assert failure_signatures(images, captions)["second_copy"].sum() == 0
    scores = score_images(images, captions)
    assert scores["colour_acc"] == 1.0 and scores["position_acc"] == 1.0  # over the named positions only
    free = [f"a {item.colour} {item.shape}" for item in (data[i] for i in range(N))]
    assert np.isnan(score_images(images, free)["position_acc"]) and score_images(images, free)["colour_acc"] == 1.0


def test_striped_fills_are_not_hollow_but_striped_fills_with_a_hole_are():
    """With `texture="stripes"` the dark stripes belong to the fill; the background through the middle
    still counts as hollow."""
    data = ShapesDataset(N, seed=12, options=ShapesOptions(texture="stripes"))
    images, captions = np.stack([data[i].image for i in range(N)]), [data[i].caption for i in range(N)]
    found = failure_signatures(images, captions, texture="stripes")
    assert found["hollow_fill"].sum() == 0 and found["second_copy"].sum() == 0
    filled = np.array([parse_caption(c)[0] in ("circle", "square", "triangle", "cross") for c in captions])
    assert failure_signatures(images, captions)["hollow_fill"][filled].mean() > 0.5  # the plain rule would count them
    hollowed = images.copy()
    for i, image in enumerate(images):
        mask = image.max(-1).astype(int) - image.min(-1) > SATURATION
        hollowed[i][ndimage.binary_erosion(mask, iterations=2)] = image[~mask].mean(0).astype(np.uint8)
    big_enough = np.array([ndimage.binary_erosion(im.max(-1).astype(int) - im.min(-1) > SATURATION, iterations=2).sum() >= 9
                           for im in images])
    # crosses left out: striped, their 4 px bars lose pixels to the saturation cut, so their eroded middle is
    # often not enclosed, and about half of them are missed
    solid = np.array([parse_caption(c)[0] in ("circle", "square", "triangle") for c in captions])
    assert failure_signatures(hollowed, captions, texture="stripes")["hollow_fill"][solid & big_enough].mean() > 0.9
