"""bench/shapes_table.py's plumbing (the training and evaluation it drives are tested elsewhere): the shared
first stage, the commands it builds per method and seed, the aggregation over seeds, the decisions by
95% intervals, and the targets it checks."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
from pathlib import Path

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
        assert not any(s.startswith("stages.0.") for s in sets)  # the main job's stage 1: it already beats its teacher
        assert f"run.out_dir={tmp_path / method}" in sets
        objectives = {s for s in sets if ".objective=" in s}
        changed = {"lightning": (), "mse": (1, 2, 3, 4), "adv_cond": (1, 2, 3)}[method]
        assert objectives == {f"stages.{i}.objective={method}" for i in changed}


def _export(folder, **manifest):
    """A tiny fake export, complete as trainer.export.is_complete sees it."""
    (folder / "unet").mkdir(parents=True, exist_ok=True)
    (folder / "unet" / "config.json").write_text("{}")
    (folder / "export.json").write_text(json.dumps(manifest))


def _fake_run(commands):
    """Stands in for shapes_table.run: the trainer makes every export its run folder lacks (as the real one
    skips finished ones), eval/fid_patch.py writes a results.json with intervals for every --label."""
    def fake(cmd):
        commands.append(cmd)
        if cmd[1:3] == ["-m", "trainer.run"]:
            sets = dict(cmd[i + 1].split("=", 1) for i, c in enumerate(cmd) if c == "--set")
            out = Path(sets["run.out_dir"])
            for name in ["stage1_32", *shapes_table.STEPS]:
                if shapes_table.is_complete(out / "exports" / name):
                    continue
                published = [name] + ([f"{name}_lora"] if not out.name.startswith("mse") and name in (
                    "stage2_8", "stage3_4", "stage4_2") else [])  # the recipe's LoRA stages (MSE-only: full)
                for export in published:
                    _export(out / "exports" / export, made_by=str(out), seed=sets.get("run.seed", "0"))
        else:
            out = Path(cmd[cmd.index("--out") + 1])
            steps = int(cmd[cmd.index("--steps") + 1])
            labels = [cmd[i + 1] for i, c in enumerate(cmd) if c == "--label"]
            rows = [{"label": label, "model": "m", "steps": steps, "count": 1000, "fid_whole": 100.0,
                     "fid_whole_ci": [90.0, 110.0], "fid_patch": 500.0, "fid_patch_ci": [450.0, 550.0],
                     "alignment": 0.97, "alignment_ci": [0.96, 0.98], "fid_whole_vs_teacher": 20.0,
                     "fid_whole_vs_teacher_ci": [18.0, 22.0], "second_copy_rate": 0.01, "hollow_fill_rate": 0.02,
                     "background_grain": 0.08, "sec_per_image": 0.01} for label in labels]
            out.mkdir(parents=True, exist_ok=True)
            command = "python eval/fid_patch.py " + " ".join(shlex.quote(a) for a in cmd[2:])  # as fid_patch.py
            (out / "results.json").write_text(json.dumps({"command": command, "rows": rows}))
    return fake


def test_main_trains_the_seeds_from_seed_0s_4_step_student_and_scores_against_the_teacher(monkeypatch, tmp_path):
    commands = []
    monkeypatch.setattr(shapes_table, "run", _fake_run(commands))
    results = tmp_path / "results"
    assert shapes_table.main(["--runs", str(tmp_path / "runs"), "--results", str(results)]) == 0
    runs = tmp_path / "runs"
    trainer = [c for c in commands if c[1:3] == ["-m", "trainer.run"]]
    sets = [[c[i + 1] for i, a in enumerate(c) if a == "--set"] for c in trainer]
    assert len(trainer) == 3 * 4  # 3 methods' chains, then 3 extra seeds each (the default seeds 0-3)
    for method in shapes_table.OVERRIDES:
        for seed in (1, 2, 3):
            out = runs / f"{method}_seed{seed}"
            s = next(s for s in sets if f"run.out_dir={out}" in s)
            assert f"run.seed={seed}" in s
            assert f"data.shards={runs / 'lightning' / 'shards'}" in s
            assert all(o in s for o in shapes_table.TABLE_OVERRIDES + shapes_table.OVERRIDES[method])
            made_by = lambda name: json.loads((out / "exports" / name / "export.json").read_text())["made_by"]
            assert made_by("stage1_32") == str(runs / "lightning")  # shared by every method
            for name in ("stage2_8", "stage3_4") + (("stage3_4_lora",) if method != "mse" else ()):
                assert made_by(name) == str(runs / method)
            for name in shapes_table.SEEDED:  # trained in the seed's own run
                assert json.loads((out / "exports" / name / "export.json").read_text()) == {
                    "made_by": str(out), "seed": str(seed)}
            assert not (out / "exports" / "stage2_8_lora").exists()
    seed0 = [s for s in sets if not any(x.startswith("run.seed=") for x in s)]
    assert len(seed0) == 3

    evals = [c for c in commands if c[1] == "eval/fid_patch.py"]
    assert [int(c[c.index("--steps") + 1]) for c in evals] == [32, 1, 2, 4, 8, 128]
    # the step counts of the method comparisons keep every image's features for the paired decisions
    assert ["--save-features" in c for c in evals] == [False, True, True, False, False, False]
    for c in evals:
        assert c[c.index("--teacher") + 1].endswith("assets/shapes_teacher")
        assert "--teacher-steps" not in c and "--teacher-guidance" not in c  # the export's own steps and guidance
        assert c[c.index("--count") + 1] == "1000"
    # one cache for every step count: the teacher is sampled once, not once per fid_patch call
    assert len({c[c.index("--teacher-cache") + 1] for c in evals}) == 1
    labels = lambda steps: [c[i + 1] for c in evals if c[c.index("--steps") + 1] == str(steps)
                            for i, a in enumerate(c) if a == "--label"]
    assert labels(4) == ["lightning/full/seed0", "lightning/lora/seed0", "mse/full/seed0", "adv_cond/full/seed0",
                         "adv_cond/lora/seed0"]
    assert sorted(labels(1)) == sorted(f"{m}/full/seed{s}" for m in shapes_table.OVERRIDES for s in (0, 1, 2, 3))
    assert "lightning/lora/seed2" in labels(2)

    saved = json.loads((results / "shapes_table.json").read_text())
    one = next(a for a in saved["aggregates"] if (a["method"], a["variant"], a["steps"]) == ("mse", "full", 1))
    assert one["seeds"] == [0, 1, 2, 3] and one["fid_whole"]["values"] == [100.0] * 4
    assert one["fid_whole_vs_teacher"]["interval"] == [18.0, 22.0] and one["fid_patch_vs_teacher"] is None
    assert {r["seed"] for r in saved["rows"] if r["steps"] == 8 and r["method"] != "teacher"} == {0}
    text = (results / "shapes_table.md").read_text()
    assert "seeds 0,1,2,3" in text and "8- and 4-step rows: seed 0 only" in text
    assert "| mse | full | 1 | 4 | 100 [90, 110] (100, 100, 100, 100) | 1.00 | 20 [18, 22] |" in text


def test_seed_runs_need_seed_0s_4_step_student(tmp_path):
    first = tmp_path / "lightning"
    for name in ("stage1_32", "stage2_8"):
        _export(first / "exports" / name)
    with pytest.raises(FileNotFoundError, match="stage3_4: the shared stage did not finish"):
        shapes_table.train_seeds("lightning", first, tmp_path, None, [0, 1])
    _export(first / "exports" / "stage3_4")  # no LoRA export (a method without one): nothing else needed
    shapes_table.copy_exports(first, tmp_path / "seed1", shapes_table.SEED_SHARED, shapes_table.SEED_OPTIONAL)
    assert sorted(p.name for p in (tmp_path / "seed1" / "exports").iterdir()) == ["stage1_32", "stage2_8", "stage3_4"]


def _seed_row(method, steps, seed, fid, ci, variant="full", **extra):
    return {"method": method, "variant": variant, "steps": steps, "seed": seed, "fid_whole": fid, "fid_whole_ci": ci,
            **extra}


def test_aggregate_takes_the_seed_mean_spread_and_the_union_of_their_intervals():
    rows = [_seed_row("mse", 1, 2, 130.0, [120.0, 140.0]), _seed_row("mse", 1, 0, 100.0, [95.0, 105.0]),
            _seed_row("mse", 1, 1, 115.0, [100.0, 125.0]), _seed_row("teacher", 32, None, 80.0, None),
            _seed_row("mse", 2, 0, 90.0, [85.0, 95.0], fid_patch=400.0)]
    table = shapes_table.aggregate(rows)
    assert [(a["method"], a["steps"]) for a in table] == [("teacher", 32), ("mse", 2), ("mse", 1)]
    one = table[2]
    assert one["seeds"] == [0, 1, 2]
    assert one["fid_whole"]["mean"] == pytest.approx(115.0)
    assert one["fid_whole"]["values"] == [100.0, 115.0, 130.0] and one["fid_whole"]["range"] == [100.0, 130.0]
    assert one["fid_whole"]["sd"] == pytest.approx(15.0)
    assert one["fid_whole"]["interval"] == [95.0, 140.0]
    assert one["fid_patch"] is None
    assert table[0]["fid_whole"]["interval"] is None  # no interval: none to compare with
    assert table[1]["fid_whole"]["interval"] == [85.0, 95.0] and table[1]["fid_whole"]["sd"] is None
    assert table[1]["fid_patch"] == {"mean": 400.0, "values": [400.0], "range": [400.0, 400.0], "sd": None,
                                     "interval": None}
    half = shapes_table.aggregate([_seed_row("mse", 1, 0, 100.0, [95.0, 105.0]), _seed_row("mse", 1, 1, 110.0, None)])
    assert half[0]["fid_whole"]["interval"] is None  # a seed without an interval: the union is unknown


def test_decide_only_where_the_intervals_do_not_overlap():
    assert shapes_table.decide([90, 100], [95, 110]) == "overlap"
    assert shapes_table.decide([90, 100], [101, 110]) == "a"
    assert shapes_table.decide([101, 110], [90, 100]) == "b"
    assert shapes_table.decide([0.95, 0.96], [0.97, 0.98], lower_is_better=False) == "b"
    assert shapes_table.decide(None, [1, 2]) == "no interval"
    text = shapes_table.comparison_text
    assert text("full method", "MSE-only", "a") == "full method beats MSE-only (decided)"
    assert text("full method", "MSE-only", "b") == "MSE-only beats full method (decided)"
    assert text("full method", "MSE-only", "overlap") == "undecided (intervals overlap)"
    assert text("full method", "MSE-only", "no interval") == "undecided (no interval)"
    # multi-seed: the union interval holds the spread, so a seed that overlaps keeps it undecided
    table = shapes_table.aggregate([_seed_row("lightning", 1, 0, 100.0, [95.0, 105.0]),
                                    _seed_row("lightning", 1, 1, 130.0, [120.0, 140.0]),
                                    _seed_row("mse", 1, 0, 150.0, [135.0, 165.0])])
    full, mse = (next(a for a in table if a["method"] == m)["fid_whole"]["interval"] for m in ("lightning", "mse"))
    assert shapes_table.decide(full, mse) == "overlap"
    assert shapes_table.wilson(0.0, 1000)[0] == 0.0 and shapes_table.wilson(0.0, 1000)[1] == pytest.approx(0.00383, abs=1e-4)


def _agg_row(method, steps, fid, ci, patch=None, patch_ci=None, alignment=0.97, align_ci=(0.96, 0.98),
             variant="full", seeds=(0,), **rates):
    rows = []
    for i, seed in enumerate(seeds):
        f = fid if not isinstance(fid, (list, tuple)) else fid[i]
        c = ci if ci is None or not isinstance(ci[0], (list, tuple)) else ci[i]
        rows.append({"method": method, "variant": variant, "steps": steps, "seed": seed, "fid_whole": f,
                     "fid_whole_ci": c and list(c), "fid_patch": patch, "fid_patch_ci": patch_ci and list(patch_ci),
                     "alignment": alignment, "alignment_ci": align_ci and list(align_ci), **rates})
    return rows


def test_render_writes_each_target_as_met_missed_or_undecided():
    rates = lambda copy, hollow, n=1000: {"second_copy_rate": copy, "hollow_fill_rate": hollow, "count": n,
                                         "second_copy_rate_ci": shapes_table.wilson(copy, n),
                                         "hollow_fill_rate_ci": shapes_table.wilson(hollow, n)}
    rows = (_agg_row("teacher", 32, 100.0, (98.0, 102.0), 600.0, (590.0, 610.0), seeds=(None,), **rates(0.01, 0.01))
            + _agg_row("lightning", 4, 109.0, (107.0, 109.5), 550.0, (540.0, 560.0), alignment=0.90, align_ci=(0.89, 0.91))
            + _agg_row("lightning", 2, 120.0, (115.0, 125.0), 450.0, (440.0, 460.0))
            + _agg_row("lightning", 1, [125.0, 135.0], [(120.0, 130.0), (128.0, 140.0)], 800.0, (780.0, 820.0),
                       seeds=(0, 1), **rates(0.05, 0.015))
            + _agg_row("mse", 2, 118.0, (110.0, 126.0), 500.0, (490.0, 510.0))
            + _agg_row("mse", 1, 180.0, (170.0, 190.0), 780.0, (770.0, 790.0))
            + _agg_row("adv_cond", 1, 150.0, None))
    text = shapes_table.render(shapes_table.aggregate(rows), argparse.Namespace(count=1000, seeds=[0, 1]), seconds=60)
    assert ("- 4-step FID-Whole <= 1.10x the 32-step teacher's: 109 [107, 110] = 1.09x (teacher 100 [98, 102]): "
            "undecided (intervals overlap)") in text
    assert ("- 1-step FID-Whole <= 1.30x the 32-step teacher's: 130 [120, 140] = 1.30x (teacher 100 [98, 102], "
            "seeds 125-135): undecided (intervals overlap)") in text
    assert "- 4-step alignment >= 0.97x the teacher's: 0.9 [0.89, 0.91] = 0.928x (teacher 0.97 [0.96, 0.98]): missed" in text
    assert ("- 2 steps, FID-Whole: full method 120 [115, 125] vs MSE-only 118 [110, 126]: undecided (intervals overlap): "
            "target undecided") in text
    assert ("- 2 steps, FID-Patch: full method 450 [440, 460] vs MSE-only 500 [490, 510]: full method beats MSE-only "
            "(decided): target met") in text
    assert ("- 1 step, FID-Whole: full method 130 [120, 140] (125, 135) vs MSE-only 180 [170, 190]: full method beats "
            "MSE-only (decided): target met") in text
    assert ("- 1 step, FID-Patch: full method 800 [780, 820] (800, 800) vs MSE-only 780 [770, 790]: undecided (intervals overlap): "
            "target undecided") in text
    assert ("- 1 step, FID-Whole: full method 130 [120, 140] (125, 135) vs conditional-only 150: undecided (no interval): "
            "target undecided") in text
    assert "- 1-step second copies <= 2x the 32-step teacher's rate: 0.05 [0.0381, 0.0653] vs teacher 0.01 [0.00544, 0.0183], seeds 0.05-0.05: missed" in text
    assert ("- 1-step hollow fills <= 2x the 32-step teacher's rate: 0.015 [0.00911, 0.0246] vs teacher 0.01 "
            "[0.00544, 0.0183], seeds 0.015-0.015: undecided (intervals overlap)") in text
    assert "- 2-step alignment >= 0.97x the teacher's: 0.97 [0.96, 0.98] = 1.000x (teacher 0.97 [0.96, 0.98]): met" in text
    assert "| lightning | full | 1 | 2 | 130 [120, 140] (125, 135) | 1.30 |" in text


def test_render_without_intervals_decides_nothing():
    rows = (_agg_row("teacher", 32, 100.0, None, align_ci=None, seeds=(None,))
            + _agg_row("lightning", 4, 105.0, None, align_ci=None) + _agg_row("lightning", 2, 90.0, None, align_ci=None)
            + _agg_row("mse", 2, 130.0, None, align_ci=None))
    text = shapes_table.render(shapes_table.aggregate(rows), argparse.Namespace(count=300, seeds=[0]), seconds=60)
    assert "- 4-step FID-Whole <= 1.10x the 32-step teacher's: 105 = 1.05x (teacher 100): undecided (no interval)" in text
    assert "full method 90 vs MSE-only 130: undecided (no interval): target undecided" in text
    targets = text.split("Targets")[1]
    assert ": met" not in targets and ": missed" not in targets and "(decided)" not in targets


def test_evaluation_resumes_and_rescores_only_what_changed(monkeypatch, tmp_path):
    commands = []
    monkeypatch.setattr(shapes_table, "run", _fake_run(commands))
    argv = ["--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results"), "--seeds", "0"]
    assert shapes_table.main(argv) == 0
    steps_scored = lambda: [int(c[c.index("--steps") + 1]) for c in commands if c[1] == "eval/fid_patch.py"]
    assert steps_scored() == [32, 1, 2, 4, 8, 128]
    commands.clear()
    assert shapes_table.main(argv) == 0  # nothing new: every step count's results are reused
    assert steps_scored() == []
    one_step = tmp_path / "runs" / "mse" / "exports" / "stage5_1" / "export.json"
    earlier = one_step.stat().st_mtime - 10
    os.utime(tmp_path / "results" / "shapes_table_eval" / "steps1" / "results.json", (earlier, earlier))
    # as if the 1-step students were retrained after they were scored
    assert shapes_table.main(argv + ["--count", "1000"]) == 0
    assert steps_scored() == [1]
    assert shapes_table.main(argv + ["--count", "500"]) == 0  # another row list: everything again
    assert steps_scored() == [1, 32, 1, 2, 4, 8, 128]


def test_paired_decision_needs_every_seed_pair_beyond_the_images_noise():
    import numpy as np

    rng = np.random.default_rng(0)
    noise = rng.normal(0, 1.0, size=(400, 1))  # what every row shares on one draw of the prompts: cancels in a difference
    resampled = lambda points: np.asarray(points)[None, :] + noise + rng.normal(0, 0.2, size=(400, len(points)))
    a, b = [10.0, 11.0, 10.5], [13.0, 12.5, 14.0]
    p = shapes_table.decide_paired(a, b, resampled(a), resampled(b))
    assert p["outcome"] == "a" and p["pairs_for_a"] == 9 and p["pairs_for_b"] == 0 and p["resamples"] == 400
    assert p["difference"] == pytest.approx(10.5 - 13.1667, abs=1e-3)
    lo, hi = p["difference_ci"]
    # the shared noise cancels: the interval is the pairs' own noise, far narrower than either row's spread (+-2)
    assert lo < p["difference"] < hi < 0 and hi - lo < 1.0
    assert shapes_table.decide_paired(b, a, resampled(b), resampled(a))["outcome"] == "b"
    # one seed of a no better than one seed of b: undecided, however far apart the means
    a2 = [10.0, 11.0, 13.0]
    p = shapes_table.decide_paired(a2, b, resampled(a2), resampled(b))
    assert p["outcome"] == "undecided" and 0 < p["pairs_for_a"] < 9
    text = shapes_table.paired_text("full method", "MSE-only", p)
    assert text.startswith(f"undecided (paired: {p['pairs_for_a']} of 9 seed pairs favour full method")
    assert "Welch's t-interval over the seeds" in text


def test_welch_interval_of_the_seeds_mean_difference():
    from scipy import stats

    a, b = [8.0, 10.5, 9.6, 8.3], [15.0, 13.9, 14.3, 11.6]
    lo, hi = shapes_table.welch_interval(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (lo, hi) == pytest.approx((ref.low, ref.high)) and hi < 0
    # one far seed widens it past 0: undecided however far the means
    lo, hi = shapes_table.welch_interval([8.0, 10.5, 9.6, 8.3], [9.7, 17.0, 10.6, 9.6])
    assert lo < 0 < hi
    assert shapes_table.welch_interval([8.0], b) is None


def _write_paired_eval(folder, rows_by_label, reference):
    """A steps<N> folder as eval/fid_patch.py --save-features leaves it: results.json rows and features.npz.
    rows_by_label: {label: features}, or a list of (label, steps, features) for rows that name their steps."""
    import numpy as np

    from eval.fid import FeatureStats, fid_of_stats

    folder.mkdir(parents=True)
    arrays, rows = {"reference.whole": reference, "reference.patch": reference}, []
    entries = [(label, None, feats) for label, feats in rows_by_label.items()] if isinstance(rows_by_label, dict) \
        else rows_by_label
    for i, (label, n, feats) in enumerate(entries):
        arrays[f"row{i}.whole"] = arrays[f"row{i}.patch"] = feats
        fid = fid_of_stats(FeatureStats.of(feats.astype(np.float64)), FeatureStats.of(reference.astype(np.float64)))
        rows.append({"label": label, "fid_whole": fid, "fid_patch": fid, **({} if n is None else {"steps": n})})
    np.savez(folder / "features.npz", **arrays)
    (folder / "results.json").write_text(json.dumps({"rows": rows}))


def test_paired_comparisons_read_the_saved_features_and_rank_the_methods(tmp_path):
    import numpy as np

    from eval.scoring import paired_fid_resamples

    rng = np.random.default_rng(1)
    reference = rng.normal(size=(300, 4)).astype(np.float32)
    near = lambda: (reference + rng.normal(0, 0.3, size=reference.shape)).astype(np.float32)
    far = lambda: (reference + 0.8 + rng.normal(0, 0.3, size=reference.shape)).astype(np.float32)
    labels = {f"{m}/full/seed{s}": (m, "full", s) for m in ("lightning", "mse", "adv_cond") for s in (0, 1)}
    _write_paired_eval(tmp_path / "steps1", {"lightning/full/seed0": near(), "mse/full/seed0": far(),
                                             "lightning/full/seed1": near(), "mse/full/seed1": far(),
                                             "adv_cond/full/seed0": near(), "adv_cond/full/seed1": near()},
                       reference)
    paired = shapes_table.paired_comparisons(tmp_path, labels, resamples=50)
    assert set(paired) == {"1/mse/fid_whole", "1/mse/fid_patch", "1/adv_cond/fid_whole"}  # no steps2 folder
    assert paired["1/mse/fid_whole"]["outcome"] == "a" and len(paired["1/mse/fid_whole"]["pairs"]) == 4
    assert paired["1/adv_cond/fid_whole"]["outcome"] == "undecided"  # the same distribution
    rows = json.loads((tmp_path / "steps1" / "results.json").read_text())["rows"]
    point = lambda m: np.mean([r["fid_whole"] for r in rows if r["label"].startswith(m)])
    assert paired["1/mse/fid_whole"]["difference"] == pytest.approx(point("lightning") - point("mse"))
    # the targets name the paired outcome and the union rule beside it
    table = shapes_table.aggregate([_seed_row(m, 1, s, r["fid_whole"], [0.0, 10.0])
                                    for r in rows for m, _, s in [labels[r["label"]]]]
                                   + _agg_row("teacher", 32, 1.0, (0.5, 1.5), seeds=(None,)))
    lines = "\n".join(shapes_table.targets(table, paired))
    assert "full method beats MSE-only (decided, paired: all 4 seed pairs; mean difference" in lines
    assert "union intervals: overlap: target met" in lines
    with pytest.raises(ValueError, match="one row per prompt"):
        paired_fid_resamples([reference[:10]], reference, 5, rng)


def test_bench_paired_compares_every_setting_with_the_baseline(tmp_path, capsys):
    import numpy as np

    from bench import paired

    rng = np.random.default_rng(2)
    reference = rng.normal(size=(300, 4)).astype(np.float32)
    jitter = lambda shift: (reference + shift + rng.normal(0, 0.3, size=reference.shape)).astype(np.float32)
    _write_paired_eval(tmp_path / "eval", {"table/seed0": jitter(0.8), "table/seed1": jitter(0.8), "better/seed0": jitter(0.0),
                                  "better/seed1": jitter(0.0), "same/seed0": jitter(0.8), "same/seed1": jitter(0.8)},
                       reference)
    assert paired.main([str(tmp_path / "eval"), "--baseline", "table", "--resamples", "50"]) == 0
    saved = json.loads((tmp_path / "eval" / "paired.json").read_text())["settings"]
    assert set(saved) == {"better", "same"} and saved["better"]["fid_whole"]["outcome"] == "a"
    assert saved["same"]["fid_whole"]["outcome"] == "undecided"
    assert "better better (decided)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no rows labelled nothing/seed"):
        paired.compare(tmp_path / "eval", "nothing")


def test_bench_paired_compares_at_the_same_step_count(tmp_path, capsys):
    """One eval of several stages' exports under the same labels: each setting meets the baseline at its own
    step count (pooled over steps, `other` would be better at 2 steps by its 1-step rows)."""
    import numpy as np

    from bench import paired

    rng = np.random.default_rng(3)
    reference = rng.normal(size=(300, 4)).astype(np.float32)
    jitter = lambda shift: (reference + shift + rng.normal(0, 0.3, size=reference.shape)).astype(np.float32)
    rows = [(f"{name}/seed{s}", n, jitter(shift)) for name, n, shift in
            (("table", 1, 0.8), ("other", 1, 0.0), ("table", 2, 0.0), ("other", 2, 0.8)) for s in (0, 1)]
    _write_paired_eval(tmp_path / "eval", rows, reference)
    assert paired.main([str(tmp_path / "eval"), "--baseline", "table", "--resamples", "50"]) == 0
    saved = json.loads((tmp_path / "eval" / "paired.json").read_text())["settings"]
    assert set(saved) == {"other@1", "other@2"}
    assert saved["other@1"]["fid_whole"]["outcome"] == "a" and saved["other@2"]["fid_whole"]["outcome"] == "b"
    assert len(saved["other@1"]["fid_whole"]["pairs"]) == 4
    out = capsys.readouterr().out
    assert "baseline table@1" in out and "table better (decided)" in out
