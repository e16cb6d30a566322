"""The stage-length probe (config `probe`): the flattening rule, and a real stage-1 run that logs the curve,
keeps it in its checkpoint state, and stops where the curve has flattened."""

import numpy as np
import pytest

from conftest import latest_state, run_cli
from test_training import _stage1_from
from trainer.runtime.probe import failure_rates, flattened


@pytest.mark.parametrize("history, patience, flat", [
    ([100.0], 1, False),                       # nothing to compare with yet
    ([100.0, 80.0], 1, False),                 # still going down by more than 2%
    ([100.0, 99.0], 1, True),                  # less than 2% better than the best before
    ([100.0, 80.0, 79.0, 85.0], 2, True),      # two probes in a row without a 2% gain on 80
    ([100.0, 80.0, 79.0, 70.0], 2, False),     # the last one gained
    ([100.0, 120.0, 130.0], 3, False),         # not yet `patience` probes after a first one
])
def test_flattened(history, patience, flat):
    assert flattened(history, patience, min_improvement=0.02) is flat


@pytest.mark.parametrize("ranks", [1, 2])
def test_stage_logs_the_probe_and_stops_when_flat(smoke_run, tmp_path, ranks):
    """On 2 ranks rank 0 measures alone and both ranks stop at the same step (the run ends with equal weights)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = _stage1_from(smoke_run, tmp_path / "run")
    # min_improvement 0.99: no probe beats the one before by 99%, so the phase stops at its first probe after
    # the start (a real run would use a few percent)
    proc = run_cli(["trainer.run", "--config", "configs/smoke.yaml", "--jobs", "stage1_32", "--set", f"run.out_dir={out}",
                    "--set", "stages.0.samples=96", "--set", "probe.every_samples=32", "--set", "probe.count=16",
                    "--set", "probe.stop_when_flat=true", "--set", "probe.patience=1",
                    "--set", "probe.min_improvement=0.99", "--set", "stages.0.global_batch=16"], ranks=ranks)
    assert "[stage1_32.0_mse] probe at 0 samples: FID" in proc.stdout
    assert "has flattened: stopping at 32 of 96 samples" in proc.stdout, proc.stdout[-3000:]
    job = out / "jobs" / "stage1_32" / "stage1_32.0_mse"
    state = latest_state(job)
    assert state["done"] and state["stopped_when_flat"] == 32 and [s for s, _ in state["probe"]] == [0, 32]
    assert len(state["replica_digests"]) == ranks and len(set(state["replica_digests"])) == 1
    assert (out / "exports" / "stage1_32" / "export.json").is_file()
    teacher = np.load(out / "jobs" / "stage1_32" / "probe_teacher_features.npy")
    assert teacher.shape[0] == 16 and np.isfinite(teacher).all()

    acc = EventAccumulator(str(job / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    events = acc.Scalars("stage1_32.0_mse/probe_fid_vs_teacher")
    assert [e.step for e in events] == [0, 32]
    assert [e.value for e in events] == pytest.approx([fid for _, fid in state["probe"]], rel=1e-5)
    assert all(v > 0 for v in (e.value for e in events)) and "stage1_32.0_mse/probe_samples" in acc.Tags()["images"]
    assert (job / "grids" / "probe-000000032.png").is_file()
    # the toy's data: each probe also counts the one-shape pixel rules' failures on its images
    for rule in ("second_copy", "hollow_fill"):
        rates = acc.Scalars(f"stage1_32.0_mse/probe_{rule}")
        assert [e.step for e in rates] == [0, 32] and all(0.0 <= e.value <= 1.0 for e in rates)
    assert ", second_copy " in proc.stdout


@pytest.mark.parametrize("objects", [1, 2])
def test_failure_rates_read_the_data_s_options(objects):
    """The probe's pixel-rule rates: the one-shape rules for one shape per image, the quadrant rules for several;
    the data's own images are flagged by none, and shapes drawn a second time half an image away are second
    copies."""
    from trainer.config import ShapesDataConfig
    from trainer.data.shapes import ShapesDataset, ShapesOptions

    shapes = ShapesDataConfig(objects=objects, texture="stripes")
    data = ShapesDataset(32, seed=3, options=ShapesOptions(texture="stripes", objects=objects))
    images = np.stack([data[i].image for i in range(32)])
    captions = [data[i].caption for i in range(32)]
    rates = failure_rates(images, captions, shapes)
    expected = {"second_copy", "hollow_fill"} | ({"missing_shape", "misplaced", "wrong_colour", "scene_match"}
                                                 if objects > 1 else set())
    assert set(rates) == expected and rates["second_copy"] == rates["hollow_fill"] == 0.0
    assert objects == 1 or rates["scene_match"] == 1.0
    # the right half drawn again over the left: wherever a shape lay on the right it now has a copy apart from it
    doubled = np.maximum(images, np.concatenate([images[:, :, 16:], images[:, :, 16:]], axis=2))
    assert failure_rates(doubled, captions, shapes)["second_copy"] > 0.25
