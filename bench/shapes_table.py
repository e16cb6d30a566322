"""The paper's table at shapes scale: teacher, MSE-only progression, conditional-only, and the full method
(conditional then unconditional; full UNet and LoRA), scored with eval/fid_patch.py, with intervals and seeds.

    python bench/shapes_table.py                       # everything: trains what is missing, then evaluates
    python bench/shapes_table.py --methods lightning,mse --seeds 0 --count 300   # a quicker, noisier look

Each method's whole chain is trained once (seed 0) in --runs/<method> (default runs/table/<method>; the
128->32 stage is shared by all methods); for every other --seeds S (default 0,1,2,3) --runs/<method>_seed<S>
gets copies of that run's exports up to the 4-step stage and the trainer retrains only the 2- and 1-step
stages with run.seed=S. A run already complete is reused (the trainer skips finished exports), and
`--reuse-lightning runs/shapes` takes the main job's run as the full method's seed 0. Every row is scored on
--count images (default 1,000) with 95% bootstrap intervals (eval/fid_patch.py --bootstrap, its default 200),
against the data and against the 32-step teacher's own samples. Hours on 2 cores: 3 chains, 3 extra seeds x 2
stages x 3 methods, and evaluation at 1,000 images with the teacher's samples as a second reference (from
nothing with 3 seeds: 123 min measured; the fourth seed added ~25 min of training; bench/README.md).

Writes bench/results/shapes_table.md (one row per (method, variant, steps): seeds, mean [interval] and
per-seed values, the targets of the evaluation issue as met / missed / undecided, the comparisons as decided
or not) and shapes_table.json (the per-seed rows, the aggregates, the target lines).
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/shapes_table.py` from a clone, and `import bench.shapes_table` in tests
    sys.path.insert(0, str(ROOT))
from eval.scoring import paired_fid_resamples  # noqa: E402
from trainer.export import is_complete  # noqa: E402

CONFIG = "configs/shapes.yaml"
TEACHER = ROOT / "assets" / "shapes_teacher"
# the teacher at its own steps and guidance (its export.json): the reference "FID vs teacher" is measured against
TEACHER_REFERENCE = ["--teacher", str(TEACHER)]
ADV_STAGES = (1, 2, 3, 4)  # indices of the 32->8, 8->4, 4->2, 2->1 stages in configs/shapes.yaml
SHARED_STAGE = "stage1_32"  # the 128->32 MSE stage (CFG teacher) is the same for every method: trained once
# a seed run starts from seed 0's 4-step student (and its LoRA, which the 2-step stage's LoRA continues)
SEED_SHARED, SEED_OPTIONAL = ("stage1_32", "stage2_8", "stage3_4"), ("stage3_4_lora",)
SEEDED = ("stage4_2", "stage5_1")  # the stages every seed trains

# The table's recipe is the main job's. (With the first toy teacher the table lengthened stage 1 8x, which
# then did not distil CFG; with the current teacher the main job's stage 1 already scores below its
# teacher: bench/README.md#measurements-behind-defaults.)
TABLE_OVERRIDES: list[str] = []
STEPS = {"stage2_8": 8, "stage3_4": 4, "stage4_2": 2, "stage5_1": 1}

# How each method differs from the recipe (the full method is the recipe itself).
OVERRIDES = {
    "lightning": [],
    # MSE-only: progressive distillation by regression alone, of the full UNet (the stronger baseline: no
    # LoRA's limited capacity)
    "mse": [f"stages.{i}.{k}={v}" for i in ADV_STAGES for k, v in (("objective", "mse"), ("variant", "full"))],
    # conditional-only: the 8-, 4- and 2-step stages without their unconditional phases (the same LoRA
    # variant); the 1-step stage is the recipe's (its adversarial phase is conditional already)
    "adv_cond": [f"stages.{i}.objective=adv_cond" for i in ADV_STAGES[:-1]],
}
NAMES = {"lightning": "full method", "mse": "MSE-only", "adv_cond": "conditional-only", "teacher": "teacher"}

# The comparisons the evaluation issue names: (steps, the other method, metric), the full method against it.
COMPARISONS = [(2, "mse", "fid_whole"), (2, "mse", "fid_patch"), (1, "mse", "fid_whole"), (1, "mse", "fid_patch"),
               (1, "adv_cond", "fid_whole")]
# their step counts keep every image's features (eval/fid_patch.py --save-features) for the paired decisions
PAIRED_STEPS = {steps for steps, _, _ in COMPARISONS}

# per-row numbers carried from eval/fid_patch.py's results.json; those with an interval have `<key>_ci`
METRICS = ("fid_whole", "fid_whole_vs_teacher", "fid_patch", "fid_patch_vs_teacher", "alignment",
           "second_copy_rate", "hollow_fill_rate", "background_grain", "sec_per_image")


def run(cmd: list[str]) -> None:
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


# -- training -------------------------------------------------------------------------------------

def copy_exports(src_run: Path, dst_run: Path, names, optional=()) -> None:
    """Give `dst_run` copies of `src_run`'s finished exports `names` (and of `optional` ones where they
    exist), which the trainer then skips. A complete copy is left alone, a half-written one replaced."""
    for name in [*names, *optional]:
        src, dst = src_run / "exports" / name, dst_run / "exports" / name
        if is_complete(dst) or (name in optional and not src.exists()):
            continue
        if not is_complete(src):
            raise FileNotFoundError(f"{src}: the shared stage did not finish")
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst)


def share_stage(first: Path, out: Path) -> None:
    """Give `out` the first method's finished shared stage, which the trainer then skips."""
    copy_exports(first, out, [SHARED_STAGE])


