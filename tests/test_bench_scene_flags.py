"""bench/scene_flags.py on the smoke progression's exports: it samples both models on several-shape prompts,
draws the flagged images in rule rows, and its rates are the quadrant rules' on those samples."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from bench import scene_flags
from eval.pixel_scores import sample_prompts
from eval.reference import ReferenceSet
from eval.scene_scores import SIGNATURES, scene_signatures
from trainer.data.shapes import ShapesOptions


def test_it_shows_what_each_rule_flags_and_prints_the_rates(smoke_run, tmp_path, capsys):
    model, teacher = smoke_run / "exports" / "stage5_1", smoke_run / "exports" / "teacher"
    out = tmp_path / "flags.png"
    assert scene_flags.main(["--model", str(model), "--teacher", str(teacher), "--objects", "2", "--count", "12",
                             "--per-rule", "3", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["model"]) == set(SIGNATURES) == set(printed["teacher"])
    prompts = ReferenceSet("shapes", 12, options=ShapesOptions(objects=2)).prompts
    expected = scene_signatures(sample_prompts(model, prompts, batch_size=5), prompts)
    assert printed["model"] == {rule: pytest.approx(float(found.mean())) for rule, found in expected.items()}
    shown = sum(min(3, int(found.sum())) > 0 for found in expected.values())  # rules that flag any image
    assert Image.open(out).height == 2 * shown * (64 + 2) + 2
    assert np.asarray(Image.open(out)).std() > 0


def test_it_refuses_one_shape_data(smoke_run, tmp_path):
    with pytest.raises(SystemExit, match="--objects"):
        scene_flags.main(["--model", str(smoke_run / "exports" / "teacher"), "--teacher",
                          str(smoke_run / "exports" / "teacher"), "--objects", "1", "--out", str(tmp_path / "f.png")])
