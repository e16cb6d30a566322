"""One progressive stage as a sequence of phases, each a job of the loop.

A stage's objective and variant expand into phases (`stage_phases`):
    mse                          -> [mse]
    adv_cond / adv_uncond        -> [adv_cond] / [adv_uncond]
    adv_cond+adv_uncond          -> [adv_cond, adv_uncond]
    variant lora                 -> the same phases, each training a LoRA
    variant lora+full (paper)    -> LoRA phases, merge, then [adv_uncond] on the full UNet
    x0_samples > 0 (one step)    -> [x0] first: the network learns to predict x0 directly

Each phase starts from the previous phase's result (a diffusers UNet folder; LoRA phases also leave
their LoRA file) and ends with one, so an interrupted stage resumes at the phase it was in. The
teacher stays the stage's teacher throughout; the discriminator is a fresh copy of the base model's
encoder at the start of every adversarial phase (the paper re-initialises D at every stage; the
unconditional D' is a different function, so it starts afresh too).
"""
from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from trainer.runtime.preemption import preemption_handler, solo
from trainer.runtime.checkpoint import CheckpointManager, fp32_weights
from trainer.config import Config, OptimConfig, StageConfig
from trainer.method.discriminator import ENCODER_PARTS, discriminator_from_unet
from trainer.runtime.engines import DistInfo, build_ds_config, device, make_engine, release_engines
from trainer.export import export_unet, is_complete, prediction_type_of, read_manifest
from trainer.runtime.loop import Job, train
from trainer.method.models import freeze, frozen_copy, load_unet
from trainer.method.objectives import AdversarialObjective, MSEDistillObjective, X0Objective
from trainer.method.schedule import NoiseSchedule


@dataclass(frozen=True)
class Phase:
    kind: str  # mse | x0 | adv_cond | adv_uncond
    train: str  # full | lora
    samples: int

    def job_name(self, stage: str, index: int) -> str:
        return f"{stage}.{index}_{self.kind}" + ("_lora" if self.train == "lora" else "")


def stage_phases(stage: StageConfig) -> list[Phase]:
    phases = [Phase("x0", "full", stage.x0_samples)] if stage.x0_samples else []
    train = "lora" if stage.variant in ("lora", "lora+full") else "full"
    kinds = stage.objective.split("+")
    phases += [Phase(kind, train, stage.samples) for kind in kinds]
    if stage.variant == "lora+full":
        phases.append(Phase("adv_uncond", "full", stage.full_samples or stage.samples))
    return phases


def phase_optim(stage: StageConfig, phase: Phase) -> OptimConfig:
    """The student's optimizer in `phase`: the x0 conversion and LoRA phases have their own; a full-UNet MSE
    phase uses mse_optim when the stage sets one; everything else the stage's optim."""
    if phase.kind == "x0":
        return stage.x0_optim
    if phase.train == "lora":
        return stage.lora.optim
    if phase.kind == "mse" and stage.mse_optim is not None:
        return stage.mse_optim
    return stage.optim


def phase_disc_optim(stage: StageConfig, phase: Phase) -> OptimConfig:
    """D's optimizer in an adversarial phase: beside a LoRA student disc.lora_optim when set (the paper's
    learning rates follow what the student trains: 1e-6 with a LoRA, 5e-7 with the full UNet)."""
    if phase.train == "lora" and stage.disc.lora_optim is not None:
        return stage.disc.lora_optim
    return stage.disc.optim


def x0_head_from_v(unet, schedule: NoiseSchedule) -> None:
    """Start the one-step x0 conversion close to where it must end. A v-prediction network's x0 at t = T is
    alpha_T x_t - sigma_T v ~ -sigma_T v (alpha_T ~ 0.07 on SDXL's schedule), so scaling the output
    convolution by -sigma_T makes the copy predict x0 at T up to the small alpha_T x_t term, which the
    phase then learns (measured on the toy: x0 loss 2.0 -> 1.1 in 100 steps without this, 0.003 -> 0.001
    with it). An epsilon network's x0 at T needs x_t / alpha_T (~15 x_t): no such shortcut; that copy
    learns the conversion from its epsilon output, as the paper does."""
    _, sigma = schedule.alpha_sigma(torch.tensor([schedule.num_train_timesteps - 1]))
    with torch.no_grad():
        unet.conv_out.weight.mul_(-float(sigma))
        unet.conv_out.bias.mul_(-float(sigma))