def train(method: str, out: Path, shards: Path | None, seed: int | None = None) -> None:
    cmd = [sys.executable, "-m", "trainer.run", "--config", CONFIG, "--set", f"run.out_dir={out}"]
    if shards is not None:
        cmd += ["--set", f"data.shards={shards}"]
    for o in TABLE_OVERRIDES + OVERRIDES[method]:
        cmd += ["--set", o]
    if seed is not None:
        cmd += ["--set", f"run.seed={seed}"]
    run(cmd)


def train_seeds(method: str, first_out: Path, runs: Path, shards: Path | None, seeds: list[int]) -> dict[int, Path]:
    """{seed: run folder}: seed 0 is `first_out` (the whole chain); every other seed retrains only the 2- and
    1-step stages, from copies of seed 0's exports up to the 4-step stage."""
    outs = {0: first_out}
    for seed in (s for s in seeds if s != 0):
        out = runs / f"{method}_seed{seed}"
        copy_exports(first_out, out, SEED_SHARED, SEED_OPTIONAL)
        train(method, out, shards, seed=seed)
        outs[seed] = out
    return outs


# -- evaluation -----------------------------------------------------------------------------------

def evaluate(models: list[tuple], out: Path, count: int) -> list[dict]:
    """models: (label, model folder, steps, guidance[, LoRA export to load onto the model])."""
    # fid_patch.py scores every model at every --steps it is given: one call per step count. The 32-step
    # teacher (every target's bar) first, then the students fewest steps first (the decisive rows), the
    # 128-step teacher (the slowest, ~12 min on 2 cores) last: an interrupted run has the rows that matter.
    order = lambda steps: (steps != 32, steps == 128, steps)
    rows = []
    for steps in sorted({m[2] for m in models}, key=order):
        sub = [m for m in models if m[2] == steps]
        sub_out = out / f"steps{steps}"
        sub_cmd = [sys.executable, "eval/fid_patch.py", "--reference", "shapes", "--backend", "shapes",
                   "--count", str(count), "--out", str(sub_out), "--no-tensorboard", "--steps", str(steps),
                   *TEACHER_REFERENCE, "--teacher-cache", str(out / "teacher_samples"),  # sampled once, not per step count
                   *(["--save-features"] if steps in PAIRED_STEPS else [])]
        for label, path, _, guidance, *lora in sub:
            sub_cmd += ["--model", str(path), "--label", label, "--guidance", str(guidance),
                        "--lora", str(lora[0]) if lora else "none"]
        if scored_by(sub_out, sub_cmd) is None:
            run(sub_cmd)
        rows += scored_by(sub_out, sub_cmd)
    return rows


