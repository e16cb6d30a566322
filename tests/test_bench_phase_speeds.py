"""bench/phase_speeds.py: each phase's median samples/s from the run's real TensorBoard event files."""
import subprocess
import sys

from torch.utils.tensorboard import SummaryWriter

from bench.phase_speeds import phase_speeds
from conftest import ROOT, cli_env


def write_phase(run, phase: str, speeds: list[float]) -> None:
    writer = SummaryWriter(str(run / "jobs" / phase.split(".")[0] / phase / "tb"))
    for step, value in enumerate(speeds):
        writer.add_scalar(f"{phase}/samples_per_s", value, step)
        writer.add_scalar(f"{phase}/loss", 1.0, step)
    writer.close()


def test_median_leaves_out_the_start_up_interval(tmp_path):
    write_phase(tmp_path / "a", "stage2_8.0_adv_cond_lora", [1.0, 10.0, 12.0, 11.0])
    write_phase(tmp_path / "a", "stage3_4.0_adv_cond_lora", [2.0, 20.0, 22.0])
    write_phase(tmp_path / "b", "stage2_8.0_adv_cond_lora", [1.0, 5.5])
    assert phase_speeds(tmp_path / "a") == {"stage2_8.0_adv_cond_lora": 11.0, "stage3_4.0_adv_cond_lora": 21.0}
    assert phase_speeds(tmp_path / "a", "stage3_4") == {"stage3_4.0_adv_cond_lora": 21.0}
    proc = subprocess.run([sys.executable, "bench/phase_speeds.py", str(tmp_path / "a"), "--against", str(tmp_path / "b")],
                          cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "stage2_8.0_adv_cond_lora 11.0  (5.5; 2.00x)" in proc.stdout
    assert "stage3_4.0_adv_cond_lora 21.0\n" in proc.stdout
    empty = subprocess.run([sys.executable, "bench/phase_speeds.py", str(tmp_path / "nothing")],
                           cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert empty.returncode != 0 and "no phase logged samples_per_s" in empty.stderr
