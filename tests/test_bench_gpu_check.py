"""Part (a) of the one-shot GPU check, on this CPU: configs/sdxl.yaml (every stage and phase) on a tiny
random SDXL through `python -m trainer.run`, preempted twice (once in a phase that keeps an EMA) and resumed,
ending with all five exports. The same script runs on NCCL on the GPU machine."""
import json
import subprocess
import sys

from conftest import ROOT, cli_env


def test_tiny_sdxl_recipe_survives_preemptions_and_exports(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu" / "tiny_sdxl_check.py"), str(tmp_path / "out"),
                           str(tmp_path / "work")], cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=900)
    result = json.loads((tmp_path / "out" / "tiny_sdxl.json").read_text())
    failed = [c for c in result["checks"] if not c["ok"]]
    assert proc.returncode == 0 and result["ok"] and not failed, (failed, proc.stdout[-3000:], proc.stderr[-3000:])
    assert len(result["preemptions"]) == 2 and len(result["exports"]) == 5
