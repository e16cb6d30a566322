"""bench/landing_gap.py on the smoke progression: the landing gap per adversarial stage, and D's accuracy."""
from __future__ import annotations

import json
import math

from bench import landing_gap
from trainer.config import load_config
from trainer.method.schedule import NoiseSchedule


def test_a_model_against_itself_with_one_move_each_lands_exactly(smoke_run):
    cfg = load_config(smoke_run / "config.yaml", check_paths=False)
    latents, cond = landing_gap.shard_samples(smoke_run / "shards", 4)
    model = smoke_run / "exports" / "stage1_32"
    gaps = landing_gap.landing_gaps(model, model, NoiseSchedule.from_config(cfg.schedule), latents, cond,
                                    student_steps=4, teacher_steps=4, fallback_pred=cfg.model.prediction_type)
    assert list(gaps) == [999, 749, 499, 249]
    assert all(g < 1e-5 for g in gaps.values()), gaps
    # and two moves of the same model land elsewhere than one: the gap is what a stage has to close
    two = landing_gap.landing_gaps(model, model, NoiseSchedule.from_config(cfg.schedule), latents, cond,
                                   student_steps=2, teacher_steps=4, fallback_pred=cfg.model.prediction_type)
    assert all(g > 1e-4 for g in two.values()), two


def test_report_of_the_smoke_progression(smoke_run, tmp_path):
    out = tmp_path / "gap.md"
    result = landing_gap.main(["--run", str(smoke_run), "--count", "4", "--out", str(out)])
    stages = {s["stage"]: s for s in result["stages"]}
    assert sorted(stages) == ["stage2_8", "stage5_1"]  # the adversarial stages; stage 1 is MSE
    assert list(stages["stage2_8"]["before"]) == [999, 874, 749, 624, 499, 374, 249, 124]
    for s in stages.values():
        for gaps in (s["before"], s["after"]):
            assert all(math.isfinite(g) and g > 0 for g in gaps.values())
        # every adversarial phase of the stage logged D's accuracy
        assert s["disc"] and all(0.0 <= d["first"] <= 1.0 and 0.0 <= d["last"] <= 1.0 for d in s["disc"])
    assert [d["phase"] for d in stages["stage2_8"]["disc"]] == [
        "stage2_8.0_adv_cond_lora", "stage2_8.1_adv_uncond_lora", "stage2_8.2_adv_uncond"]
    assert "| stage2_8 | 4 -> 1 | 999 |" in out.read_text()
    assert json.loads(out.with_suffix(".json").read_text())["count"] == 4


def test_curvature_of_a_model_against_its_own_half_moves(smoke_run, tmp_path):
    out = tmp_path / "curvature.md"
    result = landing_gap.main(["--run", str(smoke_run), "--count", "4", "--curvature",
                               str(smoke_run / "exports" / "teacher"), "--out", str(out)])
    assert list(result["steps"]) == [8, 4, 2, 1]
    assert result["named_position"] == 4  # the smoke data names every position
    for row in result["steps"].values():
        assert math.isfinite(row["all"]) and row["all"] > 0
        assert row["position named"] == row["all"] and row["position left out"] is None
        assert math.isfinite(row["all x0_rms"]) and row["all x0_rms"] > 0
    assert "| 1 |" in out.read_text()
