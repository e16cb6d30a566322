"""Typed configuration: YAML recipes loaded into dataclasses and validated before anything heavy starts.

A recipe is a YAML file (see configs/). Every key maps onto a dataclass field below; an unknown key, a
wrong type or an impossible stage chain stops the run with one line that names the file and the key.
Single keys can be overridden from the command line: ``--set stages.0.optim.lr=1e-5``. Each dataclass
checks its own values (`check`), next to its fields; `validate` adds what needs the whole recipe (the stage
chain) or the file system (model folders, shards, DeepSpeed JSONs).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# A stage's short form: its objective's phases in order, each training what `variant` says. "mse+adv_..." first
# distils the student by MSE, then adversarially, so the adversarial phase starts from a student already on
# the teacher's outputs.
OBJECTIVES = ("mse", "adv_cond", "adv_uncond", "adv_cond+adv_uncond", "mse+adv_cond", "mse+adv_cond+adv_uncond")
VARIANTS = ("full", "lora", "lora+full")
PHASE_KINDS = ("mse", "x0", "adv_cond", "adv_uncond")  # what a stage's phase may train (the teacher: denoise)


class ConfigError(ValueError):
    """A configuration problem, with the file and the key it concerns in its message."""


Fail = typing.Callable[[str, str], typing.NoReturn]  # fail(key, message): raises ConfigError naming the file


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs/default"  # everything a run writes goes below this folder
    seed: int = 0
    # Stop (with a checkpoint, as if preempted) once this process has trained this many samples in a
    # job; 0 = never. For resume tests and for splitting a long job over several allocations.
    stop_after_samples: int = 0
    # A step whose gradients hold NaN/Inf is skipped by the engine (no update, optimizer moments untouched;
    # DeepSpeed's check_grad_overflow); this many in a row stops the run with a message.
    max_consecutive_skips: int = 5
    # A stop signal (SLURM's USR2 warning, SIGTERM) starts a checkpoint before the next micro-step; a
    # micro-step slower than this many seconds is reported (the signal would wait that long).
    preemption_deadline_s: float = 60.0
    # Timeout of the process group: every collective of the training step and of checkpoint writes, where
    # all ranks work. The slowest is a checkpoint write with rank 0 also writing the EMA (SDXL: ~10 GB),
    # a minute or two on a shared file system; 30 minutes leave room without hiding a hung rank for long.
    collective_timeout_s: float = 1800.0
    # How long the other ranks wait while rank 0 alone works (encoding the toy data, consolidating ZeRO
    # partitions, exporting, the end-of-run comparison grid): minutes at SDXL size, longer on a slow file
    # system. They wait in a group of their own, so this never loosens the step's timeout.
    main_work_timeout_s: float = 14400.0
    # cudnn autotuning off and torch's deterministic algorithms on (with CUBLAS_WORKSPACE_CONFIG): GPU runs
    # repeat bit for bit, at some speed. CPU runs are deterministic either way.
    deterministic: bool = False

    def check(self, fail: Fail) -> None:
        for key in ("collective_timeout_s", "main_work_timeout_s", "preemption_deadline_s"):
            if getattr(self, key) <= 0:
                fail(f"run.{key}", "must be positive (seconds)")
        if self.max_consecutive_skips < 1:
            fail("run.max_consecutive_skips", "must be at least 1")


@dataclass
class ModelConfig:
    # "toy" builds the embedded shapes model (pixel codec, tiny text encoder, tiny UNet) from `unet`;
    # anything else is a local diffusers folder (SDXL or SD 1.5 layout) holding the base model.
    base: str = "toy"
    # when `base` is a single-file checkpoint (.safetensors): a local diffusers folder of its architecture
    # (configs, tokenizers, scheduler); the run converts the file into <out_dir>/base (trainer/base_model.py)
    base_config: str = ""
    prediction_type: str = "epsilon"
    unet: dict = field(default_factory=dict)  # UNet2DConditionModel config overrides for the toy
    gradient_checkpointing: bool = True

    def check(self, fail: Fail) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            fail("model.prediction_type", f"'{self.prediction_type}' is not one of {', '.join(PREDICTION_TYPES)}")


@dataclass
class ShapesDataConfig:
    count: int = 20000
    seed: int = 0
    resolution: int = 32
    samples_per_shard: int = 1000
    # The fraction of captions that name the shape's position; the rest ("a red ring") leave it to the
    # model: five modes per caption, curved trajectories, work for the adversarial stages (trainer/data/shapes.py)
    position_in_caption: float = 1.0
    # "stripes": filled shapes striped at an angle and phase no caption names (trainer/data/shapes.py)
    texture: str = "none"
    # k > 0: 1..k small grey dots scattered over the background where no caption says (trainer/data/shapes.py)
    dots: int = 0
    # k > 1: k shapes per image at k different corners, all captioned (trainer/data/shapes.py)
    objects: int = 1


DATA_SOURCES = ("shards", "shapes")
SHAPE_TEXTURES = ("none", "stripes")  # trainer.data.shapes.TEXTURES, without importing the renderer
MAX_SHAPE_OBJECTS = 4  # len(trainer.data.shapes.CORNERS): one shape per corner


@dataclass
class DataConfig:
    # shards: `shards` names a folder of encoded shards (python -m trainer.encode); shapes: the embedded
    # captioned-shapes dataset, rendered and encoded by the run itself (into `shards`, or <out_dir>/shards).
    # Nothing falls back to the toy data: a recipe names it.
    source: str = "shards"
    shards: str = ""  # a folder with index.json
    num_workers: int = 1
    # Lanes the data is read through (trainer/data/loader.py): fixes the order of the samples whatever the
    # world size, which must divide it. 0: the largest power of two up to 64 dividing the number of shards.
    # Changing it (or the shards) changes the data order, so a job resumes only with the lanes it began with.
    lanes: int = 0
    max_bad_fraction: float = 0.01
    dtype: str = "float16"
    shapes: ShapesDataConfig = field(default_factory=ShapesDataConfig)

    def check(self, fail: Fail) -> None:
        if not 0 <= self.max_bad_fraction < 1:
            fail("data.max_bad_fraction", "must be in [0, 1)")
        if self.dtype not in ("float16", "float32"):
            fail("data.dtype", "must be float16 or float32")
        if self.num_workers < 0:
            fail("data.num_workers", "must be >= 0")
        if self.lanes < 0:
            fail("data.lanes", "must be >= 0 (0: automatic)")
        if self.source not in DATA_SOURCES:
            fail("data.source", f"'{self.source}' is not one of {', '.join(DATA_SOURCES)}")
        if self.source == "shapes" and self.shapes.count < 1:
            fail("data.shapes.count", "must be positive")
        if not 0.0 <= self.shapes.position_in_caption <= 1.0:
            fail("data.shapes.position_in_caption", "must be in [0, 1]")
        if self.shapes.texture not in SHAPE_TEXTURES:
            fail("data.shapes.texture", f"'{self.shapes.texture}' is not one of {', '.join(SHAPE_TEXTURES)}")
        if self.shapes.dots < 0:
            fail("data.shapes.dots", "must be >= 0")
        if not 1 <= self.shapes.objects <= MAX_SHAPE_OBJECTS:
            fail("data.shapes.objects", f"must be in [1, {MAX_SHAPE_OBJECTS}] (one shape per corner)")


@dataclass
class ScheduleConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    # The paper's fix: the input at t = T is pure noise in training (the schedule itself is kept).
    pure_noise_at_T: bool = True

    def check(self, fail: Fail) -> None:
        if self.beta_schedule != "scaled_linear":
            fail("schedule.beta_schedule", "only 'scaled_linear' (SDXL's schedule) is supported")
        if self.num_train_timesteps < 2:
            fail("schedule.num_train_timesteps", "must be at least 2")


@dataclass
class OptimConfig:
    lr: float = 1e-5
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 0
    decay: str = "constant"  # constant | cosine (to 0 at the end of the job)
    grad_clip: float = 1.0

    def check(self, key: str, fail: Fail) -> None:
        if self.lr <= 0:
            fail(f"{key}.lr", f"must be positive, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            fail(f"{key}.betas", f"must be two numbers in [0, 1), got {self.betas}")
        if self.decay not in ("constant", "cosine"):
            fail(f"{key}.decay", f"'{self.decay}' is not constant or cosine")
        if self.warmup_steps < 0:
            fail(f"{key}.warmup_steps", "must be >= 0")


@dataclass
class TeacherConfig:
    """Training the toy teacher (ordinary diffusion training) through the same engine and loop."""
    init: str = ""  # a finished teacher export to use instead of training one
    deepspeed: str = ""  # its own DeepSpeed JSON (e.g. fp32, faster than bf16 on CPUs); "" = the recipe's
    samples: int = 0  # training length in samples seen; 0 = no teacher training
    micro_batch: int = 32
    grad_accum: int = 1
    global_batch: int = 0  # as in a stage: when set, grad_accum follows from the world size
    caption_dropout: float = 0.1  # so classifier-free guidance works
    # Per-sample loss weight over timesteps. "none": the prediction type's plain MSE (for v-prediction an
    # x0 error weighted by SNR+1, so the low-noise end dominates). "min_snr": the x0 error weighted by
    # min(SNR, min_snr_gamma) whatever the prediction type (Hang et al., "Efficient Diffusion Training via
    # Min-SNR Weighting"), which moves weight from the lowest-noise steps to the middle of the schedule, and
    # leaves the high-noise end (SNR -> 0) almost none. "min_snr_plus_one": min(SNR + 1, min_snr_gamma), v's
    # own weight capped at the low-noise end only (the high-noise end keeps weight 1).
    loss_weighting: str = "none"
    min_snr_gamma: float = 5.0
    # Input perturbation (Ning et al., "Input Perturbation Reduces Exposure Bias in Diffusion Models"): the
    # network sees x_t built from noise + gamma * fresh noise while its target keeps the unperturbed noise, so
    # it learns to meet the slightly-off x_t of its own sampling trajectory. 0 = off (the paper: 0.1).
    input_perturbation: float = 0.0
    ema_decay: float = 0.999
    gradient_checkpointing: bool = False
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=150, decay="cosine"))
    sample_steps: int = 32
    guidance: float = 3.0

    def accumulation(self, world_size: int, key: str = "teacher") -> int:
        return accumulation(self, world_size, key)

    def check(self, fail: Fail) -> None:
        if not 0 <= self.caption_dropout < 1:
            fail("teacher.caption_dropout", "must be in [0, 1)")
        if self.loss_weighting not in ("none", "min_snr", "min_snr_plus_one"):
            fail("teacher.loss_weighting", f"'{self.loss_weighting}' is not none, min_snr or min_snr_plus_one")
        if not self.min_snr_gamma > 0:
            fail("teacher.min_snr_gamma", f"must be > 0, got {self.min_snr_gamma}")
        if self.input_perturbation < 0:
            fail("teacher.input_perturbation", f"must be >= 0 (0 = off), got {self.input_perturbation}")
        for key, value in (("samples", self.samples), ("micro_batch", self.micro_batch), ("grad_accum", self.grad_accum)):
            if value < 0 or (value == 0 and key != "samples"):
                fail(f"teacher.{key}", f"must be positive, got {value}")
        self.optim.check("teacher.optim", fail)
        check_global_batch(self, "teacher", fail)


@dataclass
class DiscConfig:
    """The discriminator of the adversarial phases: a trainable copy of the base UNet's encoder + head."""
    # D's optimizer beside a full-UNet student; `lora_optim` beside a LoRA student (None: `optim`).
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, betas=[0.0, 0.99], grad_clip=0.0))
    lora_optim: Optional[OptimConfig] = None
    head_blocks: Optional[int] = None  # None: as many stride-2 blocks as bring the mid map to 4x4
    # Width of the head's stride-2 blocks; None: the mid block's width (SDXL 1280), for both forms (the
    # conditional head mixes its two concatenated maps down to it first).
    head_channels: Optional[int] = None
    # Multi-timestep D (the paper's 1- and 2-step stages): both landings re-noised to t* drawn with these
    # weights; `t_star_late_weights` take over halfway through each phase (the paper: 1:1:1:1, then 5:1:1:1).
    t_star: list[int] = field(default_factory=list)
    t_star_weights: list[float] = field(default_factory=list)
    t_star_late_weights: list[float] = field(default_factory=list)
    warmup_samples: int = 0  # D-only training at the start of each adversarial phase
    # After the warm-up, D steps per student step (the student steps on every n-th step, D on every step): a
    # D that learns slower than the student moves out of its sight gets n times the steps; samples count every
    # step, so n times the samples keep the student's steps. 1: the paper's alternation.
    steps_per_student_step: int = 1
    gradient_checkpointing: Optional[bool] = None  # None: as the student's (`model.gradient_checkpointing`)

    def checkpointing(self, student_checkpointing: bool) -> bool:
        """Whether D recomputes its activations: as set, else as the student does."""
        return student_checkpointing if self.gradient_checkpointing is None else self.gradient_checkpointing

    def check(self, key: str, num_train_timesteps: int, fail: Fail) -> None:
        if self.t_star and any(not 0 <= t < num_train_timesteps for t in self.t_star):
            fail(f"{key}.t_star", f"timesteps must be in [0, {num_train_timesteps})")
        for name in ("t_star_weights", "t_star_late_weights"):
            weights = getattr(self, name)
            if weights and (len(weights) != len(self.t_star) or any(w < 0 for w in weights) or not sum(weights)):
                fail(f"{key}.{name}", f"needs one non-negative weight per t_star ({len(self.t_star)}), not all zero")
        self.optim.check(f"{key}.optim", fail)
        if self.lora_optim is not None:
            self.lora_optim.check(f"{key}.lora_optim", fail)
        if self.steps_per_student_step < 1:
            fail(f"{key}.steps_per_student_step", f"must be >= 1, got {self.steps_per_student_step}")
        if self.head_channels is not None and self.head_channels < 1:
            fail(f"{key}.head_channels", f"must be positive (or null: the mid block's width), got {self.head_channels}")


