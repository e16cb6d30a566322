"""A phase as a job of the loop: where it starts (`PhaseStart`), then `run_phase` builds its method, trains
it, frees its engines and exports its result. The teacher job and every stage phase take this one path.

A phase's kind picks its method (trainer/method/methods.py METHODS); the method asks `PhaseStart` for the
networks it needs. Each folder is read from disk once per phase: the frozen teacher, the x0 phase's frozen
copy and D's encoder reuse a module already read when they come from the same folder.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from trainer.config import Config, OptimConfig, PhaseConfig, StageConfig, ds_config_from_file
from trainer.export import export_unet
from trainer.method.methods import METHODS, Method
from trainer.method.models import freeze, frozen_copy, load_unet
from trainer.method.schedule import NoiseSchedule
from trainer.runtime.checkpoint import CheckpointManager, fp32_weights
from trainer.runtime.engines import DistInfo, build_ds_config, compute_dtype, device, make_engine, release_engines
from trainer.runtime.loop import Job, train
from trainer.runtime.preemption import solo


@dataclass
class PhaseStart:
    """Everything a phase is built from: the recipe, the phase (resolved), where its networks come from and
    how its global batch splits over this run's ranks."""
    cfg: Config
    info: DistInfo
    name: str  # the job's name: "teacher", "stage2_8.0_adv_cond_lora"
    key: str  # the config section, for messages: "teacher", "stages[1]"
    phase: PhaseConfig
    student_dir: Path  # the UNet the student starts from (a LoRA phase: the UNet its adapter is added to)
    student_pred: str
    micro_batch: int
    accumulation: int
    deepspeed: str  # the DeepSpeed JSON
    gradient_checkpointing: bool
    ema_decay: float = 0.0
    stage: Optional[StageConfig] = None  # None for the teacher job
    teacher_dir: Optional[Path] = None
    teacher_pred: str = ""
    disc_base: Optional[Path] = None  # whose encoder D copies
    lora_dir: Optional[Path] = None  # the LoRA this phase's adapter continues (an earlier phase's or stage's)
    lora_extract_from: Optional[Path] = None  # else: start the adapter as the SVD of (this UNet - student_dir)
    unet_config: dict = field(default_factory=dict)  # the student's, set by `trainable`
    _read: dict = field(default_factory=dict)

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accumulation * self.info.world_size

    @cached_property
    def schedule(self) -> NoiseSchedule:
        return NoiseSchedule.from_config(self.cfg.schedule)

    def read_unet(self, folder: Path, only: Optional[tuple[str, ...]] = None) -> torch.nn.Module:
        """The UNet of `folder`: the module already read from it in this phase if there is one, else read
        now (only the `only` parts, if given; a partial read is not kept for reuse)."""
        for path, module in self._read.items():
            if Path(path).resolve() == Path(folder).resolve():
                return module
        module = load_unet(folder, only=only)
        if only is None:
            self._read[folder] = module
        return module

    def forget_networks(self) -> None:
        self._read.clear()

    def frozen(self, unet: torch.nn.Module, student_source: torch.nn.Module) -> torch.nn.Module:
        """`unet` frozen on this process's device in the engines' compute dtype; a copy when it is also the
        module the student trains."""
        dtype = compute_dtype(ds_config_from_file(self.deepspeed))
        return frozen_copy(unet, device(), dtype) if unet is student_source else freeze(unet, dtype).to(device())

    def trainable(self, unet: torch.nn.Module) -> torch.nn.Module:
        """The student: `unet` itself, or with this stage's LoRA (fresh, or the previous LoRA phase's)."""
        if self.phase.train == "lora":
            from trainer.method.lora import add_lora, init_lora_from_difference, load_lora_into

            lora = self.stage.lora
            unet = add_lora(unet, rank=lora.rank, alpha=lora.alpha, init_seed=self.cfg.run.seed)
            start = "fresh"
            if self.lora_dir is not None:
                load_lora_into(unet, self.lora_dir / "lora" / "pytorch_lora_weights.safetensors")
                start = f"continuing {self.lora_dir}"
            elif self.lora_extract_from is not None:
                held = init_lora_from_difference(unet, self.read_unet(self.lora_extract_from))
                start = f"extracted from {self.lora_extract_from} by SVD: {held:.0%} of the weight difference"
            if self.info.is_main:
                print(f"[{self.name}] student: {self.student_dir} + LoRA rank {lora.rank} ({start})", flush=True)
        self.unet_config = dict(unet.config)
        if self.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        return unet

    def engine(self, module: torch.nn.Module, optim: OptimConfig):
        ds = build_ds_config(self.deepspeed, self.micro_batch, self.accumulation, self.info.world_size, optim, self.key)
        return make_engine(module, ds)


@dataclass
class PhaseExport:
    """What the phase's export says about using it."""
    steps: int
    prediction_type: str
    base_dir: Path  # the folder whose other parts (text encoders, VAE) the export links
    guidance: float = 1.0
    notes: Optional[dict] = None


def run_phase(start: PhaseStart, job_dir: Path, result: Path, export: PhaseExport,
              make_grid: Optional[Callable[[torch.nn.Module], np.ndarray]] = None, probe=None) -> None:
    """Trains the phase (or resumes it), frees its engines and networks, then rank 0 exports its result."""
    dev = device()
    if start.info.is_main and dev.type == "cuda":
        print(f"[{start.name}] GPU memory at phase start: {torch.cuda.memory_allocated(dev) / 2**30:.2f} GiB allocated, "
              f"{torch.cuda.memory_reserved(dev) / 2**30:.2f} GiB reserved", flush=True)
    method: Method = METHODS[start.phase.kind].build(start)
    start.forget_networks()  # the method holds what it needs; a module left here would keep its engine alive
    try:
        final = train(Job(start.name, job_dir, start.phase.samples, start.micro_batch, start.accumulation, method,
                          ema_decay=start.ema_decay, make_grid=make_grid, probe=probe), start.cfg, start.info)
    finally:
        method.close()
    del method
    release_engines()  # nothing of the phase's engines is left when rank 0 exports, or the next phase builds

    def write() -> None:
        # the average when there is one (the ZeRO consolidation of the last iterate would go unused)
        if start.ema_decay:
            weights = CheckpointManager.load_tensors(final, "ema.safetensors")
        else:
            began = time.perf_counter()
            weights = fp32_weights(final, "student")
            print(f"[rank 0] consolidating {start.name}'s ZeRO partitions: {time.perf_counter() - began:.1f} s", flush=True)
        extra = None
        if start.phase.train == "lora":
            weights, extra = _lora_result(start, weights)
        export_unet(weights, start.unet_config, result, base_dir=export.base_dir, schedule=start.cfg.schedule,
                    prediction_type=export.prediction_type, steps=export.steps, guidance=export.guidance,
                    stage=start.name, notes=export.notes, extra=extra, portable=start.cfg.export.portable)

    solo(f"exporting {start.name}", write)


def _lora_result(start: PhaseStart, trained: dict[str, torch.Tensor]):
    """(merged fp32 weights, writer of the LoRA file). The checkpoint holds the frozen base weights in bf16,
    so the base comes from the student's fp32 folder and only the LoRA weights from the checkpoint."""
    from trainer.method.lora import add_lora, merge_lora, save_lora

    lora_cfg = start.stage.lora
    unet = add_lora(load_unet(start.student_dir), rank=lora_cfg.rank, alpha=lora_cfg.alpha, init_seed=start.cfg.run.seed)
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
