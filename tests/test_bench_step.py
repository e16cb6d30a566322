"""bench/step.py: a real step split into parts on the tiny preset, and SDXL's FLOPs on the meta device."""
from __future__ import annotations

import json
import math
import sys

from conftest import ROOT

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import step as bench_step  # noqa: E402


def test_tiny_step_parts_whole_d_variants_and_profile(tmp_path):
    out = tmp_path / "step.json"
    assert bench_step.main(["--preset", "tiny", "--micro-batch", "4", "--iters", "2", "--warmup", "1",
                            "--workers", "0", "--profile", "--json", str(out)]) == 0
    [row] = json.loads(out.read_text())
    assert list(row["parts_s"]) == list(bench_step.PARTS_ADV)
    assert all(v > 0 for v in row["parts_s"].values())
    assert math.isclose(row["sum_parts_s"], sum(row["parts_s"].values()))
    # a whole step does the same work as the parts: far from either 0 or many times their sum
    assert 0.3 < row["whole_over_parts"] < 3.0
    assert row["d_step_stacked_s"] > 0 and row["d_step_separate_s"] > 0
    assert row["attention"] == ["AttnProcessor2_0"]  # PyTorch SDPA
    # --profile on a CPU: the profiled step's wall time and CPU ops (no device timeline), and the bare forward
    profile = row["profile"]
    assert profile["wall_s"] > 0 and "gpu_busy_s" not in profile
    assert 0 < len(profile["cpu_ops"]) <= bench_step.TOP_CPU_OPS
    assert all(op["self_ms"] >= 0 and op["calls"] > 0 and len(op["name"]) <= 80 for op in profile["cpu_ops"])
    assert [op["self_ms"] for op in profile["cpu_ops"]] == sorted((op["self_ms"] for op in profile["cpu_ops"]), reverse=True)
    forward = row["unet_forward_tflops"]
    assert forward["batch"] == 4 and forward["forward_flops"] > 0
    for memory_format in ("contiguous", "channels_last"):
        assert forward[memory_format]["seconds"] > 0 and forward[memory_format]["tflops"] > 0
        assert forward[memory_format]["of_peak"] is None  # no peak known for a CPU


def test_union_seconds_counts_overlapping_kernels_once():
    assert bench_step.union_seconds([(0, 10), (5, 20), (30, 40)]) == 30e-6
    assert bench_step.union_seconds([(0, 100), (10, 20)]) == 100e-6
    assert bench_step.union_seconds([]) == 0


def test_meta_flops_scale_with_the_batch_and_backward_is_twice_forward():
    one = bench_step.student_flops(bench_step.PRESETS["tiny"], 1, "full", "meta")
    two = bench_step.student_flops(bench_step.PRESETS["tiny"], 2, "full", "meta")
    assert math.isclose(two["student_fwd_flops"], 2 * one["student_fwd_flops"], rel_tol=1e-6)
    backward = one["student_fwd_bwd_flops"] - one["student_fwd_flops"]
    assert 1.8 < backward / one["student_fwd_flops"] < 2.2  # weight and input gradients