@dataclass
class LoraConfig:
    rank: int = 64  # the paper (like LCM-LoRA): 64 on every conv and linear but conv_in/out and time embeddings
    alpha: Optional[float] = None  # None = rank
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, betas=[0.0, 0.99], grad_clip=0.0))
    # base: the student is base model + LoRA, the adapter continuing the previous stage's, so every stage's
    # LoRA file applies to the base model (as the released ones do). teacher: the adapter sits on the
    # stage's teacher (the previous stage's model) and works on that model only.
    relative_to: str = "base"
    # relative_to base, in a stage that continues no earlier LoRA (the first LoRA stage, after full-UNet
    # stages): start the adapter as the rank-r SVD of (teacher - base), not at zero, so that base + LoRA
    # starts near the teacher instead of at the base model (bench/README.md "Measurements behind defaults")
    init_from_teacher: bool = True

    def check(self, key: str, fail: Fail) -> None:
        if self.rank < 1:
            fail(f"{key}.rank", "must be positive")
        if self.relative_to not in ("base", "teacher"):
            fail(f"{key}.relative_to", f"'{self.relative_to}' is not base or teacher")
        self.optim.check(f"{key}.optim", fail)


@dataclass
class PhaseConfig:
    """One phase of a stage: what it trains (kind, full UNet or LoRA), how long, with which optimizers. A stage
    lists them in `phases:`, or gives the short form (objective + variant) that `StageConfig.plan` expands."""
    kind: str = "mse"  # mse | x0 | adv_cond | adv_uncond
    train: str = "full"  # full | lora (the stage's `lora` section sets rank and alpha)
    samples: int = 0  # length in samples seen; 0 = the stage's `samples`
    optim: Optional[OptimConfig] = None  # the student's; None = the stage's optimizer for this kind
    disc: Optional[DiscConfig] = None  # adversarial phases; None = the stage's `disc`

    def job_name(self, stage: str, index: int) -> str:
        return f"{stage}.{index}_{self.kind}" + ("_lora" if self.train == "lora" else "")

    def check(self, key: str, num_train_timesteps: int, fail: Fail) -> None:
        if self.kind not in PHASE_KINDS:
            fail(f"{key}.kind", f"'{self.kind}' is not one of {', '.join(PHASE_KINDS)}")
        if self.train not in ("full", "lora"):
            fail(f"{key}.train", f"'{self.train}' is not full or lora")
        if self.kind == "x0" and self.train != "full":
            fail(f"{key}.train", "the x0 conversion trains the full UNet")
        if self.samples < 0:
            fail(f"{key}.samples", "must be >= 0 (0: the stage's samples)")
        if self.optim is not None:
            self.optim.check(f"{key}.optim", fail)
        if self.disc is not None:
            if not self.kind.startswith("adv_"):
                fail(f"{key}.disc", f"only adversarial phases have a discriminator, not '{self.kind}'")
            self.disc.check(f"{key}.disc", num_train_timesteps, fail)


