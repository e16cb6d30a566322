"""Methods: one class per kind of phase, each owning what its phase trains.

A method builds its networks and DeepSpeed engines from where its phase starts (`build(start)`, start: a
trainer.method.phases.PhaseStart), carries what changes along the phase (`set_progress`), and computes one
micro-step (`micro_step`: forward, backward and the engines' steps). The loop (trainer/runtime/loop.py) takes
any of them through the `Method` interface.

    Denoise        ordinary diffusion training: the toy teacher, with caption dropout for CFG
    MSEDistill     progressive distillation (the first stage): the student's one move from x_t lands where
                   the frozen teacher's n-move jump (with CFG) lands
    X0Conversion   the one-step model learns to output x0 directly (x0 prediction)
    Adversarial    the adversarial stages: conditional or unconditional D, multi-timestep D (t*), D warm-up

The micro-step's sections are named (`self.timer.section(...)`): a no-op in training, timed by bench/step.py.
docs/method.md maps every equation to the function here that computes it.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import nullcontext
from typing import TYPE_CHECKING, ClassVar, ContextManager, Optional

import torch
import torch.nn.functional as F

from trainer.config import OptimConfig
from trainer.method.discriminator import ENCODER_PARTS, d_accuracy, d_loss, discriminator_from_unet, g_loss
from trainer.method.models import Conditioning, guided_denoiser, unet_forward
from trainer.method.schedule import NoiseSchedule, move, next_timestep, teacher_jump, trailing_timesteps
from trainer.runtime.randomness import SampleRandom

if TYPE_CHECKING:
    from trainer.method.phases import PhaseStart


class StepTimer:
    """Times the named sections of a micro-step. This one does nothing: training pays one empty context
    manager per section; bench/step.py passes one that synchronises the device and records."""

    def section(self, name: str) -> ContextManager:
        return nullcontext()


NO_TIMING = StepTimer()


class Method(ABC):
    """What the loop needs from a phase: its engines (checkpointed, stepped inside micro_step), each engine's
    optimizer settings (the loop sets their learning rates), progress-dependent behaviour and the step."""
    kind: ClassVar[str]
    sections: ClassVar[tuple[str, ...]]

    def __init__(self, engines: dict, optims: Optional[dict[str, OptimConfig]] = None):
        self.engines = engines
        self.optims = optims or {}
        self.timer: StepTimer = NO_TIMING

    @property
    def student(self):
        return self.engines["student"]

    @classmethod
    @abstractmethod
    def build(cls, start: "PhaseStart") -> "Method":
        """Reads the phase's networks, wraps the trained ones in engines; the caller closes the method."""

    def set_progress(self, step: int, total_steps: int) -> None:
        """Called before every optimizer step; a pure function of the step, so a resume repeats it."""

    @abstractmethod
    def micro_step(self, batch: dict, rand: SampleRandom) -> dict[str, torch.Tensor]:
        """One micro-batch: forward, backward, the engines' steps (which update at accumulation boundaries)."""

    def close(self) -> None:
        """Destroys the engines (ZeRO's hooks would otherwise keep their memory until a full GC)."""
        for engine in self.engines.values():
            engine.destroy()


