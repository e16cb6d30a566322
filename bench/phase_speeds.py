"""Each phase's training speed from a run's TensorBoard logs: the median of its `samples_per_s` scalar
(logged every `log.every_steps` steps; the first value, which holds the start-up, left out).

  python bench/phase_speeds.py runs/shapes                       # one run
  python bench/phase_speeds.py runs/shapes --against runs/before  # beside another run, with the ratio

Speeds of two runs on these machines compare only when both ran alone on the same kind of CPU.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/phase_speeds.py` from a clone, and `import bench.phase_speeds` in tests
    sys.path.insert(0, str(ROOT))

from bench.tb_scalars import phase_scalars  # noqa: E402


def phase_speeds(run_dir: Path, stage: str = "*") -> dict[str, float]:
    """{"<stage>.<phase>": median samples/s} for every phase of `stage` (a glob; default all) in `run_dir`."""
    logged = phase_scalars(run_dir, "samples_per_s", stage)
    # the first value holds the start-up
    return {name: statistics.median(v for _, v in points[1:]) for name, points in logged.items() if points[1:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run's out_dir (holds jobs/<stage>/<phase>/tb)")
    parser.add_argument("--against", type=Path, help="another run's out_dir, shown in brackets")
    parser.add_argument("--stage", default="*", help="only this stage's phases (a glob)")
    args = parser.parse_args()
    speeds = phase_speeds(args.run, args.stage)
    if not speeds:
        raise SystemExit(f"{args.run}: no phase logged samples_per_s under jobs/{args.stage}/*/tb")
    other = phase_speeds(args.against, args.stage) if args.against else {}
    print("phase  median samples/s" + (f"  ({args.against}; ratio)" if args.against else ""))
    for name, value in speeds.items():
        before = other.get(name)
        print(f"{name} {value:.1f}" + (f"  ({before:.1f}; {value / before:.2f}x)" if before else ""))


if __name__ == "__main__":
    main()