@dataclass
class StageConfig:
    name: str = ""
    student_steps: int = 32
    teacher_steps: int = 128
    # mse | adv_cond | adv_uncond | adv_cond+adv_uncond (the paper's adversarial stages)
    objective: str = "mse"
    # full | lora | lora+full: the paper trains a LoRA under each objective, merges it, then trains the
    # full UNet further with the unconditional objective (lora+full).
    variant: str = "full"
    cfg_scale: float = 1.0  # classifier-free guidance in the teacher's jump (the paper: 6 in 128->32 only)
    # The MSE (objective mse, and the adversarial stages' mse_weight term): compare the student's and the
    # teacher's landings as they are ("landing") or as the x0 each implies from x_t ("x0", which weights the
    # high-noise steps up); the paper does not say (bench/README.md#measurements-behind-defaults).
    mse_space: str = "landing"
    samples: int = 1000  # length of each objective phase, in samples seen
    mse_samples: int = 0  # length of the stage's MSE phase (objective mse or mse+adv_...; 0 = samples)
    full_samples: int = 0  # lora+full: length of the final full-UNet phase (0 = samples)
    x0_samples: int = 0  # the one-step stage: conversion to x0 prediction first (0 = none)
    # The conversion learns a new output parametrization by plain regression: its own optimizer.
    x0_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, betas=[0.9, 0.999], grad_clip=1.0))
    # The MSE phase's optimizer when it differs from the adversarial phases' (objective mse+adv_...: the
    # regression takes a larger step than the GAN tolerates); None = optim. Full-UNet phases only.
    mse_optim: Optional[OptimConfig] = None
    mse_weight: float = 0.0  # an extra MSE term in adversarial phases (the paper: none)
    # Full-UNet phases export an exponential moving average of the student's weights when > 0 (the paper
    # states none). LoRA phases ignore it. The shapes recipe does not use it (worse than the last iterate on
    # the toy's one-step stage: bench/README.md#measurements-behind-defaults).
    ema_decay: float = 0.0
    micro_batch: int = 32
    grad_accum: int = 1
    # The recipe's global batch (the paper: 512). When set, grad_accum follows from the world size at
    # launch (global_batch / (micro_batch x world size)), so one config runs on 8 or 64 GPUs unchanged.
    global_batch: int = 0
    optim: OptimConfig = field(default_factory=OptimConfig)  # the student (full UNet) optimizer
    lora: LoraConfig = field(default_factory=LoraConfig)
    disc: DiscConfig = field(default_factory=DiscConfig)
    # The phases, written out (`python -m trainer.run --print-plan` shows them for any recipe); empty = the
    # short form above (objective, variant, x0_samples, full_samples) expanded by `plan`.
    phases: list[PhaseConfig] = field(default_factory=list)

    def accumulation(self, world_size: int, key: str = "stage") -> int:
        return accumulation(self, world_size, key)

    def plan(self) -> list[PhaseConfig]:
        """The phases this stage runs, in order, every field resolved (samples, the student's optimizer, D's
        settings with the optimizer beside this student)."""
        return [self._resolved(p) for p in (self.phases or self._short_form())]

    def _short_form(self) -> list[PhaseConfig]:
        """    mse                        -> [mse]
            adv_cond / adv_uncond      -> [adv_cond] / [adv_uncond]
            adv_cond+adv_uncond        -> [adv_cond, adv_uncond]
            variant lora               -> the same phases, each training the stage's LoRA
            variant lora+full (paper)  -> the LoRA phases, then adv_uncond on the full UNet (the LoRA merged)
            x0_samples > 0 (one step)  -> x0 first: the network learns to predict x0 directly"""
        phases = [PhaseConfig("x0", "full", self.x0_samples)] if self.x0_samples else []
        train = "lora" if self.variant in ("lora", "lora+full") else "full"
        phases += [PhaseConfig(kind, train, self.mse_samples if kind == "mse" and self.mse_samples else self.samples)
                   for kind in self.objective.split("+")]
        if self.variant == "lora+full":
            phases.append(PhaseConfig("adv_uncond", "full", self.full_samples or self.samples))
        return phases

    def _resolved(self, phase: PhaseConfig) -> PhaseConfig:
        if phase.optim is not None:
            optim = phase.optim
        elif phase.kind == "x0":  # learning a new output parametrization by plain regression
            optim = self.x0_optim
        elif phase.train == "lora":
            optim = self.lora.optim
        elif phase.kind == "mse" and self.mse_optim is not None:
            optim = self.mse_optim
        else:
            optim = self.optim
        disc = None
        if phase.kind.startswith("adv_"):
            # The paper's learning rates follow what the student trains: D at 1e-6 beside a LoRA, 5e-7 beside
            # the full UNet (disc.lora_optim and disc.optim).
            disc = phase.disc or self.disc
            if phase.train == "lora" and disc.lora_optim is not None:
                disc = dataclasses.replace(disc, optim=disc.lora_optim)
        return dataclasses.replace(phase, samples=phase.samples or self.samples, optim=optim, disc=disc)

    def check(self, key: str, num_train_timesteps: int, fail: Fail) -> None:
        if self.objective not in OBJECTIVES:
            fail(f"{key}.objective", f"'{self.objective}' is not one of {', '.join(OBJECTIVES)}")
        if self.student_steps < 1 or self.teacher_steps < 1:
            fail(f"{key}.student_steps", "step counts must be positive")
        if self.teacher_steps % self.student_steps:
            fail(f"{key}.student_steps", f"{self.student_steps} does not divide teacher_steps {self.teacher_steps}")
        if self.teacher_steps > num_train_timesteps:
            fail(f"{key}.teacher_steps", f"{self.teacher_steps} exceeds schedule.num_train_timesteps")
        for name in ("samples", "micro_batch", "grad_accum"):
            if getattr(self, name) < 1:
                fail(f"{key}.{name}", f"must be positive, got {getattr(self, name)}")
        if self.mse_space not in ("landing", "x0"):
            fail(f"{key}.mse_space", f"'{self.mse_space}' is not landing or x0")
        if self.cfg_scale < 1.0:
            fail(f"{key}.cfg_scale", "must be >= 1 (1 disables guidance)")
        if self.variant not in VARIANTS:
            fail(f"{key}.variant", f"'{self.variant}' is not one of {', '.join(VARIANTS)}")
        if self.objective == "mse" and self.variant == "lora+full":
            fail(f"{key}.variant", "lora+full is for adversarial objectives (its last phase is adv_uncond)")
        check_global_batch(self, key, fail)
        for name in ("full_samples", "x0_samples", "mse_samples", "mse_weight"):
            if getattr(self, name) < 0:
                fail(f"{key}.{name}", "must be >= 0")
        if not 0.0 <= self.ema_decay < 1.0:
            fail(f"{key}.ema_decay", f"must be in [0, 1) (0 = no average), got {self.ema_decay}")
        self.disc.check(f"{key}.disc", num_train_timesteps, fail)
        self.lora.check(f"{key}.lora", fail)
        for name in ("optim", "x0_optim", "mse_optim"):
            if getattr(self, name) is not None:
                getattr(self, name).check(f"{key}.{name}", fail)
        if self.phases:
            short_form = {"objective": "mse", "variant": "full", "x0_samples": 0, "full_samples": 0, "mse_samples": 0}
            given = [name for name, default in short_form.items() if getattr(self, name) != default]
            if given:
                fail(f"{key}.phases", f"give the phases or the short form ({', '.join(given)}), not both")
        for i, phase in enumerate(self.phases):
            phase.check(f"{key}.phases[{i}]", num_train_timesteps, fail)
        if self.student_steps == 1 and any(p.train == "lora" for p in self.plan()):
            fail(f"{key}.variant" if not self.phases else f"{key}.phases",
                 "the one-step model is trained as a full UNet (x0 prediction: no 1-step LoRA)")


