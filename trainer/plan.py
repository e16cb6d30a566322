"""`python -m trainer.run --config ... --print-plan`: the jobs and phases a recipe expands into, as a table.

Each stage's short form (objective + variant) becomes explicit phases here (`StageConfig.plan`); a recipe may
copy a printed stage into `stages[N].phases` and edit it.
"""
from __future__ import annotations

import math

from trainer.config import Config, OptimConfig


def _optim(optim: OptimConfig) -> str:
    text = f"lr {optim.lr:g} betas {optim.betas[0]:g},{optim.betas[1]:g}"
    if optim.grad_clip:
        text += f" clip {optim.grad_clip:g}"
    if optim.decay != "constant" or optim.warmup_steps:
        text += f" {optim.decay}" + (f" warmup {optim.warmup_steps}" if optim.warmup_steps else "")
    return text


def plan_rows(cfg: Config, world_size: int) -> list[dict]:
    rows = []
    tc = cfg.teacher
    if not cfg.teacher.init and tc.samples > 0:
        batch = tc.micro_batch * tc.accumulation(world_size) * world_size
        rows.append({"job": "teacher", "kind": "denoise", "trains": "full", "samples": tc.samples,
                     "steps": math.ceil(tc.samples / batch), "batch": batch, "student": _optim(tc.optim), "disc": "-",
                     "steps_in_out": f"- -> {tc.sample_steps}"})
    for i, stage in enumerate(cfg.stages):
        batch = stage.micro_batch * stage.accumulation(world_size, f"stages[{i}]") * world_size
        for j, phase in enumerate(stage.plan()):
            disc = "-"
            if phase.disc is not None:
                d = phase.disc
                disc = ("conditional " if phase.kind == "adv_cond" else "unconditional ") + _optim(d.optim)
                if d.t_star:
                    disc += f"; t* {d.t_star} weights {d.t_star_weights or [1] * len(d.t_star)}"
                    if d.t_star_late_weights:
                        disc += f" then {d.t_star_late_weights}"
                if d.warmup_samples:
                    disc += f"; D alone for {d.warmup_samples} samples"
                if d.steps_per_student_step > 1:
                    disc += f"; {d.steps_per_student_step} D steps per student step"
            rows.append({"job": phase.job_name(stage.name, j), "kind": phase.kind, "trains": phase.train,
                         "samples": phase.samples, "steps": math.ceil(phase.samples / batch), "batch": batch,
                         "student": _optim(phase.optim), "disc": disc,
                         "steps_in_out": f"{stage.teacher_steps} -> {stage.student_steps}"})
    return rows


def format_plan(cfg: Config, world_size: int = 1) -> str:
    rows = plan_rows(cfg, world_size)
    columns = [("job", "job"), ("kind", "kind"), ("trains", "trains"), ("steps_in_out", "teacher -> student steps"),
               ("samples", "samples"), ("batch", "global batch"), ("steps", "optimizer steps"),
               ("student", "student optimizer"), ("disc", "discriminator")]
    widths = {key: max(len(title), *(len(str(r[key])) for r in rows)) if rows else len(title) for key, title in columns}
    line = lambda values: "  ".join(str(v).ljust(widths[k]) for (k, _), v in zip(columns, values)).rstrip()
    out = [f"{cfg.source}: {len(rows)} jobs and phases on {world_size} rank(s)",
           line([title for _, title in columns]), line(["-" * widths[k] for k, _ in columns])]
    out += [line([r[k] for k, _ in columns]) for r in rows]
    return "\n".join(out)
