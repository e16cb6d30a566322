"""How fast D leaves chance: each run's discriminator accuracy ((real judged real + fake judged fake) / 2)
averaged over windows of its logged steps, one row per window, one column per run, as a markdown table.

    python bench/d_curve.py --run striped=/tmp/d/striped --run plain=/tmp/d/plain --stage stage2_8 \
        [--window 800] [--phase 0] [--out bench/results/stripes_and_dots/d_only.md]

The window is in samples (the logged step is the sample count). Runs are typically D-only phases
(`disc.warmup_samples` = the phase's `samples`: the student frozen), which show how many D steps a stage's
gap takes to be seen; the logged accuracy is one micro-batch's, hence the windows.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/d_curve.py` from a clone
    sys.path.insert(0, str(ROOT))

from bench.tb_scalars import phase_scalars  # noqa: E402


def accuracy_curve(run_dir: Path, stage: str, phase_index: int = 0) -> list[tuple[int, float]]:
    """[(samples, accuracy)] of the stage's phase_index-th phase that logged D's accuracy."""
    real, fake = phase_scalars(run_dir, "/d_acc_real", stage), phase_scalars(run_dir, "/d_acc_fake", stage)
    if not real:
        raise ValueError(f"{run_dir}: no phase of {stage} logged d_acc_real")
    if phase_index >= len(real):
        raise ValueError(f"{run_dir}: {stage} has {len(real)} phases with D's accuracy, not {phase_index + 1}")
    phase = sorted(real)[phase_index]
    return [(step, (r + f) / 2) for (step, r), (_, f) in zip(real[phase], fake[phase])]


def windowed(curve: list[tuple[int, float]], window: int) -> dict[int, float]:
    """{window end in samples: mean accuracy of the steps logged in (end - window, end]}."""
    steps, values = np.array([s for s, _ in curve]), np.array([v for _, v in curve])
    means = {}
    for end in range(window, int(steps.max()) + window, window):
        held = (steps > end - window) & (steps <= end)
        if held.any():
            means[end] = float(values[held].mean())
    return means


def render(curves: dict[str, dict[int, float]], stage: str, window: int, phase_index: int = 0) -> str:
    ends = sorted({end for curve in curves.values() for end in curve})
    lines = [f"# D's accuracy in {stage} (phase {phase_index}), mean over windows of {window} samples (0.5 = blind)", "",
             "| samples | " + " | ".join(curves) + " |", "|---|" + "---|" * len(curves)]
    for end in ends:
        cells = [f"{curve[end]:.3f}" if end in curve else "" for curve in curves.values()]
        lines.append(f"| {end - window}-{end} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", action="append", required=True, help="LABEL=RUN_DIR (repeat)")
    p.add_argument("--stage", default="stage2_8")
    p.add_argument("--window", type=int, default=800, help="samples per window")
    p.add_argument("--phase", type=int, default=0, help="which of the stage's adversarial phases (0: the first)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    runs = dict(item.split("=", 1) for item in args.run)
    table = render({label: windowed(accuracy_curve(Path(path), args.stage, args.phase), args.window)
                    for label, path in runs.items()}, args.stage, args.window, args.phase)
    print(table, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
    return table


if __name__ == "__main__":
    main()
