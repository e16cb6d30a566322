"""The shapes backend's classifier (eval.shapes_classifier): training at tiny scale, the file format, the
degradations, and the committed weights' claim: accuracy stays high under degradation while FID rises."""
from __future__ import annotations

import pytest
import torch

from eval import shapes_classifier as sc
from eval.classifier_check import run_check
from eval.features import ShapesBackend
from eval.images import degrade, to_tensor, whole_view


def test_trains_at_tiny_scale_and_round_trips(tmp_path):
    model = sc.train(count=1024, epochs=4, batch_size=64, lr=3e-3, progress=False)
    images, labels = sc.render(400, seed=2000)  # held out: training used seed 1000
    views = whole_view(images, sc.INPUT_SIZE)
    feats, pred = sc.predict(model, views)
    assert feats.shape == (400, sc.FEATURE_DIM)
    acc = sc.accuracy(pred, labels)
    # chance: shape 1/6, colour 1/6, position 1/5; a few seconds of training is far above it
    assert acc["colour"] > 0.9 and acc["position"] > 0.9 and acc["shape"] > 0.45, acc

    path = sc.save(model, tmp_path / "clf.safetensors", {"command": "test"})
    again = sc.load(path)
    torch.testing.assert_close(sc.predict(again, views)[0], feats, atol=0, rtol=0)


def test_load_refuses_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="shapes_classifier.py"):
        sc.load(tmp_path / "nope.safetensors")


def test_degradations_do_what_they_say():
    images, _ = sc.render(8, seed=5)
    x = to_tensor(images)
    zero, g = torch.zeros(8), torch.Generator().manual_seed(0)
    assert torch.equal(degrade(x, zero, zero, torch.zeros(8, 3), g), x)  # nothing asked, nothing done (8-bit exact)
    tinted = degrade(x, zero, zero, torch.full((8, 3), 0.1), g)
    flat = (x - 30 / 255).abs().amax(1, keepdim=True).expand_as(x) < 1e-6  # the flat background
    shape = (x - 30 / 255).abs().amax(1, keepdim=True).expand_as(x) > 0.2
    assert torch.allclose(tinted[flat], x[flat] + 0.1, atol=1 / 255) and torch.equal(tinted[shape], x[shape])
    blurred = degrade(x, torch.full((8,), 1.0), zero, torch.zeros(8, 3), g, quantize=False)
    assert torch.allclose(blurred.mean((1, 2, 3)), x.mean((1, 2, 3)), atol=5e-3)  # blur keeps the mean (but at edges)...
    assert (blurred - x).abs().max() > 0.1  # ...and moves edges


def test_committed_classifier_is_accurate_under_degradation_while_fid_rises():
    rows = run_check(ShapesBackend(), count=500, strengths=(0.0, 0.75, 1.0), singles=False)
    for row in rows:
        assert row["attribute_acc"] >= 0.98, row
    fid_whole = [r["fid_whole"] for r in rows]
    fid_patch = [r["fid_patch"] for r in rows]
    assert fid_whole[0] < fid_whole[1] < fid_whole[2] and fid_whole[2] > 2 * fid_whole[0], fid_whole
    assert fid_patch[0] < fid_patch[1] < fid_patch[2] and fid_patch[2] > 10 * fid_patch[0], fid_patch


def test_committed_classifier_reads_the_reference_captions():
    from eval.reference import ReferenceSet

    ref = ReferenceSet("shapes", 200)
    images, captions = next(ref.batches(200))
    scores = ShapesBackend().alignment(images, captions)
    assert scores["alignment"].mean() == 1.0 and scores["all"].mean() == 1.0
