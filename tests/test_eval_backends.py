"""The two feature backends behind one interface (eval.features), their networks' file layouts, and the
image views (whole image resized vs full-resolution centre crop)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from eval.features import FeatureBackend, InceptionBackend, ShapesBackend, make_backend
from eval.images import patch_view, whole_view
from eval.inception import FIDInceptionV3, load_fid_inception
from eval.scoring import SetScores
from tests.eval_helpers import random_inception_file, tiny_clip_folder

# Spot checks of pytorch-fid's FID Inception layout (torchvision Inception3, 1008 classes, no aux head).
INCEPTION_SHAPES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_4a_3x3.bn.running_var": (192,),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "fc.weight": (1008, 2048),
}


def test_inception_has_the_fid_weights_layout():
    model = FIDInceptionV3()
    state = model.state_dict()
    for key, shape in INCEPTION_SHAPES.items():
        assert tuple(state[key].shape) == shape, key
    assert not any("AuxLogits" in k for k in state)
    # torchvision's inception_v3 has 27,161,264 parameters; minus its aux head (3,326,696) plus 8 more classes
    assert sum(p.numel() for p in model.parameters()) == 23_850_960


@pytest.mark.parametrize("old_file", [False, True])
def test_inception_file_loads_weights_only(tmp_path, old_file):
    path = random_inception_file(tmp_path / "pt_inception.pth", seed=1, drop_num_batches_tracked=old_file)
    loaded = load_fid_inception(path)
    reference = FIDInceptionV3()
    reference.load_state_dict(torch.load(path, weights_only=True), strict=False)
    x = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = loaded.features(x)
        torch.testing.assert_close(feats, reference.eval().features(x))
    assert feats.shape == (2, 2048) and bool(torch.isfinite(feats).all())
    assert [loaded.features(x[:1], d).shape[1] for d in (64, 192, 768)] == [64, 192, 768]

    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an FID InceptionV3"):
        load_fid_inception(tmp_path / "other.pth")


def test_views_are_a_resize_and_a_full_resolution_crop():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    whole = whole_view(images, 16)
    for im, view in zip(images, whole):  # PIL's bilinear (antialiased) resize, per channel in float
        pil = np.stack([np.asarray(Image.fromarray(im[..., c].astype(np.float32) / 255, mode="F")
                                   .resize((16, 16), Image.Resampling.BILINEAR)) for c in range(3)])
        np.testing.assert_allclose(view.numpy(), pil, atol=1e-5)
    patch = patch_view(images, 16)
    torch.testing.assert_close(patch, torch.from_numpy(images[:, 8:24, 8:24]).permute(0, 3, 1, 2).float() / 255)
    assert patch_view(images, 33) is None  # smaller than the input: no patch
    odd = [rng.integers(0, 256, size=(40, 64, 3), dtype=np.uint8), images[0]]  # sizes may differ
    assert whole_view(odd, 16).shape == (2, 3, 16, 16) and patch_view(odd, 20).shape == (2, 3, 20, 20)


def test_shapes_backend():
    from eval.reference import ReferenceSet

    backend = make_backend("shapes")
    assert isinstance(backend, ShapesBackend) and isinstance(backend, FeatureBackend)
    images, captions = next(ReferenceSet("shapes", 32).batches(32))
    assert backend.whole_features(images).shape == (32, 128)
    assert backend.patch_features(images).shape == (32, 128)
    scores = backend.alignment(images, captions)
    assert set(scores) == {"shape", "colour", "position", "all", "alignment"}
    wrong = [c.replace("red", "green") if "red" in c else c.replace(c.split()[1], "red") for c in captions]
    assert backend.alignment(images, wrong)["colour"].mean() == 0.0  # it reads the caption, not only the image


def test_shapes_alignment_of_captions_without_a_position():
    from eval.reference import ReferenceSet
    from trainer.data.shapes import ShapesOptions

    backend = make_backend("shapes")
    reference = ReferenceSet("shapes", 64, options=ShapesOptions(position_in_caption=0.5))
    images, captions = next(reference.batches(64))
    free = np.array([" at " not in c for c in captions])
    assert 10 < free.sum() < 54
    assert backend.alignment(images, captions)["alignment"].mean() == 1.0  # real images: every caption met
    # any drawn position meets a caption without one; a wrong named position does not
    moved = [c if f else c.rsplit(" at ", 1)[0] + (" at center" if not c.endswith("center") else " at top left")
             for c, f in zip(captions, free)]
    position = backend.alignment(images, moved)["position"]
    assert position[free].all() and not position[~free].any()


def test_the_shapes_floor_draws_the_references_options():
    """The floor's images (same prompts, drawn again) are drawn with the reference's options: a striped
    reference's floor is striped (it was once drawn plain whatever the reference)."""
    from eval.reference import REFERENCE_SEED, ReferenceSet
    from trainer.data.shapes import ShapesDataset, ShapesOptions

    options = ShapesOptions(texture="stripes")
    reference = ReferenceSet("shapes", 16, options=options)
    floor_images, floor_captions = next(reference.same_prompts(5).batches(16))
    assert floor_captions == reference.captions
    data = ShapesDataset(16, seed=REFERENCE_SEED, options=options)
    assert all((image == data.redrawn(i, 5).image).all() for i, image in enumerate(floor_images))
    plain = ShapesDataset(16, seed=REFERENCE_SEED)
    assert any((image != plain.redrawn(i, 5).image).any() for i, image in enumerate(floor_images))


def test_inception_backend_with_clip(tmp_path):
    # 192-d features (pytorch-fid's --dims 192): the 2048-d matrix square root alone takes ~20 s on this CPU
    backend = make_backend("inception", inception=random_inception_file(tmp_path / "inc.pth"),
                           clip=tiny_clip_folder(tmp_path / "clip"), inception_dims=192)
    assert isinstance(backend, InceptionBackend) and backend.input_size == 299 and backend.feature_dim == 192
    rng = np.random.default_rng(1)
    small = rng.integers(0, 256, size=(3, 64, 64, 3), dtype=np.uint8)
    big = rng.integers(0, 256, size=(3, 320, 320, 3), dtype=np.uint8)
    assert backend.patch_features(small) is None
    assert backend.patch_features(big).shape == (3, 192)
    scores = backend.alignment(small, ["a red circle", "a blue square", "the left"])["alignment"]
    assert scores.shape == (3,) and np.all((scores >= 0) & (scores <= 100))

    # one set scored against another: the wiring SetScores uses for every backend
    ref, gen = SetScores(backend), SetScores(backend)
    ref.add(big, ["a red circle"] * 3)
    gen.add(big[::-1], ["a red circle"] * 3)
    result = gen.compare(ref)
    assert result["fid_whole"] == pytest.approx(0.0, abs=1e-3) and result["fid_patch"] == pytest.approx(0.0, abs=1e-3)
    assert 0 <= result["alignment"] <= 100

    assert make_backend("inception", inception=tmp_path / "inc.pth").alignment(small, ["a"] * 3) is None
    with pytest.raises(ValueError, match="--inception"):
        make_backend("inception")
