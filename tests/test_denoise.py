"""The teacher's training step (Denoise): what the network sees and what it is scored against."""
import pytest
import torch
import torch.nn.functional as F

from trainer.config import OptimConfig, ScheduleConfig
from trainer.method.methods import Denoise
from trainer.method.models import build_toy_unet
from trainer.method.schedule import NoiseSchedule
from trainer.runtime.engines import build_ds_config, init_distributed, make_engine
from trainer.runtime.randomness import SampleRandom

from conftest import ROOT, toy_batch

SCHED = NoiseSchedule.from_config(ScheduleConfig())
B = 4


def one_step(input_perturbation: float, seed: int = 7):
    """The loss of one micro-step, the x_t the network was given and its output."""
    init_distributed()
    ds = build_ds_config(str(ROOT / "ds_configs/zero2_cpu_fp32.json"), B, 1, 1, OptimConfig(lr=0.0), "test")
    engine = make_engine(build_toy_unet(seed=0), ds)
    seen = {}

    def record(module, args, kwargs, output):
        seen["x_t"], seen["out"] = args[0].detach().clone(), output[0].detach().float().clone()

    engine.module.register_forward_hook(record, with_kwargs=True)
    objective = Denoise(engine, SCHED, "v_prediction", 0.0, input_perturbation=input_perturbation)
    loss = objective.micro_step(toy_batch(B), SampleRandom(seed, range(B)))["loss"]
    return loss, seen["x_t"], seen["out"]


@pytest.mark.parametrize("gamma", [0.0, 0.3])
def test_input_perturbation_moves_the_input_and_keeps_the_target(gamma):
    loss, x_t, out = one_step(gamma)
    # the same draws, in the step's order: the noise, t, caption keep, then the perturbation
    rand = SampleRandom(7, range(B))
    eps, t, _ = rand.randn((12, 16, 16)), rand.randint(SCHED.num_train_timesteps), rand.rand()
    x0 = toy_batch(B)["latent"]
    alpha, sigma = SCHED.alpha_sigma(t)
    expected_input = alpha * x0 + sigma * eps
    if gamma:
        expected_input = expected_input + sigma * gamma * rand.randn((12, 16, 16))
    torch.testing.assert_close(x_t, expected_input)
    # scored against the unperturbed noise's target, whatever the input saw
    torch.testing.assert_close(loss, F.mse_loss(out, SCHED.target(x0, eps, t, "v_prediction")))


def test_input_perturbation_changes_what_the_network_sees():
    """Guards the test above from passing on a perturbation that never reaches the network."""
    _, plain, _ = one_step(0.0)
    _, perturbed, _ = one_step(0.3)
    assert (perturbed - plain).abs().max() > 0.05
