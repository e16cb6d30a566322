"""Paired comparison of settings scored in one eval/fid_patch.py --save-features run: every row of it saw the
same prompts and noise against the same real images, so a difference between two rows is measured on one
resample of them for both. Rows are grouped into settings by their label, `<setting>/seed<S>`.

    python bench/paired.py bench/results/one_step/eval --baseline table     # every setting against `table`

Prints, per setting and metric, the seed means' difference to the baseline with its 95% interval and the
decision of bench/shapes_table.decide_paired (decided only where every seed pair differs beyond the images'
noise); writes paired.json beside the features.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from bench.shapes_table import decide_paired  # noqa: E402
from eval.scoring import paired_fid_resamples  # noqa: E402


def settings_of(rows: list[dict]) -> dict[tuple[str, int | None], list[int]]:
    """{(setting, steps): [row indices]} from labels `<setting>/seed<S>` (a label without a seed is its own
    setting) and the rows' step counts."""
    out: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        out.setdefault((r["label"].rsplit("/seed", 1)[0], r.get("steps")), []).append(i)
    return out


def named(groups: dict[tuple, list[int]]) -> dict[tuple, str]:
    """Each group's name in the output: the setting, with `@<steps>` where the rows span several step counts."""
    several = len({steps for _, steps in groups}) > 1
    return {(name, steps): f"{name}@{steps}" if several else name for name, steps in groups}


def compare(folder: Path, baseline: str, metrics=("fid_whole", "fid_patch"), resamples: int = 200,
            seed: int = 0) -> dict:
    """{setting: {metric: decide_paired(setting, baseline)}} for every setting but the baseline."""
    rows = json.loads((folder / "results.json").read_text())["rows"]
    features = np.load(folder / "features.npz")
    groups = settings_of(rows)
    if baseline not in {name for name, _ in groups}:
        raise SystemExit(f"{folder}: no rows labelled {baseline}/seed<S> "
                         f"(settings: {', '.join(sorted({name for name, _ in groups}))})")
    names = named(groups)
    out: dict = {}
    for metric in metrics:
        kind = metric.removeprefix("fid_")
        if f"reference.{kind}" not in features:
            continue
        order = [i for idx in groups.values() for i in idx]
        resampled = paired_fid_resamples([features[f"row{i}.{kind}"] for i in order], features[f"reference.{kind}"],
                                         resamples, np.random.default_rng(seed))
        column = {i: c for c, i in enumerate(order)}
        cols = lambda name: resampled[:, [column[i] for i in groups[name]]]
        for (name, steps), idx in groups.items():
            base = (baseline, steps)
            if name != baseline and base in groups:
                out.setdefault(names[name, steps], {})[metric] = {
                    "values": [rows[i][metric] for i in idx],
                    **decide_paired([rows[i][metric] for i in idx], [rows[i][metric] for i in groups[base]],
                                    cols((name, steps)), cols(base))}
    return out


def welch(d: dict) -> str:
    return "" if d.get("welch_ci") is None else " (Welch over seeds [{:+.3g}, {:+.3g}])".format(*d["welch_ci"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", type=Path, help="an eval/fid_patch.py --save-features output folder")
    p.add_argument("--baseline", required=True, help="the setting every other is compared with")
    p.add_argument("--resamples", type=int, default=200)
    args = p.parse_args(argv)
    result = compare(args.folder, args.baseline, resamples=args.resamples)
    rows = json.loads((args.folder / "results.json").read_text())["rows"]
    groups = settings_of(rows)
    for key, name in named(groups).items():
        if key[0] == args.baseline:
            base = {m: [rows[i][m] for i in groups[key]] for m in ("fid_whole", "fid_patch")}
            print(f"baseline {name}: " + ", ".join(f"{m} {np.mean(v):.3g} ({', '.join(f'{x:.3g}' for x in v)})"
                                                for m, v in base.items()))
    for name, by_metric in result.items():
        for metric, d in by_metric.items():
            lo, hi = d["difference_ci"]
            verdict = {"a": f"{name} better (decided)", "b": f"{args.baseline} better (decided)"}.get(
                d["outcome"], f"undecided ({d['pairs_for_a']} of {len(d['pairs'])} pairs for {name}, "
                              f"{d['pairs_for_b']} for {args.baseline})")
            print(f"{name:>24} {metric:>9}: {np.mean(d['values']):.3g} ({', '.join(f'{x:.3g}' for x in d['values'])})"
                  f"  difference {d['difference']:+.3g} [{lo:+.3g}, {hi:+.3g}]{welch(d)}  {verdict}")
    (args.folder / "paired.json").write_text(json.dumps({"baseline": args.baseline, "settings": result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
