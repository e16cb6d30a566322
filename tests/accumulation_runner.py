"""Run on 2 gloo ranks by tests/test_adversarial.py: two optimizer steps of the adversarial objective
(conditional D, multi-timestep, MSE term) on real fp32 ZeRO-2 engines, once as 4 accumulated micro-batches
of 2 per rank and once as one micro-batch of 8 per rank, from the same weights and data. Also the same
with the D step before the G step (the order that breaks the equality), as a control. Rank 0 writes the
largest weight differences to $OUT/accumulation.json."""
import copy
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.config import OptimConfig, ScheduleConfig  # noqa: E402
from trainer.method.discriminator import discriminator_from_unet  # noqa: E402
from trainer.runtime.engines import build_ds_config, init_distributed, make_engine  # noqa: E402
from trainer.method.models import build_toy_unet, freeze  # noqa: E402
from trainer.method.methods import Adversarial  # noqa: E402
from trainer.data.loader import rank_positions  # noqa: E402
from trainer.runtime.randomness import SampleRandom  # noqa: E402
from trainer.method.schedule import NoiseSchedule  # noqa: E402

SCHED = NoiseSchedule.from_config(ScheduleConfig())
# eps 1: Adam's first steps are then ~ lr x gradient, smooth in the gradient, so summation-order
# differences stay at float32 size instead of flipping lr x sign(g) for gradients near zero.
ADAM = OptimConfig(lr=1e-2, betas=[0.0, 0.99], eps=1.0, grad_clip=1.0)
PER_RANK, STEPS, SEED = 8, 2, 0


class DiscFirst(Adversarial):
    """The control: D step, then G step, in every micro-batch."""

    def micro_step(self, batch, rand):
        p = self.landings(batch, rand)
        logs = self.d_step(p)
        logs.update(self.g_step(p))
        return logs


def data(step: int, rank: int) -> dict:
    g = torch.Generator().manual_seed(1000 * step + rank)
    b = PER_RANK
    return {"latent": torch.randn(b, 12, 16, 16, generator=g), "prompt_embeds": torch.randn(b, 16, 32, generator=g),
            "pooled": torch.randn(b, 32, generator=g), "time_ids": torch.tensor([[32., 32, 0, 0, 32, 32]] * b)}


def train(net, world: int, rank: int, micro_batch: int, objective_class=Adversarial) -> dict:
    accum = PER_RANK // micro_batch
    ds = build_ds_config(str(ROOT / "ds_configs/zero2_cpu_fp32.json"), micro_batch, accum, world, ADAM, "test")
    student = make_engine(copy.deepcopy(net), ds)
    disc = make_engine(discriminator_from_unet(net, conditional=True, seed=0), ds)
    objective = objective_class(student, disc, freeze(copy.deepcopy(net), torch.float32), SCHED, "v_prediction",
                                "v_prediction", 2, 4, conditional=True, t_star=[10, 250, 500, 750],
                                t_star_weights=[1, 1, 1, 1], mse_weight=0.5)
    samples_seen = 0
    for step in range(STEPS):
        batch = data(step, rank)
        positions = rank_positions(samples_seen, rank, world, PER_RANK)  # the loader's layout
        for micro in range(accum):
            part = {k: v[micro * micro_batch:(micro + 1) * micro_batch] for k, v in batch.items()}
            objective.micro_step(part, SampleRandom(SEED, positions[micro * micro_batch:(micro + 1) * micro_batch]))
        samples_seen += PER_RANK * world
    weights = {name: {k: v.detach().clone() for k, v in e.module.state_dict().items()} for name, e in objective.engines.items()}
    for engine in objective.engines.values():
        engine.destroy()
    return weights


def largest(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


info = init_distributed()
net = build_toy_unet(seed=0)
start = {"student": dict(net.state_dict()), "disc": discriminator_from_unet(net, conditional=True, seed=0).state_dict()}
one_micro_batch = train(net, info.world_size, info.rank, micro_batch=8)
accumulated = train(net, info.world_size, info.rank, micro_batch=2)
control = {name: train(net, info.world_size, info.rank, micro_batch=m, objective_class=DiscFirst)
           for name, m in (("one", 8), ("accumulated", 2))}
if info.rank == 0:
    result = {}
    for name in ("student", "disc"):
        result[name] = {
            "update": largest(one_micro_batch[name], start[name]),
            "difference": largest(accumulated[name], one_micro_batch[name]),
            "control_difference": largest(control["accumulated"][name], control["one"][name]),
        }
    Path(os.environ["OUT"], "accumulation.json").write_text(json.dumps(result, indent=1))
