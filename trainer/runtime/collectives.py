"""Every collective the trainer uses, in one place (DeepSpeed's engines run their own).

Device. NCCL reduces only CUDA tensors and gloo only CPU ones, so every tensor handed to a collective
here lives on `group_device()`. The process's GPU is chosen from LOCAL_RANK before the process group
exists, so NCCL's communicator, `torch.cuda.current_device()` and the engines agree on one GPU.

Two groups, two timeouts:
- the default group (NCCL on GPUs, gloo on CPUs), `run.collective_timeout_s`: the training step's
  collectives and checkpoint writes, where every rank works and none should wait long for another;
- the host group (gloo, CPU tensors, `run.main_work_timeout_s`): the other ranks wait in it while rank 0
  alone works (`on_main`: writing the toy base model, encoding the toy data, consolidating and exporting
  weights, the comparison grid), which at SDXL size takes minutes, longer than a collective of the step
  should ever be allowed to hang; and small agreements that must not wait for the GPU (`any_rank_host`,
  e.g. whether a stop signal came, asked before every micro-step).

Every function is also right for a single process without a process group (tests, tools).
"""
from __future__ import annotations

import math
import os
import time
from datetime import timedelta
from typing import Callable, Optional, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

_host_group = None


def init(collective_timeout_s: float, main_work_timeout_s: float) -> None:
    """Picks this process's GPU, then joins (or creates) the process group and the rank-0 wait group.
    RANK / LOCAL_RANK / WORLD_SIZE / MASTER_* must be set (trainer.runtime.engines.init_distributed does it)."""
    global _host_group
    cuda = torch.cuda.is_available()
    if cuda:  # before the group: NCCL binds its communicator to the current device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    if not dist.is_initialized():
        import deepspeed

        _skip_deepspeed_shm_build()
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False,
                                   timeout=timedelta(seconds=collective_timeout_s))
    if _host_group is None and dist.get_world_size() > 1:
        _host_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=main_work_timeout_s))


def shutdown() -> None:
    """Leaves both groups, on every rank, once the run has ended the same way on all of them. A gloo group
    still alive when the interpreter exits tears its worker threads down during finalization, where a rank
    can die of SIGABRT after a run that succeeded (or stopped for a requeue): its exit status then says
    failed (bench/README.md, "Leaving the process group")."""
    global _host_group
    if not dist.is_initialized():
        return
    if _host_group is not None:
        dist.destroy_process_group(_host_group)
        _host_group = None
    dist.destroy_process_group()


def _skip_deepspeed_shm_build() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce, used only for inference, whenever a
    process group starts: a compiler run on every fresh machine, and a build killed midway leaves a lock
    file that every later run on that machine waits on forever. Training never uses it: mark it unusable."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def is_distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def group_device() -> torch.device:
    """Where the default group's collectives want their tensors: this process's GPU under NCCL."""
    if dist.is_initialized() and "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank if it is True on any (a host-device sync under NCCL: not for every step)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=group_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def any_rank_host(flag: bool) -> bool:
    """any_rank in the host group: a CPU all-reduce that never waits for the GPU's queue to drain."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device="cpu")  # the host group is gloo: CPU tensors, never CUDA
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_host_group)
    return bool(t.item())


def gather_strings(value: str) -> list[str]:
    """Every rank's `value`, in rank order, on every rank."""
    if not is_distributed():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each key averaged over the ranks that logged a finite value for it (ranks may log different keys,
    e.g. per-t* terms that no sample of a rank drew)."""
    if not is_distributed():
        return values
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, values)
    keys = sorted({k for g in gathered for k in g})
    seen = {k: [g[k] for g in gathered if k in g and not math.isnan(g[k])] for k in keys}
    return {k: sum(v) / len(v) if v else math.nan for k, v in seen.items()}


def broadcast(value: T, src: int = 0) -> T:
    """Rank `src`'s (picklable) value on every rank."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class MainWorkFailed(RuntimeError):
    """Rank 0's solo work raised; the other ranks stop with its message instead of hanging."""

    def __init__(self, message: str, error_type: str):
        super().__init__(message)
        self.error_type = error_type  # the class name of what rank 0 raised


def on_main(what: str, work: Callable[[], T], log: bool = True) -> T:
    """Rank 0 runs `work` alone; the other ranks wait for it in the rank-0 wait group (up to
    run.main_work_timeout_s, not the step's collective timeout) and receive its result, which must be
    small and picklable. If rank 0's work raises, every rank raises."""
    outcome: list = [None, "", ""]  # result, error type, error message
    error: Optional[BaseException] = None
    if is_main():
        start = time.perf_counter()
        try:
            outcome[0] = work()
        except Exception as err:  # every rank must hear about it, or they wait until the timeout
            error, outcome[1], outcome[2] = err, type(err).__name__, str(err)
        if log:
            print(f"[rank 0] {what}: {time.perf_counter() - start:.1f} s", flush=True)
    if is_distributed():
        dist.broadcast_object_list(outcome, src=0, group=_host_group)
    if error is not None:
        raise error
    if outcome[1]:
        raise MainWorkFailed(f"rank 0 failed while {what}: {outcome[1]}: {outcome[2]}", outcome[1])
    return outcome[0]