class StageRunner:
    def __init__(self, cfg: Config, info: DistInfo, index: int, teacher_dir: Path, disc_base: Path, base: Path, grids):
        self.cfg, self.info = cfg, info
        self.stage = cfg.stages[index]
        self.key = f"stages[{index}]"
        self.teacher_dir, self.disc_base, self.base = Path(teacher_dir), Path(disc_base), Path(base)
        self.grids = grids
        self.schedule = NoiseSchedule.from_config(cfg.schedule)
        self.stage_dir = cfg.out_dir / "jobs" / self.stage.name

    def run(self) -> Path:
        """Runs the phases that are not done; returns the stage's export (the full UNet)."""
        export_dir = self.cfg.out_dir / "exports" / self.stage.name
        if is_complete(export_dir):
            return export_dir
        student_dir, lora_dir = self.teacher_dir, None
        for i, phase in enumerate(stage_phases(self.stage)):
            name = phase.job_name(self.stage.name, i)
            result = self.stage_dir / name / "result"
            if not is_complete(result):
                preemption_handler().check(f"before {name}")
                self._run_phase(phase, name, student_dir, result, lora_dir)
            student_dir = result
            if phase.train == "lora":
                lora_dir = result

        def publish() -> None:
            self._publish(student_dir, export_dir)
            if lora_dir is not None:
                self._publish(lora_dir, self.cfg.out_dir / "exports" / f"{self.stage.name}_lora", lora=True)

        solo(f"publishing {self.stage.name}", publish)
        return export_dir

    # -- one phase ------------------------------------------------------------------------------

    def _run_phase(self, phase: Phase, name: str, student_dir: Path, result: Path, lora_dir: Optional[Path]) -> None:
        """Trains the phase, frees its engines and networks, then rank 0 exports its result."""
        student_pred = prediction_type_of(student_dir, self.cfg.model.prediction_type)
        out_pred = "sample" if phase.kind == "x0" else student_pred
        final, unet_config = self._train_phase(phase, name, student_dir, lora_dir, student_pred, out_pred)
        release_engines()
        ema_decay = self.stage.ema_decay if phase.train == "full" else 0.0

        def export() -> None:
            # the average when there is one (the ZeRO consolidation of the last iterate would go unused)
            if ema_decay:
                weights = CheckpointManager.load_tensors(final, "ema.safetensors")
            else:
                start = time.perf_counter()
                weights = fp32_weights(final, "student")
                print(f"[rank 0] consolidating {name}'s ZeRO partitions: {time.perf_counter() - start:.1f} s", flush=True)
            extra = None
            if phase.train == "lora":
                weights, extra = self._lora_result(weights)
            export_unet(weights, unet_config, result, base_dir=self.base, schedule=self.cfg.schedule,
                        prediction_type=out_pred, steps=self.stage.student_steps, stage=name,
                        notes={"phase": phase.kind, "train": phase.train}, extra=extra)

        solo(f"exporting {name}", export)

    def _train_phase(self, phase: Phase, name: str, student_dir: Path, lora_dir: Optional[Path],
                     student_pred: str, out_pred: str) -> tuple[Path, dict]:
        """Builds the phase's engines and objective and trains it; returns the final checkpoint and the
        student's UNet config. The engines are destroyed on the way out, whatever happens."""
        cfg, stage, info = self.cfg, self.stage, self.info
        dev = device()
        if info.is_main and dev.type == "cuda":
            print(f"[{name}] GPU memory at phase start: {torch.cuda.memory_allocated(dev) / 2**30:.2f} GiB allocated, "
                  f"{torch.cuda.memory_reserved(dev) / 2**30:.2f} GiB reserved", flush=True)
        student, frozen, disc = self._phase_networks(phase, student_dir, lora_dir, dev)
        if phase.kind == "x0" and student_pred == "v_prediction" and stage.student_steps == 1:
            x0_head_from_v(student, self.schedule)
        unet_config = dict(student.config)
        if cfg.model.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        if disc is not None and stage.disc.gradient_checkpointing:
            disc.enable_gradient_checkpointing()
        accum = stage.accumulation(info.world_size, self.key)
        ds = lambda o: build_ds_config(cfg.deepspeed, stage.micro_batch, accum, info.world_size, o, self.key)
        optim = phase_optim(stage, phase)
        engines = {"student": make_engine(student, ds(optim))}
        del student
        try:
            if disc is not None:
                engines["disc"] = make_engine(disc, ds(phase_disc_optim(stage, phase)))
                del disc
            objective = self._objective(phase, engines, frozen, student_pred, accum)
            job = Job(name, self.stage_dir / name, phase.samples, stage.micro_batch, accum, optim, objective,
                      make_grid=self.grids.bind(stage.student_steps, out_pred),
                      ema_decay=stage.ema_decay if phase.train == "full" else 0.0,
                      other_optims={"disc": phase_disc_optim(stage, phase)} if "disc" in engines else {})
            return train(job, cfg, info), unet_config
        finally:
            for engine in engines.values():
                engine.destroy()

    def _phase_networks(self, phase: Phase, student_dir: Path, lora_dir: Optional[Path], dev: torch.device):
        """(student, frozen network, D or None). Each folder is read from disk once: the frozen network (the
        teacher, or the x0 phase's copy of the student) and D's encoder come from a module already read in
        this phase when they are the same folder's; otherwise D reads only the base model's encoder."""
        # A LoRA phase's student is the teacher plus this stage's adapter; any other starts from student_dir.
        source = self.teacher_dir if phase.train == "lora" else student_dir
        plain = load_unet(source)
        in_memory = {source: plain}
        # the x0 phase: the network whose x0 the student learns to output directly is its own start
        frozen_net = plain if phase.kind == "x0" else _read_once(in_memory, self.teacher_dir)
        disc = None
        if phase.kind in ("adv_cond", "adv_uncond"):  # D copies its encoder before the modules below change
            disc = discriminator_from_unet(_read_once(in_memory, self.disc_base, only=ENCODER_PARTS),
                                           conditional=phase.kind == "adv_cond", head_blocks=self.stage.disc.head_blocks,
                                           head_channels=self.stage.disc.head_channels, seed=self.cfg.run.seed)
        frozen = frozen_copy(plain, dev) if frozen_net is plain else freeze(frozen_net).to(dev)
        student = self._lora_unet(lora_dir, plain) if phase.train == "lora" else plain
        return student, frozen, disc

    def _objective(self, phase: Phase, engines: dict, frozen: torch.nn.Module, student_pred: str, accum: int):
        stage = self.stage
        if phase.kind == "x0":
            return X0Objective(engines["student"], frozen, self.schedule, student_pred, stage.student_steps)
        teacher_pred = prediction_type_of(self.teacher_dir, self.cfg.model.prediction_type)
        if phase.kind == "mse":
            return MSEDistillObjective(engines["student"], frozen, self.schedule, student_pred, teacher_pred,
                                       stage.student_steps, stage.teacher_steps, stage.cfg_scale,
                                       loss_space=stage.mse_space)
        return PhasedAdversarial(
            AdversarialObjective(engines["student"], engines["disc"], frozen, self.schedule, student_pred,
                                 teacher_pred, stage.student_steps, stage.teacher_steps,
                                 conditional=phase.kind == "adv_cond", t_star=stage.disc.t_star,
                                 t_star_weights=stage.disc.t_star_weights, mse_weight=stage.mse_weight),
            warmup_steps=stage.disc.warmup_samples // (stage.micro_batch * accum * self.info.world_size),
            late_weights=stage.disc.t_star_late_weights)

    def _lora_unet(self, lora_dir: Optional[Path], teacher_unet) -> torch.nn.Module:
        """The stage's teacher (a plain UNet read from its folder) with this stage's LoRA: a fresh one, or
        the previous LoRA phase's."""
        from trainer.method.lora import add_lora, load_lora_into

        unet = add_lora(teacher_unet, rank=self.stage.lora.rank, alpha=self.stage.lora.alpha, init_seed=self.cfg.run.seed)
        if lora_dir is not None:
            load_lora_into(unet, lora_dir / "lora" / "pytorch_lora_weights.safetensors")
        return unet

    def _lora_result(self, trained: dict[str, torch.Tensor]):
        """(merged fp32 weights, writer of the LoRA file). The checkpoint holds the frozen base weights in
        bf16, so the base comes from the teacher's fp32 folder and only the LoRA weights from the checkpoint."""
        from trainer.method.lora import merge_lora, save_lora

        unet = self._lora_unet(None, load_unet(self.teacher_dir))
        lora = {k: v for k, v in trained.items() if ".lora_" in k}
        missing = [k for k in unet.state_dict() if ".lora_" in k and k not in lora]
        if not lora or missing:
            raise RuntimeError(f"the LoRA phase's checkpoint lacks LoRA weights (e.g. {missing[:2]})")
        unet.load_state_dict(lora, strict=False)
        lora_file = Path(tempfile.mkdtemp()) / "pytorch_lora_weights.safetensors"
        save_lora(unet, lora_file)  # before merging, which removes the adapter
        merged = {k: v.float() for k, v in merge_lora(unet).state_dict().items()}

        def write_lora(export_tmp: Path) -> None:
            (export_tmp / "lora").mkdir()
            shutil.move(str(lora_file), export_tmp / "lora" / lora_file.name)

        return merged, write_lora

    # -- publishing -----------------------------------------------------------------------------

    def _publish(self, result: Path, export_dir: Path, lora: bool = False) -> None:
        """The stage's export: the last phase's result under the stage's name (plus the LoRA file)."""
        import json

        tmp = export_dir.with_name(export_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(result, tmp, symlinks=True)
        manifest = read_manifest(tmp)
        manifest.update(stage=self.stage.name, variant="lora" if lora else "full", teacher=str(self.teacher_dir.resolve()),
                        teacher_steps=self.stage.teacher_steps, objective=self.stage.objective)
        (tmp / "export.json").write_text(json.dumps(manifest, indent=1))
        if export_dir.exists():
            shutil.rmtree(export_dir)
        tmp.rename(export_dir)


def _read_once(in_memory: dict, folder: Path, only: Optional[tuple[str, ...]] = None):
    """The UNet of `folder`: the module already read from it in this phase if there is one, else read now
    (only the `only` parts, if given; a partial read is not kept for reuse)."""
    for path, module in in_memory.items():
        if Path(path).resolve() == Path(folder).resolve():
            return module
    module = load_unet(folder, only=only)
    if only is None:
        in_memory[folder] = module
    return module


class PhasedAdversarial:
    """Wraps the adversarial objective with what changes along a phase: D-only warm-up steps, then the
    multi-timestep weights' switch halfway (both pure functions of the step, so resume is exact)."""

    def __init__(self, inner: AdversarialObjective, warmup_steps: int, late_weights: list[float]):
        self.inner = inner
        self.engines = inner.engines
        self.warmup_steps = warmup_steps
        self.early_weights = inner.t_star_weights.clone()
        self.late_weights = torch.tensor(late_weights, dtype=torch.float) if late_weights else None

    def set_progress(self, step: int, total_steps: int) -> None:
        self.inner.d_only = step < self.warmup_steps
        if self.late_weights is not None:
            self.inner.t_star_weights = self.late_weights if step >= total_steps // 2 else self.early_weights

    def micro_step(self, batch, rand):
        return self.inner.micro_step(batch, rand)