class Denoise(Method):
    kind = "denoise"
    sections = ("noise", "student forward", "student step")

    def __init__(self, engine, schedule: NoiseSchedule, prediction_type: str, caption_dropout: float,
                 optims: Optional[dict[str, OptimConfig]] = None, loss_weighting: str = "none",
                 min_snr_gamma: float = 5.0, input_perturbation: float = 0.0):
        super().__init__({"student": engine}, optims)
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.caption_dropout = caption_dropout
        self.loss_weighting = loss_weighting  # "none": the plain MSE; "min_snr" | "min_snr_plus_one"
        self.min_snr_gamma = min_snr_gamma
        self.input_perturbation = input_perturbation

    @classmethod
    def build(cls, start: "PhaseStart") -> "Denoise":
        student = start.trainable(start.read_unet(start.student_dir))
        tc = start.cfg.teacher
        return cls(start.engine(student, start.phase.optim), start.schedule, start.student_pred, tc.caption_dropout,
                   optims={"student": start.phase.optim},
                   loss_weighting=tc.loss_weighting, min_snr_gamma=tc.min_snr_gamma,
                   input_perturbation=tc.input_perturbation)

    def micro_step(self, batch: dict, rand: SampleRandom) -> dict[str, torch.Tensor]:
        with self.timer.section("noise"):
            x0 = batch["latent"]
            eps = _randn_like(x0, rand)
            t = host_to_device(rand.randint(self.schedule.num_train_timesteps), x0.device)
            keep = host_to_device(rand.rand() >= self.caption_dropout, x0.device)
            alpha, sigma = self.schedule.alpha_sigma(t)
            seen_noise = eps
            if self.input_perturbation:  # the input's noise only: the target below keeps eps
                seen_noise = eps + self.input_perturbation * _randn_like(x0, rand)
            x_t = alpha * x0 + sigma * seen_noise  # the real forward process (perturbed only when asked)
            cond = Conditioning.from_batch(batch).drop(keep)
        with self.timer.section("student forward"):
            out = unet_forward(self.student, x_t, t, cond)
            target = self.schedule.target(x0, eps, t, self.prediction_type)
            if self.loss_weighting == "none":
                loss = F.mse_loss(out, target)
            else:
                weight = self.schedule.min_snr_weight(t, self.min_snr_gamma, self.prediction_type,
                                                      plus_one=self.loss_weighting == "min_snr_plus_one")
                loss = (weight * (out.float() - target.float()).square()).mean()
        with self.timer.section("student step"):
            self.student.backward(loss)
            self.student.step()
        return {"loss": loss.detach()}


class MSEDistill(Method):
    kind = "mse"
    sections = ("teacher", "student forward", "student step")

    def __init__(self, engine, teacher: torch.nn.Module, schedule: NoiseSchedule, prediction_type: str,
                 teacher_prediction_type: str, student_steps: int, teacher_steps: int, cfg_scale: float,
                 loss_space: str = "landing", optims: Optional[dict[str, OptimConfig]] = None):
        check_loss_space(loss_space)
        super().__init__({"student": engine}, optims)
        self.loss_space = loss_space
        self.teacher = teacher
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.teacher_prediction_type = teacher_prediction_type
        self.student_steps = student_steps
        self.teacher_steps = teacher_steps
        self.moves_per_step = teacher_steps // student_steps
        self.cfg_scale = cfg_scale
        self.timesteps = torch.tensor(trailing_timesteps(student_steps, schedule.num_train_timesteps))

    @classmethod
    def build(cls, start: "PhaseStart") -> "MSEDistill":
        stage = start.stage
        plain = start.read_unet(start.student_dir)
        teacher = start.frozen(start.read_unet(start.teacher_dir), plain)
        student = start.trainable(plain)
        return cls(start.engine(student, start.phase.optim), teacher, start.schedule, start.student_pred,
                   start.teacher_pred, stage.student_steps, stage.teacher_steps, stage.cfg_scale,
                   loss_space=stage.mse_space, optims={"student": start.phase.optim})

    def micro_step(self, batch: dict, rand: SampleRandom) -> dict[str, torch.Tensor]:
        with self.timer.section("teacher"):
            x_t, t, t_next, cond = noisy_inputs(batch, rand, self.schedule, self.timesteps, self.student_steps)
            target = teacher_jump(self.schedule, guided_denoiser(self.teacher, cond, self.cfg_scale), x_t, t,
                                  self.moves_per_step, self.teacher_steps, self.teacher_prediction_type)
        with self.timer.section("student forward"):
            out = unet_forward(self.student, x_t, t, cond)
            landed = move(self.schedule, out, x_t, t, t_next, self.prediction_type)
            loss = landing_mse(self.schedule, self.loss_space, x_t, landed, target, t, t_next)
        with self.timer.section("student step"):
            self.student.backward(loss)
            self.student.step()
        return {"loss": loss.detach()}