def scored_by(out: Path, cmd: list[str]) -> list[dict] | None:
    """The rows of `out`'s results.json if exactly `cmd` wrote it (same models, labels, count, ...) after every
    model in it was exported, else None: a several-hour table's evaluation resumes where it stopped, and a
    changed row list or a retrained model is scored again."""
    results = out / "results.json"
    if not results.is_file():
        return None
    saved = json.loads(results.read_text())
    command = "python eval/fid_patch.py " + " ".join(shlex.quote(a) for a in cmd[2:])
    models = [Path(cmd[i + 1]) for i, a in enumerate(cmd) if a in ("--model", "--lora") and cmd[i + 1] != "none"]
    written = results.stat().st_mtime
    if saved.get("command") != command or any((m / "export.json").stat().st_mtime > written
                                               for m in models if (m / "export.json").is_file()):
        return None
    return saved["rows"]


def models_to_score(run_dirs: dict[str, dict[int, Path]]) -> tuple[list[tuple], dict[str, tuple]]:
    """The teacher at 128 and 32 steps, every stage of seed 0's runs, the seeded stages of the others;
    and {label: (method, variant, seed)}."""
    guidance = json.loads((TEACHER / "export.json").read_text())["guidance"]
    models = [("teacher", TEACHER, 128, guidance), ("teacher", TEACHER, 32, guidance)]
    labels = {"teacher": ("teacher", "full", None)}
    for method, by_seed in run_dirs.items():
        for seed, out in sorted(by_seed.items()):
            for stage, steps in STEPS.items():
                if seed != 0 and stage not in SEEDED:
                    continue
                label = f"{method}/full/seed{seed}"
                models.append((label, out / "exports" / stage, steps, 1.0))
                labels[label] = (method, "full", seed)
                lora = out / "exports" / f"{stage}_lora"
                if (lora / "export.json").is_file():  # as users apply it: the LoRA file on the base model, by diffusers
                    base = json.loads((lora / "export.json").read_text()).get("lora_base", str(TEACHER))
                    models.append((f"{method}/lora/seed{seed}", Path(base), steps, 1.0, lora))
                    labels[f"{method}/lora/seed{seed}"] = (method, "lora", seed)
    return models, labels


def wilson(rate: float, n: int) -> list[float]:
    """95% Wilson interval of a proportion `rate` over `n` images (the failure rates have no bootstrap)."""
    z = 1.96
    centre, half = rate + z * z / (2 * n), z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return [max(0.0, (centre - half) / (1 + z * z / n)), min(1.0, (centre + half) / (1 + z * z / n))]


def per_seed_rows(raw: list[dict], labels: dict[str, tuple]) -> list[dict]:
    """eval/fid_patch.py's rows as the table's: method, variant, steps, seed, METRICS and their intervals."""
    rows = []
    for r in raw:
        method, variant, seed = labels[r["label"]]
        row = {"method": method, "variant": variant, "steps": r["steps"], "seed": seed, "model": r["model"],
               "lora": r.get("lora"), "count": r.get("count")}
        for key in METRICS:
            row[key], row[f"{key}_ci"] = r.get(key), r.get(f"{key}_ci")
            if key.endswith("_rate") and row[key] is not None and row["count"]:
                row[f"{key}_ci"] = wilson(row[key], row["count"])
        rows.append(row)
    return rows


# -- aggregation and decisions (pure) -------------------------------------------------------------

