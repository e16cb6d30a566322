"""DeepSpeed engines: the process group, the DeepSpeed config filled from the YAML, and one engine per
trained network (ZeRO stage 2, bf16). The student and (later) the discriminator each get their own."""
from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass

import torch

from trainer.config import ConfigError, OptimConfig, ds_config_from_file


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(collective_timeout_s: float = 1800.0, main_work_timeout_s: float = 14400.0) -> DistInfo:
    """Join (or create) the process group (trainer/runtime/collectives.py: device, groups, timeouts). torchrun sets
    RANK/WORLD_SIZE/...; under srun they come from SLURM's variables (trainer/runtime/dist_env.py); a plain
    `python -m ...` gets a one-process group (DeepSpeed otherwise goes looking for MPI)."""
    from trainer.runtime import collectives
    from trainer.runtime.dist_env import fill_from_slurm

    fill_from_slurm()  # an srun task (several per step): ranks, master and port from SLURM's variables
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    collectives.init(collective_timeout_s, main_work_timeout_s)
    return DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))


def device() -> torch.device:
    """This process's compute device: the GPU collectives.init chose from LOCAL_RANK, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# Keys the YAML owns; a DeepSpeed JSON that sets them differently contradicts the recipe.
_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def build_ds_config(path: str, micro_batch: int, grad_accum: int, world_size: int, optim: OptimConfig,
                    key_prefix: str) -> dict:
    """The DeepSpeed JSON (ZeRO, precision, buckets) plus what the YAML decides (batch, optimizer)."""
    ds = ds_config_from_file(path)
    wanted = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
    }
    for key in _BATCH_KEYS:
        if key in ds and ds[key] != "auto" and ds[key] != wanted[key]:
            raise ConfigError(f"{path}: {key}={ds[key]} contradicts the recipe ({key_prefix}.micro_batch x "
                              f"grad_accum x world size gives {key}={wanted[key]}); remove it from the JSON")
    if "optimizer" in ds or "scheduler" in ds:
        raise ConfigError(f"{path}: 'optimizer'/'scheduler' belong in the YAML ({key_prefix}.optim), not the JSON")
    ds.update(wanted)
    ds["optimizer"] = {"type": "AdamW" if optim.weight_decay else "Adam", "params": adam_params(ds, optim)}
    if optim.grad_clip > 0:
        ds["gradient_clipping"] = optim.grad_clip
    return ds


def adam_params(ds: dict, optim: OptimConfig) -> dict:
    """DeepSpeed's Adam settings. Nothing may need a compiler on the nodes: DeepSpeed's FusedAdam and
    CPUAdam are JIT-built C++/CUDA ops (nvcc, ninja, a shared build cache that many ranks race for), so
    torch's own Adam runs the step (fused kernels on a GPU), unless the optimizer is offloaded to the
    CPU and DeepSpeed's CPU Adam op came prebuilt with the installation (DS_BUILD_CPU_ADAM=1)."""
    from deepspeed.git_version_info import installed_ops

    offload = (ds.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device", "none") != "none"
    params = {"lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay}
    if offload and installed_ops.get("cpu_adam"):
        return params
    params["torch_adam"] = True
    if torch.cuda.is_available() and not offload:
        params["fused"] = True
    return params


def make_engine(model: torch.nn.Module, ds_config: dict):
    """One DeepSpeed engine over the model's trainable parameters (frozen ones stay out of the optimizer)."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config)
    return engine


def compute_dtype(ds: dict) -> torch.dtype:
    """The dtype a DeepSpeed config's engines compute in, which the frozen networks beside them (teacher,
    x0 phase's copy) run in too: bf16 where the engines do (a GPU), fp32 under an fp32 config, where a CPU
    without bf16 units would otherwise run the teacher ~30x slower than in fp32."""
    for key, dtype in (("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("fp16", torch.float16)):
        if (ds.get(key) or {}).get("enabled") is True:
            return dtype
    return torch.float32


def learning_rate(optim: OptimConfig, step: int, total_steps: int) -> float:
    """Linear warm-up then constant or cosine decay; a pure function of the step, so resume is exact."""
    if optim.warmup_steps and step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.decay == "cosine":
        span = max(1, total_steps - optim.warmup_steps)
        progress = min(1.0, (step - optim.warmup_steps) / span)
        return optim.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return optim.lr


def set_learning_rate(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def release_engines() -> None:
    """Frees what finished engines held. Call after their job returned and `engine.destroy()` removed
    ZeRO's gradient hooks: those hooks and the engines form reference cycles that only a full garbage
    collection breaks, so without this a phase would start with the last one's weights, fp32 master copies
    and Adam moments still in (GPU) memory."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