def check_global_batch(job, key: str, fail: Fail) -> None:
    if job.global_batch and (job.global_batch < 0 or job.global_batch % job.micro_batch):
        fail(f"{key}.global_batch", f"{job.global_batch} is not a positive multiple of micro_batch {job.micro_batch}")
    if job.global_batch and job.grad_accum != 1:
        fail(f"{key}.grad_accum", "set either global_batch (grad_accum then follows from the world size) or grad_accum")


def accumulation(job, world_size: int, key: str) -> int:
    """Micro-batches per optimizer step of a job (a stage, the teacher) on `world_size` ranks: grad_accum, or
    what global_batch implies (so that the job's numerics and a resume do not depend on the world size)."""
    if not job.global_batch:
        return job.grad_accum
    per_step = job.micro_batch * world_size
    if job.global_batch % per_step:
        raise ConfigError(f"{key}.global_batch: {job.global_batch} is not a multiple of micro_batch "
                          f"{job.micro_batch} x world size {world_size} = {per_step}")
    return job.global_batch // per_step


@dataclass
class LogConfig:
    every_steps: int = 10
    sample_every_samples: int = 0  # 0 = only at the end of each job
    checkpoint_every_samples: int = 2048
    keep_last: int = 2
    grid_prompts: list = field(default_factory=list)
    grid_seed: int = 1234
    # The end-of-run grid of every finished stage side by side (rank 0 samples each UNet): auto = only
    # for the embedded toy (seconds), where at SDXL size it would load and sample every stage's UNet.
    comparison_grid: str = "auto"  # auto | always | never

    def check(self, fail: Fail) -> None:
        if self.comparison_grid not in ("auto", "always", "never"):
            fail("log.comparison_grid", f"'{self.comparison_grid}' is not auto, always or never")
        if self.keep_last < 1:
            fail("log.keep_last", "must be at least 1")


