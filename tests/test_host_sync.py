"""No host-device synchronisation in the trainer's hot step (#7).

On a GPU, reading a device tensor's value on the host (`.item()`, `bool(t)`, `if t.any()`, `.tolist()`)
makes the CPU wait until the GPU has run everything queued so far: the step then cannot run ahead of the
GPU. Every such read goes through aten._local_scalar_dense, which a dispatch mode sees on the CPU too, so
this test runs the trainer's micro-steps on real DeepSpeed engines and fails on any such read made by the
trainer's own code (DeepSpeed's own, e.g. its overflow check, are counted separately and not ours to fix).
"""
import copy
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from trainer.config import OptimConfig, ScheduleConfig
from trainer.method.discriminator import discriminator_from_unet
from trainer.runtime.engines import build_ds_config, compute_dtype, init_distributed, make_engine
from trainer.method.models import build_toy_unet, freeze
from trainer.method.methods import Adversarial, Denoise, MSEDistill
from trainer.runtime.randomness import SampleRandom
from trainer.method.schedule import NoiseSchedule

from conftest import ROOT, toy_batch

SCHED = NoiseSchedule.from_config(ScheduleConfig())
ADAM = OptimConfig(lr=1e-4, betas=[0.0, 0.99])


class HostReads(TorchDispatchMode):
    """Records where every device-to-host value read comes from: the trainer or someone else."""

    def __init__(self):
        super().__init__()
        self.ours: list[str] = []
        self.others = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            frames = [f for f in traceback.extract_stack() if "/trainer/" in f.filename]
            if frames and not any("/deepspeed/" in f.filename for f in traceback.extract_stack()):
                self.ours.append(f"{frames[-1].filename.split('/trainer/')[-1]}:{frames[-1].lineno} {frames[-1].line}")
            else:
                self.others += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def dist():
    return init_distributed()


def engines(dist, with_disc: bool):
    net = build_toy_unet(seed=0)
    ds = build_ds_config(str(ROOT / "ds_configs/zero2_cpu.json"), 4, 1, dist.world_size, ADAM, "test")
    student = make_engine(copy.deepcopy(net), ds)
    disc = make_engine(discriminator_from_unet(net, conditional=True), ds) if with_disc else None
    return student, disc, freeze(net, compute_dtype(ds))


def objectives(dist):
    student, disc, teacher = engines(dist, True)
    yield "adversarial, multi-timestep D", Adversarial(
        student, disc, teacher, SCHED, "v_prediction", "v_prediction", 2, 4, conditional=True,
        t_star=[10, 250, 500], t_star_weights=[1, 1, 1], mse_weight=1.0)
    student, _, teacher = engines(dist, False)
    yield "mse with CFG", MSEDistill(student, teacher, SCHED, "v_prediction", "v_prediction", 4, 16, 3.0)
    student, _, _ = engines(dist, False)
    yield "teacher training, min-SNR weighted, input perturbation", Denoise(
        student, SCHED, "v_prediction", 0.1, loss_weighting="min_snr", input_perturbation=0.1)


def test_micro_steps_read_nothing_back_from_the_device(dist):
    for name, objective in objectives(dist):
        objective.micro_step(toy_batch(), SampleRandom(0, range(4)))  # DeepSpeed's first-step set-up
        reads = HostReads()
        with reads:
            for i in range(2):
                logs = objective.micro_step(toy_batch(), SampleRandom(i + 1, range(4)))
        assert not reads.ours, f"{name}: the trainer reads device values on the host at {reads.ours}"
        assert all(torch.is_tensor(v) for v in logs.values()), "logs stay tensors until the loop's log step"


def test_the_detector_catches_a_host_read(dist):
    """The test above can fail: a per-t* branch on a device value, as the trainer once had, is caught."""
    reads = HostReads()
    with reads:
        d_t = torch.tensor([10, 250])
        _ = [ts for ts in (10, 250) if (d_t == ts).any()]  # noqa: F841
    assert reads.ours == [] and reads.others == 2  # not from trainer/: counted as someone else's
    import trainer.method.methods as methods_module

    source = "def probe(t):\n    return bool((t == 10).any())\n"
    code = compile(source, methods_module.__file__, "exec")  # attributed to a trainer file
    scope: dict = {}
    exec(code, scope)
    with reads:
        scope["probe"](torch.tensor([10]))
    assert len(reads.ours) == 1
