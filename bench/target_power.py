"""Can the shapes table's undecided targets be decided on its own 1,000 images by a stronger test? Two checks,
on the table's exports (its runs layout) and the table's prompts, noise and real images:

1. FID-Patch, full method against MSE-only (2 and 1 steps, 3 seeds each): the table's estimator, one 16 px
   centre crop per 32 px image (the paper's FID-Patch: a native-resolution centre crop), against the four
   16 px tiles of every image (the same native resolution, the whole image covered). The bootstrap resamples
   images, each with all its tiles. Reports each estimator's floor (other real images of the same prompts)
   with its interval, and the all-pairs decision of bench/shapes_table.decide_paired.
2. The FID-Whole ratio targets (4 steps <= 1.10x the 32-step teacher, 1 step <= 1.30x) tested paired: the
   student's FID minus the factor times the teacher's, on the same resamples of the prompts, instead of
   the two unpaired intervals the table compares. Met only where every seed's interval lies below zero.

    python bench/target_power.py --runs runs/table --lightning runs/lora_chain/seed0 \\
        --teacher-samples bench/results/shapes_table_eval/teacher_samples
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from bench.shapes_table import decide_paired  # noqa: E402
from eval.features import ShapesBackend  # noqa: E402
from eval.fid import FeatureStats, fid_of_stats  # noqa: E402
from eval.generate import ExportSampler  # noqa: E402
from eval.images import to_tensor  # noqa: E402
from eval.reference import REFERENCE_SEED, ReferenceSet  # noqa: E402
from eval.scoring import paired_fid_resamples  # noqa: E402

STAGES = {8: "stage2_8", 4: "stage3_4", 2: "stage4_2", 1: "stage5_1"}


class Views:
    """One image set's features: the whole view, the centre crop, and the four tiles ([N, 4, d])."""

    def __init__(self, backend: ShapesBackend, images: np.ndarray):
        x = to_tensor(images)
        s = backend.input_size
        h, w = x.shape[-2:]
        top, left = (h - s) // 2, (w - s) // 2
        self.whole = backend.whole_features(images)
        self.centre = backend.features(x[:, :, top:top + s, left:left + s])
        corners = [(r, c) for r in range(0, h - s + 1, s) for c in range(0, w - s + 1, s)]
        self.tiles = np.stack([backend.features(x[:, :, r:r + s, c:c + s]) for r, c in corners], 1)


def fid(a: np.ndarray, b: np.ndarray) -> float:
    """FID of two row sets; [N, k, d] sets count each of an image's k views as a row."""
    flat = lambda x: x.reshape(-1, x.shape[-1])
    return fid_of_stats(FeatureStats.of(flat(a)), FeatureStats.of(flat(b)))


def resampled(sets: list[np.ndarray], reference: np.ndarray, resamples: int) -> np.ndarray:
    """[resamples, sets]: FID of each set against the reference on the same draws of images; every call draws
    the same images (one seed), so all of this script's intervals share their resamples."""
    return paired_fid_resamples(sets, reference, resamples, np.random.default_rng(0))


def interval(point: float, values: np.ndarray) -> list[float]:
    half = 1.96 * float(np.std(values, ddof=1))  # the normal bootstrap interval, as eval.scoring.bootstrap_fid
    return [point - half, point + half]


def sample(model: Path, steps: int, prompts: list[str], batch: int = 250) -> np.ndarray:
    """The export's images of `prompts`, image i from the noise of (seed 0, i), as eval/fid_patch.py."""
    sampler = ExportSampler(model, None, "cpu", torch.float32)
    out = []
    for start in range(0, len(prompts), batch):
        idx = list(range(start, min(start + batch, len(prompts))))
        out.append(sampler.sample([prompts[i] for i in idx], idx, steps, 1.0, 0))
    return np.concatenate(out)


class Students:
    """Each (run, step count)'s images of the prompts, sampled once and kept as Views."""

    def __init__(self, args, backend: ShapesBackend, prompts: list[str]):
        self.backend, self.prompts = backend, prompts
        self.runs = {"full": [args.lightning, args.runs / "lightning_seed1", args.runs / "lightning_seed2"],
                     "mse": [args.runs / "mse", args.runs / "mse_seed1", args.runs / "mse_seed2"]}
        self._views: dict[tuple[Path, int], Views] = {}

    def views(self, run: Path, steps: int) -> Views:
        if (run, steps) not in self._views:
            images = sample(run / "exports" / STAGES[steps], steps, self.prompts)
            self._views[run, steps] = Views(self.backend, images)
        return self._views[run, steps]


