"""bench/shapes_table.py's plumbing (the training and evaluation it drives are tested elsewhere): the shared
first stage, the commands it builds per method, and the targets it checks."""
from __future__ import annotations

import argparse
import shutil

import pytest

from bench import shapes_table
from tests.conftest import ROOT

TEACHER = ROOT / "assets" / "shapes_teacher"  # a complete export


def test_shared_stage_is_copied_once_and_a_missing_one_is_an_error(tmp_path):
    first, other = tmp_path / "lightning", tmp_path / "mse"
    with pytest.raises(FileNotFoundError, match="shared stage did not finish"):
        shapes_table.share_stage(first, other)
    shutil.copytree(TEACHER, first / "exports" / shapes_table.SHARED_STAGE)
    (other / "exports" / shapes_table.SHARED_STAGE).mkdir(parents=True)  # a half-written copy is replaced
    shapes_table.share_stage(first, other)
    copied = other / "exports" / shapes_table.SHARED_STAGE
    assert shapes_table.is_complete(copied)
    marker = copied / "kept"
    marker.write_text("")
    shapes_table.share_stage(first, other)  # complete: left alone
    assert marker.exists()


def test_every_method_trains_the_table_recipe(monkeypatch, tmp_path):
    commands = []
    monkeypatch.setattr(shapes_table, "run", commands.append)
    for method in shapes_table.OVERRIDES:
        shapes_table.train(method, tmp_path / method, tmp_path / "shards")
    for method, cmd in zip(shapes_table.OVERRIDES, commands):
        sets = [cmd[i + 1] for i, c in enumerate(cmd) if c == "--set"]
        assert "stages.0.samples=38400" in sets
        assert f"run.out_dir={tmp_path / method}" in sets
        objectives = {s for s in sets if ".objective=" in s}
        changed = {"lightning": (), "mse": (1, 2, 3, 4), "adv_cond": (1, 2, 3)}[method]
        assert objectives == {f"stages.{i}.objective={method}" for i in changed}


def _row(method, steps, fid, alignment=0.97, variant="full"):
    return {"method": method, "variant": variant, "steps": steps, "fid_whole": fid, "fid_patch": fid * 5,
            "alignment": alignment, "sec_per_image": 0.01, "model": "m"}


def test_render_checks_each_target_against_the_32_step_teacher():
    table = [_row("teacher", 32, 100.0), _row("teacher", 128, 95.0),
             _row("lightning", 4, 109.0), _row("lightning", 2, 120.0), _row("lightning", 1, 140.0, alignment=0.9),
             _row("mse", 2, 130.0), _row("mse", 1, 135.0)]
    text = shapes_table.render(table, argparse.Namespace(count=300), seconds=60)
    assert "4-step FID-Whole 1.09x the 32-step teacher's (target <= 1.1x): met" in text
    assert "1-step FID-Whole 1.40x the 32-step teacher's (target <= 1.3x): missed" in text
    assert "2 steps: full method FID-Whole 120 vs MSE-only 130: beats it" in text
    assert "1 step: full method FID-Whole 140 vs MSE-only 135: does not beat it" in text
    assert "lowest full-method alignment 0.9 = 0.93x the teacher's (target >= 0.95x): missed" in text