@dataclass
class ProbeConfig:
    """The stage-length probe: every `every_samples` samples of a stage phase, rank 0 samples the student on a
    fixed prompt set (the first `count` samples of the first shard, fixed noise) and logs the FID of those
    images against its teacher's samples of the same prompts and noise (TensorBoard `<phase>/probe_fid_vs_teacher`,
    the images beside it; on the toy's data also the pixel rules' rates, `<phase>/probe_<rule>`). With
    `stop_when_flat`, a phase ends once the curve has flattened: `patience` probes in a row that beat the best
    so far by less than `min_improvement` (relative). The paper states no stage lengths; its recipe keeps the
    lengths (off)."""
    every_samples: int = 0  # 0 = off
    count: int = 256  # images per probe (FID on fewer is mostly noise)
    backend: str = "shapes"  # feature network (eval/features.py): shapes (the toy) | inception (needs `weights`)
    weights: str = ""  # the feature network's file; "" = assets/shapes_classifier.safetensors for shapes
    stop_when_flat: bool = False
    patience: int = 3
    min_improvement: float = 0.02

    def check(self, fail: Fail) -> None:
        if self.every_samples < 0:
            fail("probe.every_samples", f"must be >= 0 (0 = off), got {self.every_samples}")
        if self.every_samples == 0:
            if self.stop_when_flat:
                fail("probe.stop_when_flat", "needs probe.every_samples > 0 (the curve it stops on)")
            return
        if self.count < 16:
            fail("probe.count", f"must be at least 16 images, got {self.count}")
        if self.backend not in ("shapes", "inception"):
            fail("probe.backend", f"'{self.backend}' is not shapes or inception")
        if self.backend == "inception" and not self.weights:
            fail("probe.weights", "the inception backend needs the Inception weights file (no downloads)")
        if self.patience < 1:
            fail("probe.patience", f"must be at least 1, got {self.patience}")
        if not 0 <= self.min_improvement < 1:
            fail("probe.min_improvement", f"must be in [0, 1), got {self.min_improvement}")


