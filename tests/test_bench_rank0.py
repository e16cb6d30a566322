"""bench/rank0.py: rank 0's solo work (grid decode, UNet load and export, ZeRO checkpoint and consolidation)
timed against the trainer's timeouts; the tiny preset end to end in a subprocess (~15 s)."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT, cli_env

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import rank0  # noqa: E402
from trainer.config import RunConfig  # noqa: E402

MEASURED = ("unet_load", "unet_export", "zero_save", "zero_consolidate", "vae_decode_cpu")


def test_tiny_preset_times_every_part_against_the_timeouts(tmp_path):
    scratch, out = tmp_path / "scratch", tmp_path / "rank0.json"
    proc = subprocess.run([sys.executable, "bench/rank0.py", "--preset", "tiny", "--out", str(scratch), "--json", str(out),
                           "--cpu-decode-images", "2"],
                          cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["ok"] and result["done"] and not result["errors"]
    assert result["preset"] == "tiny" and result["threads"] == 1
    defaults = RunConfig()
    assert result["timeouts"] == {"main_work_timeout_s": defaults.main_work_timeout_s,
                                  "collective_timeout_s": defaults.collective_timeout_s}
    for name in MEASURED:
        row = result["times"][name]
        assert row["seconds"] > 0, name
        binding = result["timeouts"][row["binding_timeout"]]
        assert abs(row["of_binding_timeout"] - row["seconds"] / binding) < 1e-12
        assert abs(row["of_main_work_timeout"] - row["seconds"] / defaults.main_work_timeout_s) < 1e-12
        assert abs(row["of_collective_timeout"] - row["seconds"] / defaults.collective_timeout_s) < 1e-12
        assert name in proc.stdout
    # solo work between jobs waits under main_work_timeout_s; a checkpoint write is a collective
    assert result["times"]["unet_export"]["binding_timeout"] == "main_work_timeout_s"
    assert result["times"]["zero_consolidate"]["binding_timeout"] == "main_work_timeout_s"
    assert result["times"]["zero_save"]["binding_timeout"] == "collective_timeout_s"
    decode = result["times"]["vae_decode_cpu"]
    assert decode["images"] == 4 and decode["images_measured"] == 2
    assert abs(decode["seconds"] - 4 * decode["per_image_s"]) < 1e-9  # 2 measured, scaled to the grid of 4
    assert result["times"]["unet_load"]["params"] > 1e6
    assert result["times"]["unet_export"]["bytes"] > 2 * result["times"]["unet_load"]["bytes"] * 0.9  # folder + file
    assert not scratch.exists()  # the scratch folder it made is gone


def test_sdxl_preset_skips_the_zero_engine_unless_asked():
    args = rank0.parse_args(["--preset", "sdxl"])
    assert args.zero is None and args.threads == 1
    assert rank0.latent_shape(rank0.SDXL_VAE) == (4, 128, 128)
    assert rank0.latent_shape(rank0.TINY_VAE) == (4, 16, 16)
    assert rank0.parse_args(["--preset", "sdxl", "--zero"]).zero is True