class X0Conversion(Method):
    """The one-step model's conversion to x0 prediction (the paper's fix for the noisy one-step epsilon
    model): a copy of the network learns to output directly the x0 that a frozen copy implies,
    ||x0^(x_t) - x0(x_t, out_frozen, t)||^2, at the stage's training timesteps."""
    kind = "x0"
    sections = ("frozen copy", "student forward", "student step")

    def __init__(self, engine, frozen: torch.nn.Module, schedule: NoiseSchedule, frozen_prediction_type: str,
                 student_steps: int, optims: Optional[dict[str, OptimConfig]] = None):
        super().__init__({"student": engine}, optims)
        self.frozen = frozen
        self.schedule = schedule
        self.frozen_prediction_type = frozen_prediction_type
        self.student_steps = student_steps
        self.timesteps = torch.tensor(trailing_timesteps(student_steps, schedule.num_train_timesteps))

    @classmethod
    def build(cls, start: "PhaseStart") -> "X0Conversion":
        plain = start.read_unet(start.student_dir)
        frozen = start.frozen(plain, plain)  # the network whose x0 the student learns to output is its own start
        if start.student_pred == "v_prediction" and start.stage.student_steps == 1:
            x0_head_from_v(plain, start.schedule)
        student = start.trainable(plain)
        return cls(start.engine(student, start.phase.optim), frozen, start.schedule, start.student_pred,
                   start.stage.student_steps, optims={"student": start.phase.optim})

    def micro_step(self, batch: dict, rand: SampleRandom) -> dict[str, torch.Tensor]:
        with self.timer.section("frozen copy"):
            x_t, t, _, cond = noisy_inputs(batch, rand, self.schedule, self.timesteps, self.student_steps)
            with torch.no_grad():
                out = unet_forward(self.frozen, x_t, t, cond)
                target, _ = self.schedule.to_x0_eps(out, x_t, t, self.frozen_prediction_type)
        with self.timer.section("student forward"):
            loss = F.mse_loss(unet_forward(self.student, x_t, t, cond), target)  # the copy outputs x0 itself
        with self.timer.section("student step"):
            self.student.backward(loss)
            self.student.step()
        return {"loss": loss.detach()}


def x0_head_from_v(unet, schedule: NoiseSchedule) -> None:
    """Start the one-step x0 conversion close to where it must end. A v-prediction network's x0 at t = T is
    alpha_T x_t - sigma_T v ~ -sigma_T v (alpha_T ~ 0.07 on SDXL's schedule), so scaling the output
    convolution by -sigma_T makes the copy predict x0 at T up to the small alpha_T x_t term, which the
    phase then learns. An epsilon network's x0 at T needs x_t / alpha_T (~15 x_t): no such shortcut; that
    copy learns the conversion from its epsilon output, as the paper does."""
    _, sigma = schedule.alpha_sigma(torch.tensor([schedule.num_train_timesteps - 1]))
    with torch.no_grad():
        unet.conv_out.weight.mul_(-float(sigma))
        unet.conv_out.bias.mul_(-float(sigma))


