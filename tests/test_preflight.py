"""Nothing starts, or is queued, that would fail on its inputs: one line per problem, naming key and path."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trainer.config import load_config
from trainer.testing import make_tiny_sdxl_folder
from trainer.runtime.preflight import problems
from trainer.data.shards import ShardWriter

from conftest import ROOT, cli_env


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory) -> Path:
    return make_tiny_sdxl_folder(tmp_path_factory.mktemp("tiny_sdxl"), seed=0)


def write_shards(folder: Path, channels: int = 4, shards: int = 2) -> Path:
    with ShardWriter(folder, samples_per_shard=2) as writer:
        for i in range(2 * shards):
            writer.write(f"s{i}", np.zeros((channels, 8, 8), np.float32), np.zeros((77, 96), np.float32),
                         np.zeros(64, np.float32), np.zeros(6, np.float32), caption="x")
    return folder


def sdxl_recipe(sdxl_dir: Path, shards: Path, out: Path) -> list[str]:
    return [f"model.base={sdxl_dir}", f"data.shards={shards}", f"run.out_dir={out}", f"deepspeed={ROOT}/ds_configs/zero2_cpu.json"]


def test_a_complete_recipe_has_no_problems(tmp_path, sdxl_dir):
    cfg = load_config(ROOT / "configs/sdxl.yaml", sdxl_recipe(sdxl_dir, write_shards(tmp_path / "shards"), tmp_path / "out"))
    assert problems(cfg, world_size=8) == []
    assert problems(load_config(ROOT / "configs/smoke.yaml"), world_size=1) == []


def test_each_missing_input_is_one_line(tmp_path, sdxl_dir):
    broken = tmp_path / "sdxl"
    subprocess.run(["cp", "-r", str(sdxl_dir), str(broken)], check=True)
    (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    shards = write_shards(tmp_path / "shards")
    (shards / json.loads((shards / "index.json").read_text())["shards"][1]["name"]).unlink()
    (tmp_path / "a_file").write_text("")
    cfg = load_config(ROOT / "configs/sdxl.yaml", sdxl_recipe(broken, shards, tmp_path / "a_file" / "run"))
    found = problems(cfg, world_size=48)  # 512 is not a multiple of 8 x 48
    assert any(p.startswith("model.base:") and "vae/weights" in p for p in found), found
    assert any(p.startswith("data.shards:") and "1 of 2 shards" in p for p in found), found
    assert any(p.startswith("run.out_dir:") for p in found), found
    assert any("stages[0].global_batch" in p for p in found), found
    assert all("\n" not in p for p in found)


def test_shards_encoded_for_another_model(tmp_path, sdxl_dir):
    cfg = load_config(ROOT / "configs/sdxl.yaml",
                      sdxl_recipe(sdxl_dir, write_shards(tmp_path / "shards", channels=12), tmp_path / "out"))
    assert any("latents have 12 channels, the UNet takes 4" in p for p in problems(cfg, world_size=8))


def test_launch_dry_run_refuses_with_one_line_per_problem(tmp_path, sdxl_dir):
    broken = tmp_path / "sdxl"
    subprocess.run(["cp", "-r", str(sdxl_dir), str(broken)], check=True)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    shards = write_shards(tmp_path / "shards")
    (shards / json.loads((shards / "index.json").read_text())["shards"][0]["name"]).unlink()
    sets = [a for kv in sdxl_recipe(broken, shards, tmp_path / "out") for a in ("--set", kv)]
    proc = subprocess.run([sys.executable, "-m", "trainer.launch", "--config", "configs/sdxl.yaml", *sets,
                           "--executor", "local", "--dry-run"], cwd=ROOT, env=cli_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("input error:")]
    assert len(lines) == 2, proc.stderr
    assert "unet" in lines[0] and "1 of 2 shards" in lines[1]
    assert not (tmp_path / "out").exists()


def test_no_fallback_to_the_toy_data(tmp_path, sdxl_dir):
    """The SDXL recipe without shards stops; it does not render and encode the toy shapes through SDXL."""
    proc = subprocess.run([sys.executable, "-m", "trainer.run", "--config", "configs/sdxl.yaml", "--set",
                           f"model.base={sdxl_dir}", "--set", f"run.out_dir={tmp_path / 'out'}"],
                          cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "data.shards: no shard folder given" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_job_names_the_valid_ones(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "trainer.run", "--config", "configs/smoke.yaml", "--jobs", "stage9",
                           "--set", f"run.out_dir={tmp_path / 'out'}"], cwd=ROOT, env=cli_env(), capture_output=True,
                          text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1
    assert "'stage9'" in lines[0] and "teacher, stage1_32, stage2_8, stage5_1" in lines[0]
    assert not (tmp_path / "out").exists()
