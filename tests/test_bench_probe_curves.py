"""bench/probe_curves.py: the probe curves read back from real TensorBoard event files, the trainer's own
flatness rule replayed on them, the table and the chart written."""
import subprocess
import sys

from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from bench.probe_curves import probe_curves, stop_point
from conftest import ROOT, cli_env


def write_curve(run, phase: str, points: list[tuple[int, float]]) -> None:
    writer = SummaryWriter(str(run / "jobs" / phase.split(".")[0] / phase / "tb"))
    for samples, fid in points:
        writer.add_scalar(f"{phase}/probe_fid_vs_teacher", fid, samples)
        writer.add_scalar(f"{phase}/loss", 1.0, samples)
    writer.close()


FLATTENING = [(0, 10.0), (400, 5.0), (800, 4.0), (1200, 3.99), (1600, 3.98), (2000, 3.97), (2400, 3.96)]
FALLING = [(0, 10.0), (400, 8.0), (800, 6.0), (1200, 4.0)]


def test_curves_and_where_the_flatness_rule_stops(tmp_path):
    write_curve(tmp_path, "stage2_8.0_adv_cond_lora", FLATTENING)
    write_curve(tmp_path, "stage2_8.1_adv_uncond_lora", FALLING)
    write_curve(tmp_path, "stage3_4.0_adv_cond_lora", FALLING)
    curves = probe_curves(tmp_path)
    assert list(curves) == ["stage2_8.0_adv_cond_lora", "stage2_8.1_adv_uncond_lora", "stage3_4.0_adv_cond_lora"]
    assert [(s, round(v, 3)) for s, v in curves["stage2_8.0_adv_cond_lora"]] == FLATTENING
    # best before the last three is 4.0 (at 800); 3.99, 3.98, 3.97 each miss 2% below it: flat at 2000
    assert stop_point(curves["stage2_8.0_adv_cond_lora"], patience=3, min_improvement=0.02) == 2000
    assert stop_point(curves["stage2_8.0_adv_cond_lora"], patience=3, min_improvement=0.001) is None
    assert stop_point(curves["stage2_8.1_adv_uncond_lora"], patience=1, min_improvement=0.02) is None

    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "bench/probe_curves.py", str(tmp_path), "--out", str(out)],
                          cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| stage2_8.0_adv_cond_lora | 0: 10, 400: 5, " in proc.stdout and "| 2000 of 2400 |" in proc.stdout
    assert "| its end of 1200 |" in (out / "probe_curves.md").read_text()
    with Image.open(out / "probe_curves.png") as chart:
        assert chart.width > chart.height > 100  # two stage panels side by side
    empty = subprocess.run([sys.executable, "bench/probe_curves.py", str(tmp_path / "nothing")],
                           cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert empty.returncode != 0 and "no phase logged probe_fid_vs_teacher" in empty.stderr