def summarise(values: list, intervals: list) -> dict | None:
    """One metric over a row's seeds: mean, per-seed values, range, sd, and the comparison interval (the
    union of the seeds' 95% intervals: it holds the seed spread too; None if a seed has none)."""
    pairs = [(v, ci) for v, ci in zip(values, intervals) if v is not None]
    if not pairs:
        return None
    vals = [v for v, _ in pairs]
    cis = [ci for _, ci in pairs]
    return {"mean": statistics.fmean(vals), "values": vals, "range": [min(vals), max(vals)],
            "sd": statistics.stdev(vals) if len(vals) > 1 else None,
            "interval": None if any(ci is None for ci in cis) else [min(c[0] for c in cis), max(c[1] for c in cis)]}


def aggregate(rows: list[dict]) -> list[dict]:
    """Per-seed rows grouped by (method, variant, steps): {method, variant, steps, seeds, <metric>: summary}."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["variant"], r["steps"]), []).append(r)
    out = []
    for (method, variant, steps), rs in groups.items():
        rs = sorted(rs, key=lambda r: -1 if r.get("seed") is None else r["seed"])
        agg = {"method": method, "variant": variant, "steps": steps, "seeds": [r.get("seed") for r in rs]}
        for key in METRICS:
            agg[key] = summarise([r.get(key) for r in rs], [r.get(f"{key}_ci") for r in rs])
        out.append(agg)
    return sorted(out, key=lambda a: (a["method"] != "teacher", a["method"], a["variant"], -a["steps"]))


def decide(a: list | None, b: list | None, lower_is_better: bool = True) -> str:
    """'a' or 'b' (the winner, decided: the 95% intervals do not overlap), 'overlap', or 'no interval'."""
    if a is None or b is None:
        return "no interval"
    if a[1] < b[0]:
        return "a" if lower_is_better else "b"
    if b[1] < a[0]:
        return "b" if lower_is_better else "a"
    return "overlap"


def decide_paired(point_a: list[float], point_b: list[float], resampled_a: np.ndarray, resampled_b: np.ndarray,
                  z: float = 1.96) -> dict:
    """A comparison of two methods' FIDs (lower is better), each a list of seeds' values, on paired resamples
    (`resampled_*`: [resamples, seeds], every column's FID on the same draws of the shared prompts and noise).

    The seed means' difference gets a normal 95% interval from the resampled differences, and so does every
    (seed of a, seed of b) pair's difference. Decided only where every pair's interval excludes 0 on the same
    side: every trained model of the winner beats every one of the loser by more than the images' sampling
    noise. The images' noise alone would not decide it (seeds are trained models, not resamples); with 3
    seeds each, the chance that one method's 3 models all rank above the other's when the two methods are the
    same is 1 in 20 (4 seeds: 1 in 70). Returns {outcome ('a' | 'b' | 'undecided'), difference, difference_ci,
    pairs (each pair's interval), pairs_for_a, pairs_for_b, resamples, welch_ci (welch_interval)}."""
    diff = statistics.fmean(point_a) - statistics.fmean(point_b)
    half = z * float(np.std(resampled_a.mean(axis=1) - resampled_b.mean(axis=1), ddof=1))
    pairs = []
    for s, a in enumerate(point_a):
        for t, b in enumerate(point_b):
            h = z * float(np.std(resampled_a[:, s] - resampled_b[:, t], ddof=1))
            pairs.append([a - b - h, a - b + h])
    for_a, for_b = sum(hi < 0 for _, hi in pairs), sum(lo > 0 for lo, _ in pairs)
    outcome = "a" if for_a == len(pairs) else "b" if for_b == len(pairs) else "undecided"
    return {"outcome": outcome, "difference": diff, "difference_ci": [diff - half, diff + half], "pairs": pairs,
            "pairs_for_a": for_a, "pairs_for_b": for_b, "resamples": len(resampled_a),
            "welch_ci": welch_interval(point_a, point_b)}


def welch_interval(a: list[float], b: list[float], level: float = 0.95) -> list[float] | None:
    """Welch's t-interval of mean(a) - mean(b) over the seeds' values (each a trained model's FID, its image
    noise included): a second reading beside the all-pairs rule, which uses the values' sizes where that rule
    uses only their order, and assumes the seeds' spread is roughly normal. None with fewer than 2 seeds a side."""
    if len(a) < 2 or len(b) < 2:
        return None
    if statistics.variance(a) + statistics.variance(b) == 0:  # scipy's interval would be NaN
        diff = statistics.fmean(a) - statistics.fmean(b)
        return [diff, diff]
    from scipy.stats import ttest_ind

    ci = ttest_ind(a, b, equal_var=False).confidence_interval(level)
    return [float(ci.low), float(ci.high)]


def paired_comparisons(eval_dir: Path, labels: dict[str, tuple], resamples: int = 200, seed: int = 0) -> dict:
    """{"<steps>/<other>/<metric>": decide_paired(...)} for each of COMPARISONS whose step count's evaluation
    saved its features (eval_dir/steps<N>/features.npz); the full method is `a`."""
    out = {}
    for steps, other, key in COMPARISONS:
        folder = eval_dir / f"steps{steps}"
        if not (folder / "features.npz").is_file():
            continue
        rows = json.loads((folder / "results.json").read_text())["rows"]
        features = np.load(folder / "features.npz")
        kind = key.removeprefix("fid_")  # whole | patch
        rows_of = lambda method: [i for i, r in enumerate(rows) if labels[r["label"]][:2] == (method, "full")]
        a, b = rows_of("lightning"), rows_of(other)
        if not a or not b or f"reference.{kind}" not in features:
            continue
        sets = [features[f"row{i}.{kind}"] for i in a + b]
        resampled = paired_fid_resamples(sets, features[f"reference.{kind}"], resamples, np.random.default_rng(seed))
        if len(resampled) < 0.9 * resamples:  # as bootstrap_fid: too few images for the features' dimensions
            print(f"{folder}: {len(resampled)} of {resamples} paired draws usable: {steps}/{other}/{key} not decided")
            continue
        out[f"{steps}/{other}/{key}"] = decide_paired([rows[i][key] for i in a], [rows[i][key] for i in b],
                                                      resampled[:, :len(a)], resampled[:, len(a):])
    return out


def paired_text(name_a: str, name_b: str, p: dict) -> str:
    n = len(p["pairs"])
    mean = f"mean difference {_num(p['difference'])}{_interval(p['difference_ci'])}"
    if p.get("welch_ci") is not None:
        mean += f", Welch's t-interval over the seeds{_interval(p['welch_ci'])}"
    if p["outcome"] == "undecided":
        return (f"undecided (paired: {p['pairs_for_a']} of {n} seed pairs favour {name_a} beyond the images' noise, "
                f"{p['pairs_for_b']} {name_b}; {mean})")
    winner, loser = (name_a, name_b) if p["outcome"] == "a" else (name_b, name_a)
    return f"{winner} beats {loser} (decided, paired: all {n} seed pairs; {mean})"


def comparison_text(name_a: str, name_b: str, outcome: str) -> str:
    return {"a": f"{name_a} beats {name_b} (decided)", "b": f"{name_b} beats {name_a} (decided)",
            "overlap": "undecided (intervals overlap)", "no interval": "undecided (no interval)"}[outcome]


def verdict(outcome: str) -> str:
    """A target as a comparison the row must win: met, missed, or undecided."""
    return {"a": "met", "b": "missed", "overlap": "undecided (intervals overlap)",
            "no interval": "undecided (no interval)"}[outcome]


# -- rendering ------------------------------------------------------------------------------------

def _num(v) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def _interval(ci) -> str:
    return "" if ci is None else f" [{_num(ci[0])}, {_num(ci[1])}]"


def cell(s: dict | None, per_seed: bool = False) -> str:
    """mean [comparison interval], with the per-seed values where asked and there are several."""
    if s is None:
        return "n/a"
    seeds = f" ({', '.join(_num(v) for v in s['values'])})" if per_seed and len(s["values"]) > 1 else ""
    return _num(s["mean"]) + _interval(s["interval"]) + seeds


def _scaled(s: dict, factor: float) -> list[float] | None:
    """A teacher's interval times a target's factor: the bar a row's interval must clear."""
    return None if s["interval"] is None else [s["interval"][0] * factor, s["interval"][1] * factor]


def _seed_note(s: dict) -> str:
    return f", seeds {_num(s['range'][0])}-{_num(s['range'][1])}" if len(s["values"]) > 1 else ""


def targets(table: list[dict], paired: dict | None = None) -> list[str]:
    """The evaluation issue's targets, each met / missed / undecided with its numbers; the comparisons of
    methods on their paired differences where `paired` has them (paired_comparisons), else on the intervals."""
    get = lambda m, v, s: next((a for a in table if (a["method"], a["variant"], a["steps"]) == (m, v, s)), None)
    ref = get("teacher", "full", 32)
    if ref is None:
        return ["- no 32-step teacher row: no targets checked"]
    lines = []
    for steps, limit in ((4, 1.10), (1, 1.30)):
        row = get("lightning", "full", steps)
        if row and row["fid_whole"] and ref["fid_whole"]:
            s, t = row["fid_whole"], ref["fid_whole"]
            lines.append(f"- {steps}-step FID-Whole <= {limit:.2f}x the 32-step teacher's: "
                         f"{cell(s)} = {s['mean'] / t['mean']:.2f}x "
                         f"(teacher {cell(t)}{_seed_note(s)}): "
                         f"{verdict(decide(s['interval'], _scaled(t, limit)))}")
    for row in (a for a in table if (a["method"], a["variant"]) == ("lightning", "full")):
        s, t = row["alignment"], ref["alignment"]
        if s and t:
            lines.append(f"- {row['steps']}-step alignment >= 0.97x the teacher's: {cell(s)} = {s['mean'] / t['mean']:.3f}x "
                         f"(teacher {cell(t)}{_seed_note(s)}): "
                         f"{verdict(decide(s['interval'], _scaled(t, 0.97), lower_is_better=False))}")
    for steps, other, key in COMPARISONS:
        a, b = get("lightning", "full", steps), get(other, "full", steps)
        if a and b and a[key] and b[key]:
            outcome = decide(a[key]["interval"], b[key]["interval"])
            text = comparison_text("full method", NAMES[other], outcome)
            p = (paired or {}).get(f"{steps}/{other}/{key}")
            if p is not None:
                union = "overlap" if outcome == "overlap" else "do not overlap" if outcome in ("a", "b") else "none"
                outcome, text = p["outcome"], paired_text("full method", NAMES[other], p) + f"; union intervals: {union}"
            name = {"fid_whole": "FID-Whole", "fid_patch": "FID-Patch"}[key]
            lines.append(f"- {steps} step{'s' if steps > 1 else ''}, {name}: full method {cell(a[key], True)} vs "
                         f"{NAMES[other]} {cell(b[key], True)}: {text}: "
                         f"target {'met' if outcome == 'a' else 'missed' if outcome == 'b' else 'undecided'}")
    row = get("lightning", "full", 1)
    for key, name in (("second_copy_rate", "second copies"), ("hollow_fill_rate", "hollow fills")):
        if row and row[key] and ref[key]:
            s, t = row[key], ref[key]
            lines.append(f"- 1-step {name} <= 2x the 32-step teacher's rate: {cell(s)} vs teacher {cell(t)}"
                         f"{_seed_note(s)}: {verdict(decide(s['interval'], _scaled(t, 2.0)))}")
    return lines


COLUMNS = [("fid_whole", "FID-Whole (per seed)"), ("fid_whole_vs_teacher", "FID-Whole vs teacher"),
           ("fid_patch", "FID-Patch"), ("fid_patch_vs_teacher", "FID-Patch vs teacher"), ("alignment", "alignment"),
           ("second_copy_rate", "second copy"), ("hollow_fill_rate", "hollow fill"),
           ("background_grain", "background std /255"), ("sec_per_image", "s / image")]
RATIOS = ("fid_whole", "fid_patch", "alignment")  # also shown as a multiple of the 32-step teacher's


def render(table: list[dict], args, seconds: float, paired: dict | None = None) -> str:
    """table: aggregate()'s rows; paired: paired_comparisons()."""
    ref = next((a for a in table if (a["method"], a["steps"]) == ("teacher", 32)), None)
    seeds = ",".join(str(s) for s in args.seeds)
    header = ["method", "variant", "steps", "seeds"]
    for key, name in COLUMNS:
        header += [name] + (["x teacher-32"] if key in RATIOS else [])
    lines = ["# The paper's table at shapes scale", "",
             f"Made by `python bench/shapes_table.py {' '.join(sys.argv[1:])}` in {seconds / 60:.0f} min "
             f"(2-core CPU), {args.count} images per row, shapes backend (eval/fid_patch.py). The 2- and 1-step "
             f"rows of each method: seeds {seeds} (the other seeds retrain the 2- and 1-step stages from seed 0's "
             f"4-step student); the 8- and 4-step rows: seed 0 only.", "",
             "Cells: mean over the seeds [95% interval: bootstrap for FIDs and alignment, Wilson for the failure "
             "rates; with several seeds the union of the seeds' intervals, which holds their spread]; FID-Whole also "
             "lists each seed's value. \"vs teacher\": against the 32-step teacher's own samples (CFG "
             f"{json.loads((TEACHER / 'export.json').read_text())['guidance']:g}, same prompts "
             "and noise). A target is decided only where the intervals do not overlap (the row's against the "
             "32-step teacher's times the target's factor). Two methods are compared on paired differences (every "
             "row scores the same prompts and noise against the same real images; one resample of them for all "
             "rows): decided only where every seed of one beats every seed of the other by more than the 95% "
             "interval of that pair's difference. Beside it, not deciding: Welch's t-interval of the seeds' mean "
             "difference, which uses the values' sizes (the rule uses only their order).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for a in table:
        cells = [a["method"], a["variant"], str(a["steps"]), str(len(a["seeds"]))]
        for key, _ in COLUMNS:
            cells.append(cell(a[key], per_seed=key == "fid_whole"))
            if key in RATIOS:
                r = ref and ref[key]
                cells.append("n/a" if not r or not a[key] or not r["mean"] else f"{a[key]['mean'] / r['mean']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", "Targets (the evaluation issue):", *targets(table, paired), ""])


# -- main -----------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="lightning,mse,adv_cond")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "table")
    p.add_argument("--reuse-lightning", type=Path, default=None, help="a finished main-job run to use as the full method")
    p.add_argument("--count", type=int, default=1000, help="images per row")
    p.add_argument("--seeds", default="0,1,2,3",
                   help="training seeds of the 2- and 1-step stages (0: the whole chain's run; must be given)")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    if 0 not in args.seeds:
        p.error("--seeds must include 0: the run that trains each method's whole chain")
    start = time.time()

    first_runs = {}
    shards = first = None
    for method in methods:  # seed 0: every method's whole chain, the first one's stage 1 and shards shared
        out = args.reuse_lightning if method == "lightning" and args.reuse_lightning else args.runs / method
        if first is not None:
            share_stage(first, out)
        train(method, out, shards)
        shards = shards or out / "shards"
        first = first or out
        first_runs[method] = out
    run_dirs = {m: train_seeds(m, out, args.runs, shards, args.seeds) for m, out in first_runs.items()}

    models, labels = models_to_score(run_dirs)
    rows = per_seed_rows(evaluate(models, args.results / "shapes_table_eval", args.count), labels)
    table = aggregate(rows)
    paired = paired_comparisons(args.results / "shapes_table_eval", labels)
    text = render(table, args, time.time() - start, paired)
    (args.results / "shapes_table.json").write_text(json.dumps(
        {"rows": rows, "aggregates": table, "paired": paired, "targets": targets(table, paired)}, indent=1))
    (args.results / "shapes_table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