def patch_estimators(students: Students, reference: Views, floor: Views, resamples: int) -> None:
    print("== 1. FID-Patch estimators, full method against MSE-only ==")
    for kind in ("centre", "tiles"):
        f = getattr(floor, kind)
        point = fid(f, getattr(reference, kind))
        lo, hi = interval(point, resampled([f], getattr(reference, kind), resamples)[:, 0])
        print(f"floor, {kind}: {point:.2f} [{lo:.2f}, {hi:.2f}]")
    for steps in (2, 1):
        views = [students.views(r, steps) for r in students.runs["full"] + students.runs["mse"]]
        for kind in ("whole", "centre", "tiles"):
            sets = [getattr(v, kind) for v in views]
            points = [fid(s, getattr(reference, kind)) for s in sets]
            values = resampled(sets, getattr(reference, kind), resamples)
            p = decide_paired(points[:3], points[3:], values[:, :3], values[:, 3:])
            pairs = ", ".join(f"{lo:+.1f}..{hi:+.1f}" for lo, hi in p["pairs"])
            print(f"{steps} step{'s' if steps > 1 else ''}, {kind}: full {', '.join(f'{v:.2f}' for v in points[:3])}; "
                  f"MSE-only {', '.join(f'{v:.2f}' for v in points[3:])}; pairs decided for the full method "
                  f"{p['pairs_for_a']} of 9, for MSE-only {p['pairs_for_b']} (pair intervals: {pairs})")


def ratio_targets(students: Students, teacher_samples: Path, reference: Views, resamples: int) -> None:
    print("== 2. FID-Whole ratio targets, paired with the 32-step teacher ==")
    cached = sorted(teacher_samples.glob("samples_*.npz"))
    if len(cached) != 1:
        raise SystemExit(f"{teacher_samples}: expected one cached teacher sample set, found {len(cached)}")
    with np.load(cached[0], allow_pickle=False) as saved:
        teacher = students.backend.whole_features(saved["images"][:len(students.prompts)])
    seeds = students.runs["full"]
    for steps, factor, runs in ((4, 1.10, seeds[:1]), (1, 1.30, seeds)):
        sets = [teacher, *(students.views(r, steps).whole for r in runs)]
        points = [fid(s, reference.whole) for s in sets]
        values = resampled(sets, reference.whole, resamples)
        for seed, (point, column) in enumerate(zip(points[1:], values[:, 1:].T)):
            d = point - factor * points[0]
            lo, hi = interval(d, column - factor * values[:, 0])
            verdict = "met" if hi < 0 else "missed" if lo > 0 else "undecided"
            print(f"{steps} step{'s' if steps > 1 else ''}, seed {seed}: {point:.3f} = {point / points[0]:.3f}x the teacher's {points[0]:.3f}; "
                  f"student - {factor:.2f} x teacher = {d:+.3f} [{lo:+.3f}, {hi:+.3f}]: {verdict}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "table", help="the table's runs layout")
    p.add_argument("--lightning", type=Path, default=ROOT / "runs" / "table" / "lightning",
                   help="the full method's seed-0 run")
    p.add_argument("--teacher-samples", type=Path, default=ROOT / "bench" / "results" / "shapes_table_eval" / "teacher_samples",
                   help="the table's cache of the 32-step teacher's images (eval/fid_patch.py --teacher-cache)")
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--resamples", type=int, default=200)
    args = p.parse_args()
    torch.manual_seed(0)
    backend = ShapesBackend()
    real = ReferenceSet("shapes", args.count)
    stack = lambda rs: np.stack([im for batch, _ in rs.batches(256) for im in batch])
    reference = Views(backend, stack(real))
    floor = Views(backend, stack(real.same_prompts(REFERENCE_SEED + 1)))
    students = Students(args, backend, real.prompts)
    patch_estimators(students, reference, floor, args.resamples)
    ratio_targets(students, args.teacher_samples, reference, args.resamples)


if __name__ == "__main__":
    main()
