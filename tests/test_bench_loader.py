"""bench/loader.py on the tiny preset: its measurements, JSON, data reuse and CLI (fast: a few MB)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench import loader as bench_loader
from tests.conftest import ROOT, cli_env

SAMPLES, SHARDS, BATCH = 256, 4, 16
SMALL_RUN = ["--preset", "tiny", "--samples", str(SAMPLES), "--shards", str(SHARDS),
             "--batch-size", str(BATCH), "--workers", "2", "--repeats", "1"]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """Tiny shards written once for the in-process tests."""
    out = tmp_path_factory.mktemp("bench_loader_shards")
    bench_loader.ensure_data(out, bench_loader.PRESETS["tiny"], SAMPLES, SHARDS, seed=0)
    return out


def test_loader_epoch_yields_every_written_sample_once(shard_dir):
    paths = bench_loader.list_shards(shard_dir)
    assert bench_loader.read_all(paths) == sum(os.path.getsize(path) for path in paths)
    assert bench_loader.decode_only(paths) == SAMPLES
    for workers in (0, 2):
        epoch = bench_loader.loader_epoch(shard_dir, BATCH, workers, SAMPLES, seed=0)
        assert epoch["samples"] == SAMPLES
        assert epoch["seconds"] > 0 and 0 < epoch["first_batch_s"] <= epoch["seconds"]


def test_stages_cover_the_loader_work(shard_dir):
    stages = bench_loader.measure_stages(bench_loader.list_shards(shard_dir),
                                         bench_loader.read_index(shard_dir)["shapes"], BATCH)
    assert set(stages) == {"tar_parse", "npy_load", "float32_and_checks", "collate"}
    assert all(seconds >= 0 for seconds in stages.values()) and sum(stages.values()) > 0


def test_matching_data_are_reused_and_other_sizes_rewritten(shard_dir):
    preset = bench_loader.PRESETS["tiny"]
    index = shard_dir / "index.json"
    written = index.stat().st_mtime_ns
    bench_loader.ensure_data(shard_dir, preset, SAMPLES, SHARDS, seed=0)
    assert index.stat().st_mtime_ns == written
    other = shard_dir.parent / "other_sizes"
    bench_loader.ensure_data(other, preset, SAMPLES, SHARDS, seed=0)
    bench_loader.ensure_data(other, preset, SAMPLES // 2, SHARDS // 2, seed=0)
    assert json.loads((other / "index.json").read_text())["num_samples"] == SAMPLES // 2
    assert len(list(other.glob("bench-*.tar"))) == SHARDS // 2  # the old shards are gone


@pytest.mark.parametrize("samples, shards, batch, workers", [
    (250, 4, 16, [0, 2]),   # samples not a multiple of the shards
    (256, 3, 16, [0, 2]),   # shards not a multiple of the workers
    (256, 4, 48, [0, 2]),   # a stream's samples not a multiple of the batch
])
def test_sizes_that_are_not_one_epoch_are_refused(samples, shards, batch, workers):
    with pytest.raises(ValueError):
        bench_loader.check_epoch_plan(samples, shards, batch, workers)


def test_main_writes_json_with_positive_measurements(tmp_path):
    out = tmp_path / "results.json"
    assert bench_loader.main(SMALL_RUN + ["--dir", str(tmp_path / "shards"), "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["samples"] == SAMPLES and results["worker_counts"] == [0, 2]
    assert results["bytes"] > 0 and results["cache"] == "cold" and len(results["repeats"]) == 1
    expected = {"raw_s", "raw_mb_per_s", "raw_samples_per_s", "decode_only_samples_per_s"}
    for workers in (0, 2):
        expected |= {f"loader_w{workers}_samples_per_s", f"loader_w{workers}_first_batch_s",
                     f"ratio_w{workers}"}
    assert set(results["median"]) == expected
    assert all(value > 0 for value in results["median"].values())
    assert set(results["stages_s"]) == {"tar_parse", "npy_load", "float32_and_checks", "collate"}
    assert results["runtime_s"] > 0


def test_cli_exits_zero_and_prints_the_ratio(tmp_path):
    proc = subprocess.run(
        [sys.executable, "bench/loader.py", *SMALL_RUN, "--no-stages", "--dir", str(tmp_path)],
        cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("loader/raw = ") and last.endswith("(target >= 0.9)")
