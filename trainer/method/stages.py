"""One progressive stage: its phases (`StageConfig.plan`) run in order, each a job of the loop, then the stage's
export is published.

Each phase starts from the previous phase's result (a diffusers UNet folder; LoRA phases also leave their LoRA
file) and ends with one, so an interrupted stage resumes at the phase it was in. A LoRA phase's student is the
base model plus an adapter (`lora.relative_to: base`) that continues the previous LoRA phase's, or the previous
stage's exported LoRA: every stage's LoRA file then applies to the base model, as the released ones do. The
phase after the LoRA phases (the paper's lora+full) starts from the merged result, base + LoRA. With
`relative_to: teacher` the adapter sits on the stage's teacher instead. The teacher stays the stage's teacher
(the previous stage's full export) throughout; the
discriminator is a fresh copy of the base model's encoder at the start of every adversarial phase (the paper
re-initialises D at every stage; the unconditional D' is a different function, so it starts afresh too).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from trainer.config import Config, PhaseConfig
from trainer.export import is_complete, prediction_type_of, read_manifest, write_model_card
from trainer.method.phases import PhaseExport, PhaseStart, run_phase
from trainer.runtime.engines import DistInfo
from trainer.runtime.preemption import preemption_handler, solo


class StageRunner:
    def __init__(self, cfg: Config, info: DistInfo, index: int, teacher_dir: Path, disc_base: Path, base: Path, grids,
                 probe=None):
        self.cfg, self.info = cfg, info
        self.index, self.stage = index, cfg.stages[index]
        self.key = f"stages[{index}]"
        self.teacher_dir, self.disc_base, self.base = Path(teacher_dir), Path(disc_base), Path(base)
        self.grids = grids
        self.probe = probe  # trainer.runtime.probe.Probe, or None (probe.every_samples: 0)
        self.stage_dir = cfg.out_dir / "jobs" / self.stage.name

    def run(self) -> Path:
        """Runs the phases that are not done; returns the stage's export (the full UNet)."""
        export_dir = self.cfg.out_dir / "exports" / self.stage.name
        if is_complete(export_dir):
            return export_dir
        phases = self.stage.plan()
        trains_lora = any(p.train == "lora" for p in phases)
        student_dir, lora_dir = self.teacher_dir, self._previous_lora() if trains_lora else None
        for i, phase in enumerate(phases):
            name = phase.job_name(self.stage.name, i)
            result = self.stage_dir / name / "result"
            if not is_complete(result):
                preemption_handler().check(f"before {name}")
                self._run_phase(phase, name, student_dir, result, lora_dir, self._lora_extract(lora_dir))
            student_dir = result
            if phase.train == "lora":
                lora_dir = result

        def publish() -> None:
            self._publish(student_dir, export_dir)
            if trains_lora:
                self._publish(lora_dir, self.cfg.out_dir / "exports" / f"{self.stage.name}_lora", lora=True)

        solo(f"publishing {self.stage.name}", publish)
        return export_dir

    @property
    def lora_base(self) -> Path:
        """The UNet a LoRA phase adds its adapter to."""
        return self.disc_base if self.stage.lora.relative_to == "base" else self.teacher_dir

    def _previous_lora(self) -> Optional[Path]:
        """The previous stage's exported LoRA, which this stage's adapter continues: only when both are
        relative to the base (a fresh adapter otherwise, e.g. after a full-UNet stage). One recipe has one base
        model, so the previous stage's `relative_to` says it all (a path would break when a run folder moves)."""
        if self.stage.lora.relative_to != "base" or self.index == 0:
            return None
        previous = self.cfg.stages[self.index - 1]
        folder = self.cfg.out_dir / "exports" / f"{previous.name}_lora"
        if not is_complete(folder) or read_manifest(folder).get("lora_relative_to") != "base":
            return None
        return folder  # its rank and alpha equal this stage's (config validation); load_lora_into checks the file

    def _lora_extract(self, lora_dir: Optional[Path]) -> Optional[Path]:
        """The teacher, whose difference from the base a first adapter (relative to the base, continuing
        nothing) starts as; None where the adapter continues one or starts at zero."""
        lora = self.stage.lora
        if lora_dir is None and lora.relative_to == "base" and lora.init_from_teacher \
                and self.teacher_dir.resolve() != self.lora_base.resolve():
            return self.teacher_dir
        return None

    def _run_phase(self, phase: PhaseConfig, name: str, student_dir: Path, result: Path, lora_dir,
                   lora_extract: Optional[Path] = None) -> None:
        cfg, stage = self.cfg, self.stage
        if phase.train == "lora":
            student_dir = self.lora_base  # the student is lora_base + the adapter
        student_pred = prediction_type_of(student_dir, cfg.model.prediction_type)
        out_pred = "sample" if phase.kind == "x0" else student_pred
        start = PhaseStart(
            cfg, self.info, name, self.key, phase,
            student_dir=student_dir, student_pred=student_pred,
            micro_batch=stage.micro_batch, accumulation=stage.accumulation(self.info.world_size, self.key),
            deepspeed=cfg.deepspeed, gradient_checkpointing=cfg.model.gradient_checkpointing,
            ema_decay=stage.ema_decay if phase.train == "full" else 0.0, stage=stage,
            teacher_dir=self.teacher_dir, teacher_pred=prediction_type_of(self.teacher_dir, cfg.model.prediction_type),
            disc_base=self.disc_base, lora_dir=lora_dir, lora_extract_from=lora_extract)
        export = PhaseExport(steps=stage.student_steps, prediction_type=out_pred, base_dir=self.base,
                             notes={"phase": phase.kind, "train": phase.train})
        probe = None if self.probe is None else self.probe.for_phase(
            self.stage_dir, self.teacher_dir, start.teacher_pred, stage.teacher_steps, stage.cfg_scale,
            stage.student_steps, out_pred)
        run_phase(start, self.stage_dir / name, result, export, make_grid=self.grids.bind(stage.student_steps, out_pred),
                  probe=probe)

    def objective_label(self) -> str:
        return "+".join(p.kind for p in self.stage.phases) if self.stage.phases else self.stage.objective

    # -- publishing -----------------------------------------------------------------------------

    def _publish(self, result: Path, export_dir: Path, lora: bool = False) -> None:
        """The stage's export: the last phase's result under the stage's name (plus the LoRA file)."""
        tmp = export_dir.with_name(export_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(result, tmp, symlinks=True)
        manifest = read_manifest(tmp)
        manifest.update(stage=self.stage.name, variant="lora" if lora else "full", teacher=str(self.teacher_dir),
                        teacher_steps=self.stage.teacher_steps, objective=self.objective_label())
        if lora:
            # the model the LoRA file applies to, as the recipe named it
            manifest.update(lora_base=str(self.lora_base), lora_relative_to=self.stage.lora.relative_to)
        if self.cfg.export.single_files and (tmp / "vae").exists() and (tmp / "text_encoder").exists():
            manifest["single_files"] = self._single_files(tmp, lora)
        (tmp / "export.json").write_text(json.dumps(manifest, indent=1))
        write_model_card(tmp)
        if export_dir.exists():
            shutil.rmtree(export_dir)
        tmp.rename(export_dir)

    def _single_files(self, folder: Path, lora: bool) -> list[str]:
        """The files ComfyUI and A1111 load (an SDXL or SD 1.5 base; the toy has no such layout): the LoRA in
        kohya's key layout, or the whole model (UNet, VAE, text encoders) as one original-layout checkpoint."""
        from trainer.formats import detect_family, lora_to_kohya, write_single_file

        family = detect_family(folder)
        if lora:
            out = folder / "lora" / f"{self.stage.name}_lora_kohya.safetensors"
            lora_to_kohya(folder / "lora" / "pytorch_lora_weights.safetensors", out, family=family)
        else:
            out = folder / f"{self.stage.name}.safetensors"
            write_single_file(folder, out, family=family)
        return [str(out.relative_to(folder))]

