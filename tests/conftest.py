"""Shared helpers: run the real CLI in a subprocess (DeepSpeed wants its own process group)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def toy_batch(size: int = 4, nan: bool = False) -> dict:
    """A fixed micro-batch shaped like the toy's shards (12x16x16 latents, SDXL-style conditioning); `nan` puts
    one NaN in the first latent (a corrupt sample)."""
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(size, 12, 16, 16, generator=g)
    if nan:
        latent[0, 0, 0, 0] = float("nan")
    return {"latent": latent, "prompt_embeds": torch.randn(size, 16, 32, generator=g),
            "pooled": torch.randn(size, 32, generator=g), "time_ids": torch.tensor([[32., 32, 0, 0, 32, 32]] * size)}


def cli_env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra)
    return env


def run_cli(args: list[str], timeout: int = 600, ranks: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    if ranks == 1:
        cmd = [sys.executable, "-m", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def latest_checkpoint(job_dir: Path) -> Path:
    """The checkpoint a phase's `ckpt/LATEST` names (the trainer's own reader: it refuses an incomplete one)."""
    from trainer.runtime.checkpoint import CheckpointManager

    latest = CheckpointManager(Path(job_dir) / "ckpt").latest()
    assert latest is not None, f"{job_dir}: no checkpoint"
    return latest


def latest_state(job_dir: Path) -> dict:
    """The trainer state (samples seen, done, probe curve, ...) of a phase's latest checkpoint."""
    return json.loads((latest_checkpoint(job_dir) / "trainer_state.json").read_text())


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """One uninterrupted smoke progression (teacher + stage 1), shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("smoke")
    run_cli(["trainer.run", "--config", "configs/smoke.yaml", "--set", f"run.out_dir={out}"])
    return out


@pytest.fixture(scope="session")
def two_rank_run(tmp_path_factory) -> Path:
    """One uninterrupted 2-rank smoke progression."""
    out = tmp_path_factory.mktemp("two_ranks")
    run_cli(["trainer.run", "--config", "configs/smoke.yaml", "--set", f"run.out_dir={out}"], ranks=2)
    return out
