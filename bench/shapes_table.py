"""The paper's table at shapes scale: teacher, MSE-only progression, conditional-only, and the full method
(conditional then unconditional; full UNet and LoRA), scored with eval/fid_patch.py.

    python bench/shapes_table.py                       # everything: trains what is missing, then evaluates
    python bench/shapes_table.py --methods lightning,mse --count 1000   # less noisy, ~3x the evaluation time

Runs go to --runs (default runs/table/<method>); a run already complete is reused (the trainer skips finished
jobs), and `--reuse-lightning runs/shapes` takes the main job's run as the full method's. Writes
bench/results/shapes_table.{md,json}: one row per (method, variant, steps) with fid_whole, fid_patch,
alignment, sec_per_image, and the targets of the evaluation issue checked against the 32-step teacher.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/shapes_table.py` from a clone, and `import bench.shapes_table` in tests
    sys.path.insert(0, str(ROOT))
from trainer.export import is_complete  # noqa: E402

CONFIG = "configs/shapes.yaml"
ADV_STAGES = (1, 2, 3, 4)  # indices of the 32->8, 8->4, 4->2, 2->1 stages in configs/shapes.yaml
SHARED_STAGE = "stage1_32"  # the 128->32 MSE stage (CFG teacher) is the same for every method: trained once

# The table's recipe is the main job's with an 8x longer first stage (38,400 samples, cosine decay): the
# main job's stage 1 does not distil the teacher's CFG, and every later stage inherits that gap
# (measured: bench/README.md#measurements-behind-defaults).
TABLE_OVERRIDES = ["stages.0.samples=38400", "stages.0.optim.decay=cosine"]
STEPS = {"stage2_8": 8, "stage3_4": 4, "stage4_2": 2, "stage5_1": 1}

# How each method differs from the recipe (the full method is the recipe itself).
OVERRIDES = {
    "lightning": [],
    "mse": [f"stages.{i}.{k}={v}" for i in ADV_STAGES for k, v in (("objective", "mse"), ("variant", "full"))],
    # conditional-only: the 8-, 4- and 2-step stages without their unconditional phases; the 1-step stage is
    # the recipe's (its adversarial phase is conditional already)
    "adv_cond": [f"stages.{i}.{k}={v}" for i in ADV_STAGES[:-1] for k, v in (("objective", "adv_cond"), ("variant", "full"))],
}


def run(cmd: list[str]) -> None:
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def share_stage(first: Path, out: Path) -> None:
    """Give `out` the first method's finished shared stage, which the trainer then skips."""
    src, dst = first / "exports" / SHARED_STAGE, out / "exports" / SHARED_STAGE
    if is_complete(dst):
        return
    if not is_complete(src):
        raise FileNotFoundError(f"{src}: the shared stage did not finish")
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)


def train(method: str, out: Path, shards: Path | None) -> None:
    cmd = [sys.executable, "-m", "trainer.run", "--config", CONFIG, "--set", f"run.out_dir={out}"]
    if shards is not None:
        cmd += ["--set", f"data.shards={shards}"]
    for o in TABLE_OVERRIDES + OVERRIDES[method]:
        cmd += ["--set", o]
    run(cmd)