@dataclass
class ExportConfig:
    # Copy every part of the base model into each export instead of linking the large ones (SDXL's text
    # encoders and VAE, ~5 GB per export): folders that can be moved to another machine.
    portable: bool = False
    # Each stage's export also as the files ComfyUI and A1111 load (SDXL and SD 1.5 bases): the full model as
    # one original-layout checkpoint (fp16), the LoRA in kohya's key layout.
    single_files: bool = True


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    stages: list[StageConfig] = field(default_factory=list)
    deepspeed: str = "ds_configs/zero2_cpu.json"
    log: LogConfig = field(default_factory=LogConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    source: str = ""  # the file it came from, for messages

    @property
    def out_dir(self) -> Path:
        return Path(self.run.out_dir)

    @property
    def shard_dir(self) -> Path:
        return Path(self.data.shards) if self.data.shards else self.out_dir / "shards"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Loading: dict -> dataclasses with exact type checks and key names in every message


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _convert(value: Any, tp: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key}: expected a mapping, got {type(value).__name__} {value!r}")
        return _build(tp, value, key, where)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _convert(value, args[0], key, where)
    if origin is list or tp is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_convert(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key}: expected a mapping, got {type(value).__name__} {value!r}")
        return value
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML reads "1e-5" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool):
        if isinstance(value, bool) and tp is not bool or not isinstance(value, tp):
            raise ConfigError(f"{where}: {key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{where}: {key}: unsupported type {tp}")


