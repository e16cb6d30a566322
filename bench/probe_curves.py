"""The stage-length probe's curves of a run (`probe.every_samples` > 0): every phase's FID against its
teacher's samples as it trained, where `probe.stop_when_flat` would have stopped it, and a chart.

  python bench/probe_curves.py runs/probe [--patience 3 --min-improvement 0.02] [--out bench/results/x]

Reads the TensorBoard scalar `<phase>/probe_fid_vs_teacher` (x: samples seen). Writes `<out>/probe_curves.md`
(one row per phase: each probe's value, the best, and the sample count at which the trainer's flatness rule
would end the phase) and `<out>/probe_curves.png` (one panel per stage, its phases one after another); prints
the table.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/probe_curves.py` from a clone, and `import bench.probe_curves` in tests
    sys.path.insert(0, str(ROOT))

from bench.tb_scalars import phase_scalars  # noqa: E402
from trainer.runtime.probe import flattened  # noqa: E402

TAG = "probe_fid_vs_teacher"


def probe_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{"<stage>.<phase>": [(samples seen, FID vs teacher), ...]} for every phase that logged the probe."""
    # by sample count: a resumed phase may log a point twice
    return {name: sorted(dict(points).items()) for name, points in phase_scalars(run_dir, TAG).items()}


def stop_point(curve: list[tuple[int, float]], patience: int, min_improvement: float) -> int | None:
    """The sample count at which `probe.stop_when_flat` would end the phase; None: it would run to its end."""
    for i in range(len(curve)):
        if flattened([fid for _, fid in curve[: i + 1]], patience, min_improvement):
            return curve[i][0]
    return None


def table(curves: dict[str, list[tuple[int, float]]], patience: int, min_improvement: float) -> str:
    lines = [f"| phase | FID vs teacher at samples seen | best | would stop at (patience {patience}, "
             f"min_improvement {min_improvement}) |", "|---|---|---|---|"]
    for name, curve in curves.items():
        values = ", ".join(f"{s}: {fid:.3g}" for s, fid in curve)
        best = min(curve, key=lambda p: p[1])
        stop = stop_point(curve, patience, min_improvement)
        lines.append(f"| {name} | {values} | {best[1]:.3g} at {best[0]} | "
                     f"{stop if stop is not None else 'its end'} of {curve[-1][0]} |")
    return "\n".join(lines) + "\n"


def chart(curves: dict[str, list[tuple[int, float]]]):
    """One panel per stage, a line per phase, the phases one after another along the stage's samples;
    panels side by side, wrapped at three."""
    import numpy as np
    from PIL import Image

    from eval.plot import line_panel

    stages: dict[str, dict[str, list]] = {}
    offsets: dict[str, int] = {}
    for name, curve in curves.items():  # in phase order within each stage (the folders' names sort so)
        stage, phase = name.split(".", 1)
        start = offsets.get(stage, 0)
        stages.setdefault(stage, {})[phase] = [(float(start + s), fid) for s, fid in curve]
        offsets[stage] = start + curve[-1][0]
    panels = [np.asarray(line_panel(series, stage, "samples seen in the stage", "probe FID vs teacher", log2_x=False))
              for stage, series in stages.items()]
    h, w = panels[0].shape[:2]
    cols = min(3, len(panels))
    sheet = Image.new("RGB", (cols * w, -(-len(panels) // cols) * h), "white")
    for k, panel in enumerate(panels):
        sheet.paste(Image.fromarray(panel[..., :3]), ((k % cols) * w, (k // cols) * h))
    return sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run's out_dir (holds jobs/<stage>/<phase>/tb)")
    parser.add_argument("--patience", type=int, default=3, help="as probe.patience")
    parser.add_argument("--min-improvement", type=float, default=0.02, help="as probe.min_improvement")
    parser.add_argument("--out", type=Path, help="folder for probe_curves.md and .png (default: the run's)")
    args = parser.parse_args()
    curves = probe_curves(args.run)
    if not curves:
        raise SystemExit(f"{args.run}: no phase logged {TAG} (was probe.every_samples set?)")
    out = args.out or args.run
    out.mkdir(parents=True, exist_ok=True)
    text = table(curves, args.patience, args.min_improvement)
    (out / "probe_curves.md").write_text(f"Probe curves of `{args.run}` (`python bench/probe_curves.py`)\n\n{text}")
    chart(curves).save(out / "probe_curves.png")
    print(text + f"wrote {out / 'probe_curves.md'} and {out / 'probe_curves.png'}")


if __name__ == "__main__":
    main()
