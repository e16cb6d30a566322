"""The committed toy teacher (assets/shapes_teacher) is made by the recipe's own command,
`python -m trainer.run --config configs/shapes.yaml --set teacher.init= --jobs teacher`; the same command at a
small scale (fewer samples, a smaller dataset) must run and export a teacher like the committed one."""
import json

import numpy as np
from safetensors.torch import load_file

from conftest import ROOT, latest_state, run_cli


def test_the_recipes_teacher_command_at_small_scale(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(["trainer.run", "--config", "configs/shapes.yaml", "--set", "teacher.init=", "--jobs", "teacher",
                    "--set", f"run.out_dir={out}", "--set", "teacher.samples=320", "--set", "teacher.optim.warmup_steps=2",
                    "--set", "data.shapes.count=640", "--set", "data.shapes.samples_per_shard=160"])
    export = out / "exports" / "teacher"
    manifest = json.loads((export / "export.json").read_text())
    committed = json.loads((ROOT / "assets" / "shapes_teacher" / "export.json").read_text())
    for key in ("steps", "guidance", "prediction_type", "timestep_spacing"):
        assert manifest[key] == committed[key], key
    trained = load_file(str(export / "unet" / "diffusion_pytorch_model.safetensors"))
    reference = load_file(str(ROOT / "assets" / "shapes_teacher" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert trained.keys() == reference.keys()
    assert all(trained[k].shape == reference[k].shape and trained[k].dtype == reference[k].dtype for k in trained)
    assert all(np.isfinite(t.float().numpy()).all() for t in trained.values())
    state = latest_state(out / "jobs" / "teacher")
    assert state["done"] and state["samples_seen"] == 320
    assert (out / "grids" / "progression.png").is_file() and "teacher" in proc.stdout
