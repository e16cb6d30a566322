"""bench/step.py: a real step split into parts on the tiny preset, and SDXL's FLOPs on the meta device."""
from __future__ import annotations

import json
import math
import sys

from conftest import ROOT

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import step as bench_step  # noqa: E402


def test_tiny_step_parts_whole_and_d_variants(tmp_path):
    out = tmp_path / "step.json"
    assert bench_step.main(["--preset", "tiny", "--micro-batch", "4", "--iters", "2", "--warmup", "1",
                            "--workers", "0", "--json", str(out)]) == 0
    [row] = json.loads(out.read_text())
    assert list(row["parts_s"]) == list(bench_step.PARTS_ADV)
    assert all(v > 0 for v in row["parts_s"].values())
    assert math.isclose(row["sum_parts_s"], sum(row["parts_s"].values()))
    # a whole step does the same work as the parts: far from either 0 or many times their sum
    assert 0.3 < row["whole_over_parts"] < 3.0
    assert row["d_step_stacked_s"] > 0 and row["d_step_separate_s"] > 0
    assert row["attention"] == ["AttnProcessor2_0"]  # PyTorch SDPA


def test_meta_flops_scale_with_the_batch_and_backward_is_twice_forward():
    one = bench_step.student_flops(bench_step.PRESETS["tiny"], 1, "full", "meta")
    two = bench_step.student_flops(bench_step.PRESETS["tiny"], 2, "full", "meta")
    assert math.isclose(two["student_fwd_flops"], 2 * one["student_fwd_flops"], rel_tol=1e-6)
    backward = one["student_fwd_bwd_flops"] - one["student_fwd_flops"]
    assert 1.8 < backward / one["student_fwd_flops"] < 2.2  # weight and input gradients
