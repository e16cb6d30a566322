"""eval/fid_patch.py end to end, in-process: both backends, toy and SDXL-layout models, LoRA, all outputs
(JSON, markdown, grid, plot, TensorBoard), and fixed seeds that do not depend on the batch size."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval import fid_patch
from eval.generate import ExportSampler
from tests.eval_helpers import random_inception_file, tiny_clip_folder
from trainer.config import ScheduleConfig
from trainer.data.encoders import create_toy_encoders
from trainer.testing import make_tiny_sdxl_folder
from trainer.export import export_unet
from trainer.method.lora import add_lora, merge_lora, save_lora
from trainer.method.models import build_toy_unet
from trainer.data.shapes import ShapesDataset, ShapesOptions


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_toy")
    base = create_toy_encoders(root / "base")
    unet = build_toy_unet(seed=0)
    teacher = export_unet(unet.state_dict(), dict(unet.config), root / "teacher", base_dir=base,
                          schedule=ScheduleConfig(), prediction_type="v_prediction", steps=4, guidance=3.0,
                          stage="teacher")
    lora_unet = add_lora(copy.deepcopy(unet), rank=2, alpha=4)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for name, p in sorted(lora_unet.named_parameters()):
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    lora_file = save_lora(lora_unet, root / "lora_tmp" / "pytorch_lora_weights.safetensors")
    merged = merge_lora(lora_unet)

    def write_lora(tmp: Path) -> None:
        (tmp / "lora").mkdir()
        shutil.copy(lora_file, tmp / "lora" / lora_file.name)

    student = export_unet(merged.state_dict(), dict(merged.config), root / "stage_lora", base_dir=base,
                          schedule=ScheduleConfig(), prediction_type="v_prediction", steps=2, stage="stage2_2",
                          extra=write_lora)
    return {"teacher": teacher, "lora_export": student, "lora": student / "lora" / "pytorch_lora_weights.safetensors"}


def test_fixed_seeds_do_not_depend_on_the_batch_size_and_lora_equals_the_merged_export(toy):
    captions = [ShapesDataset(6, seed=1)[i].caption for i in range(6)]
    sampler = ExportSampler(toy["teacher"])
    assert (sampler.default_steps, sampler.default_guidance, sampler.prediction_type) == (4, 3.0, "v_prediction")
    whole = sampler.sample(captions, range(6), steps=2, guidance=3.0, seed=5)
    parts = np.concatenate([sampler.sample(captions[:4], range(4), 2, 3.0, 5), sampler.sample(captions[4:], [4, 5], 2, 3.0, 5)])
    assert whole.shape == (6, 32, 32, 3) and whole.dtype == np.uint8
    assert np.abs(whole.astype(int) - parts.astype(int)).max() <= 1  # the same noise; float round-off aside
    assert not np.array_equal(whole, sampler.sample(captions, range(6), 2, 3.0, seed=6))

    with_lora = ExportSampler(toy["teacher"], lora=toy["lora"]).sample(captions, range(6), 2, 1.0, 0)
    merged = ExportSampler(toy["lora_export"]).sample(captions, range(6), 2, 1.0, 0)
    assert np.abs(with_lora.astype(int) - merged.astype(int)).max() <= 1
    # a LoRA export folder on the base: the LoRA loaded by diffusers, the export's own steps and guidance
    on_base = ExportSampler(toy["teacher"], lora=toy["lora_export"])
    assert (on_base.default_steps, on_base.default_guidance, on_base.lora_export) == (2, 1.0, toy["lora_export"])
    assert np.array_equal(on_base.sample(captions, range(6), 2, 1.0, 0), with_lora)


def test_shapes_backend_end_to_end(toy, tmp_path):
    out = tmp_path / "eval"
    assert fid_patch.main(["--model", str(toy["teacher"]), "--model", str(toy["teacher"]), "--lora", "none",
                           "--lora", str(toy["lora"]), "--label", "teacher", "--label", "teacher+lora",
                           "--guidance", "3", "--guidance", "1",
                           "--steps", "1", "2", "--reference", "shapes", "--backend", "shapes", "--count", "12",
                           "--batch-size", "8", "--grid-count", "4", "--out", str(out), "--update-model-card"]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert [(r["label"], r["steps"]) for r in rows] == [("teacher", 1), ("teacher", 2), ("teacher+lora", 1), ("teacher+lora", 2)]
    for r in rows:
        assert {"fid_whole", "fid_patch", "alignment", "sec_per_image", "guidance", "prediction_type"} <= set(r)
        assert np.isfinite(r["fid_whole"]) and np.isfinite(r["fid_patch"]) and 0 <= r["alignment"] <= 1
        assert r["guidance"] == (3.0 if r["label"] == "teacher" else 1.0) and r["sec_per_image"] > 0
        assert set(r["alignment_detail"]) == {"shape", "colour", "position", "all"}
        assert 0 <= r["second_copy_rate"] <= 1 and 0 <= r["hollow_fill_rate"] <= 1
    assert rows[2]["lora"] == str(toy["lora"]) and rows[0]["lora"] is None
    assert results["reference_alignment"] == 1.0 and results["floor"]["fid_whole"] >= 0
    assert rows[0]["fid_whole"] > results["floor"]["fid_whole"]  # a random UNet is worse than real images

    md = (out / "results.md").read_text()
    assert "| teacher+lora | 2 | 1.00 |" in md and "FID-Patch" in md and "attribute accuracy" in md
    assert "second copy | hollow fill |" in md
    grid = Image.open(out / "grid.png")
    assert grid.height > 5 * 32  # reference + 4 rows
    assert Image.open(out / "fid_vs_steps.png").width > 600
    assert "## Evaluation" in (toy["teacher"] / "README.md").read_text()
    lora_card = (toy["lora_export"] / "README.md").read_text()  # the LoRA rows go to the LoRA export's card
    assert "## Evaluation" in lora_card and "| teacher+lora | 2 |" in lora_card and "| teacher | 2 |" not in lora_card
    scores = json.loads((toy["lora_export"] / "export.json").read_text())["scores"]
    assert [(e["steps"], e["lora"]) for e in scores] == [(1, str(toy["lora"])), (2, str(toy["lora"]))]
    assert scores[1]["fid_whole"] == pytest.approx(rows[3]["fid_whole"]) and scores[1]["reference"] == "shapes"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "eval/comparison_grid" in tags["images"]
    assert {"eval/fid_whole/teacher", "eval/fid_patch/teacher+lora", "eval/alignment/teacher"} <= set(tags["scalars"])
    events = acc.Scalars("eval/fid_whole/teacher")
    assert [e.step for e in events] == [1, 2]
    assert events[0].value == pytest.approx(rows[0]["fid_whole"], rel=1e-5)


def test_fid_against_the_teachers_own_samples_and_background_grain(toy, tmp_path):
    out = tmp_path / "eval"
    assert fid_patch.main(["--model", str(toy["teacher"]), "--model", str(toy["lora_export"]), "--label", "teacher",
                           "--label", "student", "--guidance", "3", "--guidance", "1", "--steps", "2",
                           "--teacher", str(toy["teacher"]), "--teacher-steps", "2", "--teacher-guidance", "3",
                           "--reference", "shapes", "--count", "10", "--batch-size", "5", "--bootstrap", "20",
                           "--out", str(out), "--no-tensorboard", "--save-features"]) == 0
    results = json.loads((out / "results.json").read_text())
    teacher, student = results["rows"]
    reference = results["teacher_reference"]
    assert {k: reference[k] for k in ("model", "steps", "guidance")} == {"model": str(toy["teacher"]), "steps": 2,
                                                                         "guidance": 3.0}
    # the teacher's own failure rates and grain, the same as its row's (same prompts, noise, steps and guidance)
    for key in ("second_copy_rate", "hollow_fill_rate", "background_grain"):
        assert reference[key] == pytest.approx(teacher[key])
    # the teacher's row is the teacher reference itself (same prompts, same noise): FID 0; the student is not
    assert teacher["fid_whole_vs_teacher"] == pytest.approx(0, abs=1e-3)
    assert student["fid_whole_vs_teacher"] > 1 and len(student["fid_whole_vs_teacher_ci"]) == 2
    assert student["fid_whole_vs_teacher"] != pytest.approx(student["fid_whole"])
    # background grain: a random UNet's backgrounds are far from the real images' flat ones
    assert student["background_grain"] > 2 * results["reference_background_grain"] >= 0
    md = (out / "results.md").read_text()
    assert "| FID-Whole vs teacher | FID-Patch vs teacher |" in md and "background std /255" in md
    # --save-features: the per-image features the FIDs were computed from, in prompt order
    from eval.fid import FeatureStats, fid_of_stats

    saved = np.load(out / "features.npz")
    assert saved["row1.whole"].shape == (10, 128) and saved["reference.patch"].shape == (10, 128)
    fid = lambda a, b: fid_of_stats(FeatureStats.of(saved[a].astype(np.float64)), FeatureStats.of(saved[b].astype(np.float64)))
    assert fid("row1.whole", "reference.whole") == pytest.approx(student["fid_whole"], rel=1e-3)
    assert fid("row1.patch", "teacher.patch") == pytest.approx(student["fid_patch_vs_teacher"], rel=1e-3)
    assert saved["row0.alignment"].mean() == pytest.approx(teacher["alignment"], abs=1e-6)
    assert "own samples of the same prompts and noise (2 steps, guidance 3.0)" in md


def test_teacher_cache_samples_the_teacher_once_and_misses_on_a_changed_setting(toy, tmp_path, monkeypatch):
    calls = []
    real_sample = ExportSampler.sample
    monkeypatch.setattr(ExportSampler, "sample", lambda self, *a, **k: calls.append(self.model_dir) or real_sample(self, *a, **k))

    def run(out: str, teacher_guidance: str) -> dict:
        assert fid_patch.main(["--model", str(toy["lora_export"]), "--steps", "1", "--teacher", str(toy["teacher"]),
                               "--teacher-steps", "2", "--teacher-guidance", teacher_guidance, "--teacher-cache",
                               str(tmp_path / "cache"), "--reference", "shapes", "--count", "8", "--batch-size", "4",
                               "--bootstrap", "0", "--out", str(tmp_path / out), "--no-tensorboard"]) == 0
        return json.loads((tmp_path / out / "results.json").read_text())["rows"][0]

    first = run("a", "3")
    assert calls.count(toy["teacher"]) == 2 and len(list((tmp_path / "cache").glob("samples_*.npz"))) == 1
    calls.clear()
    second = run("b", "3")  # the same teacher setting: replayed, and the scores are the same
    assert toy["teacher"] not in calls and calls.count(toy["lora_export"]) == 2
    assert second["fid_whole_vs_teacher"] == first["fid_whole_vs_teacher"]
    assert second["fid_patch_vs_teacher"] == first["fid_patch_vs_teacher"]
    calls.clear()
    run("c", "1")  # another guidance is another entry
    assert calls.count(toy["teacher"]) == 2 and len(list((tmp_path / "cache").glob("samples_*.npz"))) == 2
    (toy["teacher"] / "export.json").touch()  # a changed (retrained) teacher misses the cache
    calls.clear()
    run("d", "3")
    assert calls.count(toy["teacher"]) == 2


def test_position_free_prompts_get_their_own_failure_rates(toy, tmp_path):
    out = tmp_path / "eval"
    assert fid_patch.main(["--model", str(toy["teacher"]), "--steps", "1", "--reference", "shapes",
                           "--position-in-caption", "0.5", "--count", "16", "--bootstrap", "0",
                           "--out", str(out), "--no-tensorboard"]) == 0
    results = json.loads((out / "results.json").read_text())
    row = results["rows"][0]
    half = ShapesDataset(16, seed=10_000, options=ShapesOptions(position_in_caption=0.5))
    free = sum(" at " not in half[i].caption for i in range(16))
    assert 0 < free < 16 and row["position_free_count"] == free
    assert 0 <= row["second_copy_rate_position_free"] <= 1 and 0 <= row["hollow_fill_rate_position_free"] <= 1
    assert results["reference_alignment"] == 1.0  # real images meet captions with and without positions
    assert "second copy, position-free prompts" in (out / "results.md").read_text()


def test_a_several_object_reference_is_scored_quadrant_by_quadrant(toy, tmp_path):
    """--objects 2 draws the reference (and its floor) with two shapes per image; the shapes classifier's
    alignment (one shape) is left out rather than misread, the failure counts come from the quadrant rules."""
    out = tmp_path / "eval"
    assert fid_patch.main(["--model", str(toy["teacher"]), "--steps", "1", "--reference", "shapes", "--objects", "2",
                           "--position-in-caption", "0.5", "--count", "12", "--bootstrap", "0", "--out", str(out),
                           "--no-tensorboard"]) == 0
    results = json.loads((out / "results.json").read_text())
    row = results["rows"][0]
    assert np.isfinite(row["fid_whole"]) and np.isfinite(results["floor"]["fid_whole"])
    assert row["alignment"] is None and results["reference_alignment"] is None
    for key in ("second_copy", "hollow_fill", "missing_shape", "misplaced", "wrong_colour", "scene_match"):
        assert 0 <= row[f"{key}_rate"] <= 1 and 0 <= row[f"{key}_rate_position_free"] <= 1
    # a one-step sample of the toy teacher is noise, not two shapes where the caption puts them
    assert row["scene_match_rate"] < 0.5
    assert 0 <= results["reference_background_grain"] < row["background_grain"]  # edges only vs noise
    assert results["reference_options"] == {"position_in_caption": 0.5, "texture": "none", "dots": 0, "objects": 2}
    assert "scene as captioned" in (out / "results.md").read_text()


def test_inception_backend_end_to_end_on_an_sdxl_folder(tmp_path):
    model = make_tiny_sdxl_folder(tmp_path / "tiny-sdxl")
    ref = tmp_path / "ref"
    ref.mkdir()
    for i in range(4):  # a folder of images with name.txt captions
        item = ShapesDataset(4, seed=3, resolution=64)[i]
        Image.fromarray(item.image).save(ref / f"{i:03d}.png")
        (ref / f"{i:03d}.txt").write_text(item.caption)
    out = tmp_path / "eval"
    assert fid_patch.main(["--model", str(model), "--steps", "1", "--guidance", "1", "--reference", str(ref),
                           "--backend", "inception", "--inception", str(random_inception_file(tmp_path / "inc.pth")),
                           "--inception-dims", "64", "--clip", str(tiny_clip_folder(tmp_path / "clip")),
                           "--count", "4", "--batch-size", "2", "--out", str(out), "--no-tensorboard"]) == 0
    results = json.loads((out / "results.json").read_text())
    (row,) = results["rows"]
    assert row["steps"] == 1 and row["prediction_type"] == "epsilon" and np.isfinite(row["fid_whole"])
    assert row["fid_patch"] is None  # 64 px images, 299 px extractor input: no patch
    assert 0 <= row["alignment"] <= 100 and results["alignment_name"] == "CLIP score"
    assert "| n/a |" in (out / "results.md").read_text()
    assert not (out / "tb").exists()


def test_cli_refuses_mismatched_lora_and_label_counts(toy, tmp_path):
    for extra in (["--lora", "none", "--lora", "none"], ["--label", "a", "--label", "b"],
                  ["--guidance", "1", "--guidance", "2"], ["--save-features", "--bootstrap", "0"]):
        with pytest.raises(SystemExit):
            fid_patch.main(["--model", str(toy["teacher"]), "--model", str(toy["teacher"]), "--model", str(toy["teacher"]),
                            "--reference", "shapes", "--out", str(tmp_path), *extra])
