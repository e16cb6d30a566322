"""How much work each adversarial stage had, and whether its discriminator saw it.

For every stage that distils n teacher moves into one student move, and for every timestep t of the
student's grid: from x_t (a shard sample noised to t), the teacher's n-move jump lands at `real`, the
student's one move at `fake`. The landing gap is |fake - real| / |real - x_t|: how far the student lands
from its teacher, relative to the length of the move. It is measured for the student that enters the
stage (the previous stage's export: what the stage starts from) and for the one that leaves it (the
stage's export); a stage had work to do where the first is large, and did it where the second is smaller.

Beside it, each phase's discriminator accuracy from the run's metrics (mean of (real judged real + fake
judged fake) / 2 over the first and last fifth of the logged steps): 0.5 is a D that sees nothing.

With --curvature the same measure is taken of one model against itself: its one move against its own two
half-moves, at 8, 4, 2 and 1 steps. That is how curved the model's trajectories are, and so how much work
any distillation of it has; it is reported for all samples and separately by whether the caption names the
shape's position (data.shapes.position_in_caption < 1 leaves it out of some).

    python bench/landing_gap.py --run runs/shapes [--count 128] [--out bench/results/landing_gap.md]
    python bench/landing_gap.py --run runs/shapes --curvature assets/shapes_teacher [--out ...]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/landing_gap.py` from a clone
    sys.path.insert(0, str(ROOT))

from trainer.config import load_config  # noqa: E402
from trainer.data.loader import collate, first_samples  # noqa: E402
from trainer.export import prediction_type_of  # noqa: E402
from trainer.method.methods import implied_x0  # noqa: E402
from trainer.method.models import Conditioning, guided_denoiser, load_unet, unet_forward  # noqa: E402
from trainer.method.schedule import (NoiseSchedule, move, next_timestep, teacher_jump,  # noqa: E402
                                     trailing_timesteps)

NOISE_SEED = 1234


def shard_samples(shard_dir: Path, count: int, captions: list | None = None) -> tuple[torch.Tensor, Conditioning]:
    """The first `count` samples of the shards: latents and their text conditioning (float32); their
    captions are appended to `captions` when given."""
    rows = first_samples(shard_dir, count)
    if len(rows) < count:
        raise ValueError(f"--count {count}: the shards in {shard_dir} hold {len(rows)} samples")
    batch = collate(rows)
    if captions is not None:
        captions += batch["caption"]
    return batch["latent"].float(), Conditioning.from_batch(batch).to(dtype=torch.float32)


def landing_gaps(student_dir: Path, teacher_dir: Path, schedule: NoiseSchedule, latents: torch.Tensor,
                 cond: Conditioning, student_steps: int, teacher_steps: int, fallback_pred: str) -> dict[int, float]:
    """{t: mean over samples of |student move - teacher jump| / |teacher jump - x_t|} on the student's grid."""
    per_sample = sample_gaps(student_dir, teacher_dir, schedule, latents, cond, student_steps, teacher_steps,
                             fallback_pred)
    return {t: float(g["gap"].mean()) for t, g in per_sample.items()}


@torch.no_grad()
def sample_gaps(student_dir: Path, teacher_dir: Path, schedule: NoiseSchedule, latents: torch.Tensor,
                cond: Conditioning, student_steps: int, teacher_steps: int, fallback_pred: str) -> dict[int, dict]:
    """{t: {"gap": every sample's landing gap [N], "x0_rms": the RMS difference [N] between the x0 that the two
    landings imply (in the latent's units; the toy's latent is its pixels in [-1, 1])}} on the student's grid.
    The gap is relative to a move that is mostly noise at high t; x0_rms shows what the image would lose."""
    student = load_unet(student_dir).eval()
    teacher = student if Path(teacher_dir) == Path(student_dir) else load_unet(teacher_dir).eval()
    student_pred = prediction_type_of(student_dir, fallback_pred)
    teacher_pred = prediction_type_of(teacher_dir, fallback_pred)
    gen = torch.Generator().manual_seed(NOISE_SEED)
    noise = torch.randn(latents.shape, generator=gen)
    gaps = {}
    for t_value in trailing_timesteps(student_steps, schedule.num_train_timesteps):
        t = torch.full((latents.shape[0],), t_value, dtype=torch.long)
        t_next = next_timestep(t, student_steps, schedule.num_train_timesteps)
        x_t = schedule.add_noise(latents, noise, t)
        real = teacher_jump(schedule, guided_denoiser(teacher, cond, 1.0), x_t, t, teacher_steps // student_steps,
                            teacher_steps, teacher_pred)
        fake = move(schedule, unet_forward(student, x_t, t, cond), x_t, t, t_next, student_pred)
        gap = (fake - real).flatten(1).norm(dim=1) / (real - x_t).flatten(1).norm(dim=1)
        x0_diff = implied_x0(schedule, x_t, fake, t, t_next) - implied_x0(schedule, x_t, real, t, t_next)
        gaps[t_value] = {"gap": gap, "x0_rms": x0_diff.flatten(1).pow(2).mean(dim=1).sqrt()}
    return gaps