def evaluate(models: list[tuple], out: Path, count: int) -> list[dict]:
    """models: (label, model folder, steps, guidance[, LoRA export to load onto the model])."""
    # fid_patch.py scores every model at every --steps it is given: one call per step count
    rows = []
    for steps in sorted({m[2] for m in models}, reverse=True):
        sub = [m for m in models if m[2] == steps]
        sub_out = out / f"steps{steps}"
        sub_cmd = [sys.executable, "eval/fid_patch.py", "--reference", "shapes", "--backend", "shapes",
                   "--count", str(count), "--out", str(sub_out), "--no-tensorboard", "--steps", str(steps)]
        for label, path, _, guidance, *lora in sub:
            sub_cmd += ["--model", str(path), "--label", label, "--guidance", str(guidance),
                        "--lora", str(lora[0]) if lora else "none"]
        run(sub_cmd)
        rows += json.loads((sub_out / "results.json").read_text())["rows"]
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="lightning,mse,adv_cond")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "table")
    p.add_argument("--reuse-lightning", type=Path, default=None, help="a finished main-job run to use as the full method")
    p.add_argument("--count", type=int, default=300, help="images per row (every number in bench/README.md used 300)")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    start = time.time()

    run_dirs = {}
    shards = first = None
    for method in methods:
        out = args.reuse_lightning if method == "lightning" and args.reuse_lightning else args.runs / method
        if first is not None:
            share_stage(first, out)
        train(method, out, shards)
        shards = shards or out / "shards"
        first = first or out
        run_dirs[method] = out

    teacher = ROOT / "assets" / "shapes_teacher"
    models = [("teacher", teacher, 128, 3.0), ("teacher", teacher, 32, 3.0)]
    labels = {}
    for method, out in run_dirs.items():
        for stage, steps in STEPS.items():
            label = f"{method}/full"
            models.append((label, out / "exports" / stage, steps, 1.0))
            labels[label] = (method, "full")
            lora = out / "exports" / f"{stage}_lora"
            if (lora / "export.json").is_file():  # as users apply it: the LoRA file on the base model, by diffusers
                base = json.loads((lora / "export.json").read_text()).get("lora_base", str(teacher))
                models.append((f"{method}/lora", Path(base), steps, 1.0, lora))
                labels[f"{method}/lora"] = (method, "lora")
    raw = evaluate(models, args.results / "shapes_table_eval", args.count)

    table = []
    for r in raw:
        method, variant = ("teacher", "full") if r["label"] == "teacher" else labels[r["label"]]
        table.append({"method": method, "variant": variant, "steps": r["steps"], "fid_whole": r.get("fid_whole"),
                      "fid_patch": r.get("fid_patch"), "alignment": r.get("alignment"),
                      "sec_per_image": r.get("sec_per_image"), "model": r["model"]})
    (args.results / "shapes_table.json").write_text(json.dumps(table, indent=1))
    (args.results / "shapes_table.md").write_text(render(table, args, time.time() - start))
    print((args.results / "shapes_table.md").read_text())
    return 0


def render(table: list[dict], args, seconds: float) -> str:
    ref = next(r for r in table if r["method"] == "teacher" and r["steps"] == 32)
    lines = ["# The paper's table at shapes scale", "",
             f"Made by `python bench/shapes_table.py {' '.join(sys.argv[1:])}` in {seconds / 60:.0f} min "
             f"(2-core CPU), {args.count} images per row, shapes backend (eval/fid_patch.py).", "",
             "| method | variant | steps | FID-Whole | x teacher-32 | FID-Patch | x teacher-32 | alignment | x teacher-32 | s / image |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "n/a" if v is None else f"{v:.3g}"
    ratio = lambda a, b: "n/a" if a is None or not b else f"{a / b:.2f}"
    for r in sorted(table, key=lambda r: (r["method"] != "teacher", r["method"], r["variant"], -r["steps"])):
        lines.append(f"| {r['method']} | {r['variant']} | {r['steps']} | {fmt(r['fid_whole'])} | "
                     f"{ratio(r['fid_whole'], ref['fid_whole'])} | {fmt(r['fid_patch'])} | "
                     f"{ratio(r['fid_patch'], ref['fid_patch'])} | {fmt(r['alignment'])} | "
                     f"{ratio(r['alignment'], ref['alignment'])} | {fmt(r['sec_per_image'])} |")
    get = lambda m, v, s: next((r for r in table if (r["method"], r["variant"], r["steps"]) == (m, v, s)), None)
    checks = []
    for steps, limit in ((4, 1.10), (1, 1.30)):
        row = get("lightning", "full", steps)
        if row:
            x = row["fid_whole"] / ref["fid_whole"]
            checks.append(f"- {steps}-step FID-Whole {x:.2f}x the 32-step teacher's (target <= {limit}x): "
                          f"{'met' if x <= limit else 'missed'}")
    for steps in (2, 1):
        a, b = get("lightning", "full", steps), get("mse", "full", steps)
        if a and b:
            checks.append(f"- {steps} step{'s' if steps > 1 else ''}: full method FID-Whole {a['fid_whole']:.3g} vs MSE-only {b['fid_whole']:.3g}: "
                          f"{'beats' if a['fid_whole'] < b['fid_whole'] else 'does not beat'} it")
    worst = min((r["alignment"] for r in table if r["method"] == "lightning" and r["alignment"] is not None), default=None)
    if worst is not None:
        checks.append(f"- lowest full-method alignment {worst:.3g} = {worst / ref['alignment']:.2f}x the teacher's "
                      f"(target >= 0.95x): {'met' if worst >= 0.95 * ref['alignment'] else 'missed'}")
    return "\n".join(lines + ["", "Targets (the evaluation issue):", *checks, ""])


if __name__ == "__main__":
    sys.exit(main())
