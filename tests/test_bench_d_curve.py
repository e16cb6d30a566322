"""bench/d_curve.py: D's accuracy read back from a run's TensorBoard events and averaged over windows."""
from __future__ import annotations

import pytest
from torch.utils.tensorboard import SummaryWriter

from bench import d_curve


def _phase(run, phase: str, points: list[tuple[int, float, float]]) -> None:
    writer = SummaryWriter(str(run / "jobs" / phase.split(".")[0] / phase / "tb"))
    for step, real, fake in points:
        writer.add_scalar(f"{phase}/d_acc_real", real, step)
        writer.add_scalar(f"{phase}/d_acc_fake", fake, step)
    writer.close()


def test_windows_average_real_and_fake_over_the_steps_they_hold(tmp_path):
    _phase(tmp_path, "stage2_8.0_adv_cond_lora", [(160, 0.5, 0.5), (320, 0.6, 0.4), (480, 0.9, 0.7),
                                                  (640, 0.8, 0.6), (800, 1.0, 1.0)])
    _phase(tmp_path, "stage2_8.1_adv_uncond_lora", [(160, 0.0, 0.2)])  # the second phase, read when asked
    curve = d_curve.accuracy_curve(tmp_path, "stage2_8")
    assert [step for step, _ in curve] == [160, 320, 480, 640, 800]
    assert [acc for _, acc in curve] == pytest.approx([0.5, 0.5, 0.8, 0.7, 1.0])
    assert d_curve.windowed(curve, 320) == pytest.approx({320: 0.5, 640: 0.75, 960: 1.0})
    table = d_curve.render({"a": d_curve.windowed(curve, 320)}, "stage2_8", 320)
    assert "| 320-640 | 0.750 |" in table
    assert d_curve.accuracy_curve(tmp_path, "stage2_8", phase_index=1) == [(160, pytest.approx(0.1))]
    with pytest.raises(ValueError, match="2 phases"):
        d_curve.accuracy_curve(tmp_path, "stage2_8", phase_index=2)


def test_a_stage_without_d_accuracy_is_an_error_naming_the_run(tmp_path):
    with pytest.raises(ValueError, match="no phase of stage2_8"):
        d_curve.accuracy_curve(tmp_path, "stage2_8")