def _build(cls: type, data: dict, prefix: str, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if not (cls is Config and f.name == "source")]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{(prefix + '.') if prefix else ''}{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}: unknown key '{full}'{hint}")
        kwargs[key] = _convert(value, hints[key], full, where)
    return cls(**kwargs)


def _apply_override(data: dict, assignment: str, where: str) -> None:
    """`a.b.0.c=value`: value parsed as YAML; list items addressed by index."""
    if "=" not in assignment:
        raise ConfigError(f"{where}: override '{assignment}' is not KEY=VALUE")
    dotted, raw = assignment.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    parts = dotted.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            node = node[_index(part, node, dotted, where)]
        else:
            node = node.setdefault(part, [] if nxt.isdigit() else {})
    last = parts[-1]
    if isinstance(node, list):
        node[_index(last, node, dotted, where)] = value
    else:
        node[last] = value


def _index(part: str, node: list, dotted: str, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"{where}: override '{dotted}': no list item '{part}' (the list has {len(node)})")
    return int(part)


def _unaliased(node: Any) -> Any:
    """A copy in which no mapping or list is shared. YAML aliases share them: stages merged from one anchor
    (`<<: *adversarial`) hold the same `disc` and `optim` mappings, and a `--set` on one stage's would
    otherwise reach every stage that shares it."""
    if isinstance(node, dict):
        return {key: _unaliased(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_unaliased(value) for value in node]
    return node


def load_config(path: str | os.PathLike, overrides: Optional[list[str]] = None, check_paths: bool = True) -> Config:
    """Read a YAML recipe, apply `--set` overrides, build typed objects and validate them."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise ConfigError(f"{where}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of sections")
    data = _unaliased(data)
    for assignment in overrides or []:
        _apply_override(data, assignment, where)
    cfg = _build(Config, data, "", where)
    cfg.source = where
    validate(cfg, check_paths=check_paths)
    return cfg


# ---------------------------------------------------------------------------------------------
# Validation: everything that can be checked before a model is built


def validate(cfg: Config, check_paths: bool = True) -> None:
    where = cfg.source or "<config>"

    def fail(key: str, msg: str) -> typing.NoReturn:
        raise ConfigError(f"{where}: {key}: {msg}")

    cfg.run.check(fail)
    cfg.model.check(fail)
    cfg.data.check(fail)
    cfg.schedule.check(fail)
    cfg.teacher.check(fail)
    cfg.log.check(fail)
    cfg.probe.check(fail)
    if check_paths and cfg.probe.every_samples and cfg.probe.weights and not Path(cfg.probe.weights).is_file():
        fail("probe.weights", f"'{cfg.probe.weights}' does not exist")
    previous_student = None
    for i, stage in enumerate(cfg.stages):
        key = f"stages[{i}]"
        stage.check(key, cfg.schedule.num_train_timesteps, fail)
        if previous_student is not None and stage.teacher_steps != previous_student:
            fail(f"{key}.teacher_steps", f"{stage.teacher_steps} must equal the previous stage's "
                 f"student_steps {previous_student} (the previous student is this stage's teacher)")
        previous_student = stage.student_steps
    _check_lora_chain(cfg.stages, fail)
    names = [s.name or f"stage{i + 1}" for i, s in enumerate(cfg.stages)]
    for i, stage in enumerate(cfg.stages):
        stage.name = names[i]
    if len(set(names)) != len(names):
        fail("stages", f"stage names must be unique, got {names}")

    if check_paths:
        from trainer.base_model import is_single_file

        if is_single_file(cfg.model.base):
            _check_single_file_base(cfg.model, fail)
        elif cfg.model.base != "toy":
            if not Path(cfg.model.base).is_dir():
                fail("model.base", f"model folder '{cfg.model.base}' does not exist")
            if not (Path(cfg.model.base) / "unet" / "config.json").is_file():
                fail("model.base", f"'{cfg.model.base}' has no unet/config.json (a diffusers model folder is needed)")
        if cfg.teacher.init:
            if not Path(cfg.teacher.init).exists():
                fail("teacher.init", f"teacher export '{cfg.teacher.init}' does not exist")
            if not (Path(cfg.teacher.init) / "unet" / "config.json").is_file():
                fail("teacher.init", f"'{cfg.teacher.init}' holds no UNet (expected unet/config.json)")
        if not Path(cfg.deepspeed).is_file():
            fail("deepspeed", f"DeepSpeed config '{cfg.deepspeed}' does not exist")
        if cfg.teacher.deepspeed and not Path(cfg.teacher.deepspeed).is_file():
            fail("teacher.deepspeed", f"DeepSpeed config '{cfg.teacher.deepspeed}' does not exist")
        _validate_ds_json(cfg, fail)
        if cfg.data.source == "shards" and not cfg.data.shards:
            fail("data.shards", "no shard folder given (make shards with python -m trainer.encode and set "
                 "data.shards; data.source: shapes trains on the embedded toy dataset instead)")
        if cfg.data.source == "shards" and not (Path(cfg.data.shards) / "index.json").is_file():
            fail("data.shards", f"'{cfg.data.shards}' has no index.json (make shards with python -m trainer.encode)")


def _check_single_file_base(model: ModelConfig, fail: Fail) -> None:
    """A single-file base: the file and its config folder exist and agree (header and configs only)."""
    from trainer.base_model import check_single_file
    from trainer.formats import FormatError

    if not Path(model.base).is_file():
        fail("model.base", f"single-file checkpoint '{model.base}' does not exist")
    if not model.base_config:
        fail("model.base_config", f"model.base is a single file ({model.base}): name a local diffusers folder of its "
             "architecture (the SDXL or SD 1.5 base folder) whose configs, tokenizers and scheduler it is read with")
    if not Path(model.base_config).is_dir():
        fail("model.base_config", f"folder '{model.base_config}' does not exist")
    try:
        check_single_file(model.base, model.base_config)
    except FormatError as e:
        fail("model.base", str(e))


def _check_lora_chain(stages: list[StageConfig], fail: Fail) -> None:
    """A stage's LoRA relative to the base continues the previous stage's: the two adapters must have one shape."""
    for i in range(1, len(stages)):
        previous, stage = stages[i - 1], stages[i]
        trains = lambda s: any(p.train == "lora" for p in s.plan())
        if trains(previous) and trains(stage) and previous.lora.relative_to == stage.lora.relative_to == "base":
            if (previous.lora.rank, previous.lora.alpha) != (stage.lora.rank, stage.lora.alpha):
                fail(f"stages[{i}].lora", f"rank {stage.lora.rank} alpha {stage.lora.alpha} cannot continue the previous "
                     f"stage's LoRA (rank {previous.lora.rank} alpha {previous.lora.alpha}): LoRAs relative to the base "
                     "chain from stage to stage, so give them one rank and alpha (or lora.relative_to: teacher)")


def _validate_ds_json(cfg: Config, fail) -> None:
    """The DeepSpeed JSON holds ZeRO and precision settings; batch sizes and the optimizer are the YAML's.
    A JSON that sets them differently would silently win or crash later: refuse it now."""
    jobs = [("teacher", cfg.teacher.deepspeed or cfg.deepspeed, cfg.teacher.micro_batch, cfg.teacher.grad_accum)]
    jobs += [(f"stages[{i}]", cfg.deepspeed, s.micro_batch, s.grad_accum) for i, s in enumerate(cfg.stages)]
    for key, path, micro, accum in jobs:
        ds = ds_config_from_file(path)
        for ds_key, ours, yaml_key in (("train_micro_batch_size_per_gpu", micro, "micro_batch"),
                                       ("gradient_accumulation_steps", accum, "grad_accum")):
            if ds.get(ds_key, "auto") not in ("auto", ours):
                fail(f"{key}.{yaml_key}", f"{ours} contradicts {path}: {ds_key}={ds[ds_key]} (remove it from the JSON)")
        if "train_batch_size" in ds and ds["train_batch_size"] != "auto":
            if ds["train_batch_size"] % (micro * accum):
                fail(f"{key}.micro_batch", f"{path}: train_batch_size={ds['train_batch_size']} is not a multiple of "
                     f"micro_batch x grad_accum = {micro * accum}")
        for ds_key in ("optimizer", "scheduler"):
            if ds_key in ds:
                fail("deepspeed", f"{path}: '{ds_key}' belongs in the YAML (the stages' optim sections), not the JSON")


def dump_config(cfg: Config, path: Path) -> None:
    """The resolved config next to a run's outputs, so every result says what made it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = cfg.to_dict()
    data.pop("source", None)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def ds_config_from_file(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON: {err}") from None