class Adversarial(Method):
    """One G step then one D step per micro-batch, on two DeepSpeed engines.

    real = the frozen teacher's n-move jump from x_t, fake = the student's one move from the same x_t.
    Conditional D judges (x_t, x_{t-ns}) pairs; unconditional D' judges x_{t-ns} alone (text-conditioned
    in both). With `t_star`, both landings are turned into their x0 and re-noised to t* (same fresh noise
    for real and fake) before D sees them: the multi-timestep discriminator of the 1- and 2-step stages.
    Non-saturating losses; an optional MSE term (`mse_weight`, 0 in the paper). Along the phase: D-only
    warm-up steps first (`warmup_steps`), then the student steps on every `d_per_student`-th step only (D on
    every step), and the t* weights switch to `late_weights` halfway.
    """
    kind = "adversarial"
    sections = ("teacher", "student forward", "G step", "D step")

    def __init__(self, student_engine, disc_engine, teacher: torch.nn.Module, schedule: NoiseSchedule,
                 prediction_type: str, teacher_prediction_type: str, student_steps: int, teacher_steps: int,
                 conditional: bool, t_star: list[int], t_star_weights: list[float], mse_weight: float = 0.0,
                 d_only: bool = False, warmup_steps: int = 0, late_weights: Optional[list[float]] = None,
                 mse_space: str = "landing", optims: Optional[dict[str, OptimConfig]] = None,
                 d_per_student: int = 1):
        check_loss_space(mse_space)
        super().__init__({"student": student_engine, "disc": disc_engine}, optims)
        self.disc = disc_engine
        self.teacher = teacher
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.teacher_prediction_type = teacher_prediction_type
        self.student_steps, self.teacher_steps = student_steps, teacher_steps
        self.conditional = conditional
        self.t_star = torch.tensor(t_star, dtype=torch.long)
        self.t_star_values = list(t_star)
        self.t_star_weights = torch.tensor(t_star_weights or [1.0] * len(t_star), dtype=torch.float)
        self.mse_weight = mse_weight
        self.mse_space = mse_space
        # D warm-up: only D trains (the student's engine is not stepped), a head start against a fast student.
        self.d_only = d_only
        self.warmup_steps = warmup_steps
        self.d_per_student = d_per_student
        self.early_weights = self.t_star_weights.clone()
        self.late_weights = torch.tensor(late_weights, dtype=torch.float) if late_weights else None
        self.timesteps = torch.tensor(trailing_timesteps(student_steps, schedule.num_train_timesteps))

    @classmethod
    def build(cls, start: "PhaseStart") -> "Adversarial":
        stage, phase, disc_cfg = start.stage, start.phase, start.phase.disc
        conditional = phase.kind == "adv_cond"
        plain = start.read_unet(start.student_dir)
        teacher = start.read_unet(start.teacher_dir)
        # D: a fresh copy of the base model's encoder and mid block (read before the modules above change)
        disc = discriminator_from_unet(start.read_unet(start.disc_base, only=ENCODER_PARTS), conditional=conditional,
                                       head_blocks=disc_cfg.head_blocks, head_channels=disc_cfg.head_channels,
                                       seed=start.cfg.run.seed)
        teacher = start.frozen(teacher, plain)
        student = start.trainable(plain)
        if disc_cfg.checkpointing(start.gradient_checkpointing):
            disc.enable_gradient_checkpointing()
        student_engine = start.engine(student, phase.optim)
        del student
        try:
            disc_engine = start.engine(disc, disc_cfg.optim)
        except BaseException:
            student_engine.destroy()
            raise
        return cls(student_engine, disc_engine, teacher, start.schedule, start.student_pred, start.teacher_pred,
                   stage.student_steps, stage.teacher_steps, conditional=conditional, t_star=disc_cfg.t_star,
                   t_star_weights=disc_cfg.t_star_weights, mse_weight=stage.mse_weight, mse_space=stage.mse_space,
                   warmup_steps=disc_cfg.warmup_samples // start.global_batch,
                   late_weights=disc_cfg.t_star_late_weights, d_per_student=disc_cfg.steps_per_student_step,
                   optims={"student": phase.optim, "disc": disc_cfg.optim})

    def set_progress(self, step: int, total_steps: int) -> None:
        self.d_only = step < self.warmup_steps or (step - self.warmup_steps) % self.d_per_student != 0
        if self.late_weights is not None:
            self.t_star_weights = self.late_weights if step >= total_steps // 2 else self.early_weights

    def micro_step(self, batch: dict, rand: SampleRandom) -> dict[str, torch.Tensor]:
        """The G step, then the D step. Neither engine's weights change before its accumulation boundary,
        so with this order every micro-batch's G step judges through the same D (the step's starting one)
        and every D step sees the same student: k micro-batches of b accumulate exactly what one of k x b
        computes (tested). With D first, the boundary micro-batch's G step would see an updated D and the
        others the old one."""
        p = self.landings(batch, rand)
        logs = {}
        if not self.d_only:
            with self.timer.section("G step"):
                logs = self.g_step(p)
        with self.timer.section("D step"):
            logs.update(self.d_step(p))
        return logs

    def landings(self, batch: dict, rand: SampleRandom) -> dict:
        """From one x_t: the teacher's n-move jump (real) and the student's move (fake, with grad unless D
        warms up), re-noised to t* with a multi-timestep D; with what D judges them by."""
        with self.timer.section("teacher"):
            x_t, t, t_next, cond = noisy_inputs(batch, rand, self.schedule, self.timesteps, self.student_steps)
            real = teacher_jump(self.schedule, guided_denoiser(self.teacher, cond, 1.0), x_t, t,
                                self.teacher_steps // self.student_steps, self.teacher_steps,
                                self.teacher_prediction_type)
        with self.timer.section("student forward"):
            with torch.set_grad_enabled(not self.d_only):
                out = unet_forward(self.student, x_t, t, cond)
            fake = move(self.schedule, out, x_t, t, t_next, self.prediction_type)
            # the landings themselves stay for the MSE term, whatever D is then shown (re-noised to t*)
            p = {"x_t": x_t, "t": t, "t_next": t_next, "cond": cond, "real": real, "fake": fake, "d_t": t_next,
                 "real_landing": real, "fake_landing": fake}
            if len(self.t_star):
                p = self.renoise_to_t_star(p, t_next, rand)
        return p

    def renoise_to_t_star(self, p: dict, t_next: torch.Tensor, rand: SampleRandom) -> dict:
        """Multi-timestep D: both landings to their x0, re-noised with the same fresh noise to a t* drawn per
        sample; D judges them at t*."""
        d_t = host_to_device(self.t_star[rand.choice(self.t_star_weights)], p["x_t"].device)
        noise = _randn_like(p["x_t"], rand)
        x0 = {k: implied_x0(self.schedule, p["x_t"], p[k], p["t"], t_next) for k in ("real", "fake")}
        return {**p, "real": self.schedule.renoise(x0["real"], noise, d_t),
                "fake": self.schedule.renoise(x0["fake"], noise, d_t), "d_t": d_t}

    def g_step(self, p: dict) -> dict[str, torch.Tensor]:
        """L_G = -log p(fake) through D, whose parameters must not collect gradients: ZeRO-2 asserts
        "gradient computed twice" otherwise."""
        self._set_disc_trainable(False)
        try:
            loss_g = g_loss(self._judge(p["fake"], p["d_t"], p["cond"], p["x_t"], p["t"], frozen=True))
            # on the landings (x at t_next, or the x0 they imply: `mse_space`, as stage 1's MSE), not on what
            # D judges: with a multi-timestep D that is re-noised to t*, and the weight would change with t*
            loss_mse = landing_mse(self.schedule, self.mse_space, p["x_t"], p["fake_landing"], p["real_landing"],
                                   p["t"], p["t_next"])
            self.student.backward(loss_g + self.mse_weight * loss_mse if self.mse_weight else loss_g)
            self.student.step()
        finally:
            self._set_disc_trainable(True)
        return {"g_loss": loss_g.detach(), "mse": loss_mse.detach()}

    def d_step(self, p: dict) -> dict[str, torch.Tensor]:
        """L_D = -log p(real) - log(1 - p(fake)); the fake is detached (the student is not touched)."""
        real_logits, fake_logits = self.judge_real_and_fake(p)
        loss_d = d_loss(real_logits, fake_logits)
        self.disc.backward(loss_d)  # one backward per engine per step: real and fake terms summed
        self.disc.step()
        acc_real, acc_fake = d_accuracy(real_logits, fake_logits)
        logs = {"d_loss": loss_d.detach(), "d_acc_real": acc_real, "d_acc_fake": acc_fake}
        for ts in self.t_star_values:  # per-t* terms: can D still tell them apart at this t*?
            # NaN where no sample drew this t* (the loop averages with nanmean): no data-dependent branch,
            # so no host-device sync.
            logs[f"d_acc_real_t{ts}"], logs[f"d_acc_fake_t{ts}"] = d_accuracy(real_logits, fake_logits, p["d_t"] == ts)
        return logs

    def judge_real_and_fake(self, p: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """D's logits for real and (detached) fake in one call: one bigger batch, and the conditional D's
        x_t branch, the same for both, runs once."""
        both = torch.cat([p["real"], p["fake"].detach()])
        logits = self._judge(both, torch.cat([p["d_t"], p["d_t"]]), p["cond"], p["x_t"], p["t"])
        return logits.chunk(2)

    def _judge(self, x_next, t_next, cond, x_t, t, frozen: bool = False):
        # The G step calls D's module, not its engine: D is a frozen function there, and the engine's
        # forward would hook D's backward bookkeeping (ZeRO-2 buckets) onto the student's backward.
        disc = self.disc.module if frozen else self.disc
        if self.conditional:
            return disc(x_next, t_next, cond, x_t, t)
        return disc(x_next, t_next, cond)

    def _set_disc_trainable(self, flag: bool) -> None:
        # ZeRO-2 asserts "gradient computed twice" if D's parameters collect grads in the G backward.
        for p in self.disc.module.parameters():
            p.requires_grad_(flag)


# -- shared by the methods ----------------------------------------------------------------------------------


def host_to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor onto `device` without making the host wait: a copy from pageable memory would wait
    for the GPU's queue to drain first (a hidden sync per step), one from pinned memory is queued."""
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def _randn_like(x: torch.Tensor, rand: SampleRandom) -> torch.Tensor:
    # Drawn on the CPU from each sample's generator (trainer/runtime/randomness.py), then queued to the device.
    return host_to_device(rand.randn(x.shape[1:]), x.device)


def noisy_inputs(batch: dict, rand: SampleRandom, schedule: NoiseSchedule, timesteps: torch.Tensor,
                 student_steps: int):
    """The distillation objectives' shared start: x_t at a timestep drawn from the student's grid (pure
    noise at t = T), the next timestep on that grid, and the batch's conditioning. Returns
    (x_t, t, t_next, cond), all on the batch's device. Timesteps are drawn and stepped on the CPU (where
    no copy back is ever needed) and then queued to the device."""
    x0 = batch["latent"]
    eps = _randn_like(x0, rand)
    t_host = timesteps[rand.randint(len(timesteps))]
    t_next_host = next_timestep(t_host, student_steps, schedule.num_train_timesteps, check=False)  # drawn from it
    t, t_next = host_to_device(t_host, x0.device), host_to_device(t_next_host, x0.device)
    return schedule.add_noise(x0, eps, t), t, t_next, Conditioning.from_batch(batch)


def implied_x0(schedule: NoiseSchedule, x_t: torch.Tensor, x_next: torch.Tensor, t: torch.Tensor,
               t_next: torch.Tensor) -> torch.Tensor:
    """The x0 whose DDIM move from x_t at t lands on x_next at t_next (x_next itself when t_next = -1):
    x_next = a' x0 + s' (x_t - a x0) / s  =>  x0 = (x_next - (s'/s) x_t) / (a' - s' a / s)."""
    a, s = schedule.alpha_sigma(t.to(x_t.device))
    a2, s2 = schedule.alpha_sigma(t_next.to(x_t.device))
    return (x_next - (s2 / s) * x_t) / (a2 - s2 * a / s)


def check_loss_space(space: str) -> None:
    if space not in ("landing", "x0"):
        raise ValueError(f"loss_space must be landing or x0, got {space!r}")


def landing_mse(schedule: NoiseSchedule, space: str, x_t: torch.Tensor, landed: torch.Tensor,
                target: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """The distillation MSE between two landings from x_t: as they are ("landing"), or on the x0 each
    implies from x_t ("x0": per step, the landing error scaled by 1 / (a' - s' a / s), which weights the
    high-noise steps, where guidance decides shape, colour and layout, up against the later ones)."""
    if space == "x0":
        landed, target = (implied_x0(schedule, x_t, x, t, t_next) for x in (landed, target))
    return F.mse_loss(landed, target)


METHODS: dict[str, type[Method]] = {"denoise": Denoise, "mse": MSEDistill, "x0": X0Conversion,
                                    "adv_cond": Adversarial, "adv_uncond": Adversarial}