def disc_accuracy(job_dir: Path) -> list[dict]:
    """Per phase of a stage: D's mean accuracy over the first and the last fifth of its logged steps."""
    rows = []
    for metrics in sorted(job_dir.glob("*/tb/metrics.jsonl")):
        phase = metrics.parent.parent.name
        logs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        acc = [(r[f"{phase}/d_acc_real"] + r[f"{phase}/d_acc_fake"]) / 2 for r in logs
               if f"{phase}/d_acc_real" in r]
        if not acc:
            continue
        fifth = max(1, len(acc) // 5)
        rows.append({"phase": phase, "first": float(np.mean(acc[:fifth])), "last": float(np.mean(acc[-fifth:])),
                     "logged": len(acc)})
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished run's out_dir (holds config.yaml)")
    parser.add_argument("--count", type=int, default=128, help="shard samples per timestep")
    parser.add_argument("--curvature", type=Path, metavar="MODEL",
                        help="instead: MODEL's one move against its own two half-moves at 8, 4, 2 and 1 steps")
    parser.add_argument("--out", type=Path, help="write the table here (.md) and beside it the .json")
    args = parser.parse_args(argv)

    cfg = load_config(args.run / "config.yaml", check_paths=False)
    schedule = NoiseSchedule.from_config(cfg.schedule)
    captions: list[str] = []
    latents, cond = shard_samples(args.run / "shards", args.count, captions)
    if args.curvature:
        return curvature_report(args, cfg, schedule, latents, cond, captions)
    exports = args.run / "exports"
    result = {"run": str(args.run), "count": args.count, "stages": []}
    previous = None
    for stage in cfg.stages:
        after = exports / stage.name
        if stage.objective != "mse" and previous is not None and after.is_dir():
            fallback = cfg.model.prediction_type
            entry = {"stage": stage.name, "student_steps": stage.student_steps, "teacher_steps": stage.teacher_steps,
                     "before": landing_gaps(previous, previous, schedule, latents, cond, stage.student_steps,
                                            stage.teacher_steps, fallback),
                     "after": landing_gaps(after, previous, schedule, latents, cond, stage.student_steps,
                                           stage.teacher_steps, fallback),
                     "disc": disc_accuracy(args.run / "jobs" / stage.name)}
            result["stages"].append(entry)
            print(f"{stage.name}: gap before {np.mean(list(entry['before'].values())):.3f} "
                  f"after {np.mean(list(entry['after'].values())):.3f}", flush=True)
        previous = after

    return publish(render(result), result, args.out)


def curvature_report(args, cfg, schedule, latents, cond, captions) -> dict:
    named = torch.tensor([" at " in c for c in captions])
    result = {"model": str(args.curvature), "run": str(args.run), "count": args.count,
              "named_position": int(named.sum()), "steps": {}}
    for steps in (8, 4, 2, 1):
        gaps = sample_gaps(args.curvature, args.curvature, schedule, latents, cond, steps, 2 * steps,
                           cfg.model.prediction_type)
        row = {}
        for measure in ("gap", "x0_rms"):
            every = torch.stack([g[measure] for g in gaps.values()])  # [timesteps, N]
            suffix = "" if measure == "gap" else " x0_rms"
            row["all" + suffix] = float(every.mean())
            for name, mask in (("position named", named), ("position left out", ~named)):
                row[name + suffix] = float(every[:, mask].mean()) if mask.any() else None
        result["steps"][steps] = row
        print(f"{steps} steps: {row}", flush=True)
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    lines = [f"# Trajectory curvature of {args.curvature} ({args.count} samples of {args.run / 'shards'}, "
             f"{result['named_position']} with the position in the caption)", "",
             "One move against the model's own two half-moves: |difference| / |the two moves' length| (gap), and "
             "the RMS difference of the x0 the two landings imply, x 127.5 (x0 RMS: /255 for the toy's pixel "
             "latent); means over the grid's timesteps and the samples.", "",
             "| steps | gap: all | named | left out | x0 RMS: all | named | left out |", "|---|---|---|---|---|---|---|"]
    for steps, row in result["steps"].items():
        x0 = lambda key: "-" if row[key] is None else f"{127.5 * row[key]:.1f}"
        lines.append(f"| {steps} | {fmt(row['all'])} | {fmt(row['position named'])} | {fmt(row['position left out'])} "
                     f"| {x0('all x0_rms')} | {x0('position named x0_rms')} | {x0('position left out x0_rms')} |")
    return publish("\n".join(lines) + "\n", result, args.out)


def publish(table: str, result: dict, out: Path | None) -> dict:
    """Prints the table; with `out`, writes it there and the result beside it as .json."""
    print(table)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table)
        out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def render(result: dict) -> str:
    lines = [f"# Landing gap and D's accuracy per adversarial stage ({result['count']} shard samples per timestep)",
             "", "Gap: |student's move - teacher's n-move jump| / |the jump's length|, per timestep of the student's "
             "grid; before = the student entering the stage, after = its export.", "",
             "| stage | moves distilled | timestep | gap before | gap after |", "|---|---|---|---|---|"]
    for s in result["stages"]:
        moves = s["teacher_steps"] // s["student_steps"]
        for t in s["before"]:
            lines.append(f"| {s['stage']} | {moves} -> 1 | {t} | {s['before'][t]:.3f} | {s['after'][t]:.3f} |")
        lines.append(f"| {s['stage']} | | **mean** | **{np.mean(list(s['before'].values())):.3f}** | "
                     f"**{np.mean(list(s['after'].values())):.3f}** |")
    lines += ["", "D's accuracy ((real judged real + fake judged fake) / 2; 0.5 = blind), first and last fifth of each "
              "phase's logged steps:", "", "| phase | first | last | logged steps |", "|---|---|---|---|"]
    for s in result["stages"]:
        for d in s["disc"]:
            lines.append(f"| {d['phase']} | {d['first']:.3f} | {d['last']:.3f} | {d['logged']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
