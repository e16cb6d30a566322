import pytest
import torch

from trainer.config import ScheduleConfig
from trainer.method.models import Conditioning, guided_denoiser
from trainer.method.sampling import make_scheduler
from trainer.method.schedule import NoiseSchedule, move, next_timestep, teacher_jump, trailing_timesteps

SCHED = NoiseSchedule.from_config(ScheduleConfig())


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 32, 128])
def test_trailing_matches_diffusers(steps):
    ref = make_scheduler(ScheduleConfig(), "epsilon")
    ref.set_timesteps(steps)
    assert trailing_timesteps(steps) == [int(t) for t in ref.timesteps]
    assert trailing_timesteps(4) == [999, 749, 499, 249]


def test_alphas_match_diffusers():
    ref = make_scheduler(ScheduleConfig(), "epsilon")
    assert torch.allclose(SCHED.alphas_cumprod.float(), ref.alphas_cumprod.float(), atol=1e-7)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_conversions_round_trip(pred):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([10, 250, 500, 998])
    x_t = SCHED.add_noise(x0, eps, t)
    out = SCHED.target(x0, eps, t, pred)
    x0_hat, eps_hat = SCHED.to_x0_eps(out, x_t, t, pred)
    assert torch.allclose(x0_hat, x0, atol=1e-4) and torch.allclose(eps_hat, eps, atol=1e-4)


@pytest.mark.parametrize("plus_one", [False, True])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weight_turns_each_plain_loss_into_the_same_x0_weighting(pred, plus_one):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 3, 8, 8, generator=g), torch.randn(5, 3, 8, 8, generator=g)
    t = torch.tensor([5, 100, 300, 700, 998])
    x_t = SCHED.add_noise(x0, eps, t)
    target = SCHED.target(x0, eps, t, pred)
    out = target + 0.1 * torch.randn(target.shape, generator=g)  # a network's error
    x0_hat, _ = SCHED.to_x0_eps(out, x_t, t, pred)
    alpha, sigma = SCHED.alpha_sigma(t)
    snr = (alpha / sigma).square().flatten()
    weighted = (SCHED.min_snr_weight(t, 5.0, pred, plus_one) * (out - target).square()).mean((1, 2, 3))
    x0_error = (x0_hat - x0).square().mean((1, 2, 3))
    torch.testing.assert_close(weighted, (snr + plus_one).clamp(max=5.0) * x0_error, rtol=1e-3, atol=1e-7)
    assert snr[0] > 5 and snr[-1] < 5  # the cap acts at the low-noise end only


def test_pure_noise_at_T_only_at_T():
    x0, eps = torch.ones(2, 1, 2, 2), torch.full((2, 1, 2, 2), 0.5)
    x = SCHED.add_noise(x0, eps, torch.tensor([999, 998]))
    assert torch.equal(x[0], eps[0]) and not torch.equal(x[1], eps[1])
    off = NoiseSchedule(SCHED.alphas_cumprod, pure_noise_at_T=False)
    assert not torch.equal(off.add_noise(x0, eps, torch.tensor([999, 998]))[0], eps[0])


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_move_equals_euler_trailing_step(pred):
    """A student trained on `move` must sample correctly with diffusers' Euler (trailing) scheduler."""
    g = torch.Generator().manual_seed(1)
    steps = 4
    sched = make_scheduler(ScheduleConfig(), pred)
    sched.set_timesteps(steps)
    x = torch.randn(2, 3, 8, 8, generator=g)  # unit-variance noise, as sampling starts
    # Euler's state is x * sqrt(1 + sigma^2) (diffusers' init_noise_sigma for trailing is sigma_max, 0.2% off)
    xs = x * float((1 + sched.sigmas[0] ** 2) ** 0.5)
    for i, t in enumerate(sched.timesteps):
        out = torch.randn(2, 3, 8, 8, generator=g)
        t_batch = torch.full((2,), int(t))
        x = move(SCHED, out, x, t_batch, next_timestep(t_batch, steps), pred)
        xs = sched.step(out, t, xs).prev_sample
        # Euler works on x * sqrt(1 + sigma^2); our x is the DDPM-scaled latent
        scale = 1.0 if i == steps - 1 else float((1 + sched.sigmas[i + 1] ** 2) ** 0.5)
        assert torch.allclose(xs / scale, x, atol=1e-4, rtol=1e-4), f"step {i}"


def test_next_timestep_chain():
    t = torch.tensor([999])
    chain = []
    while int(t) != -1:
        chain.append(int(t))
        t = next_timestep(t, 4)
    assert chain == [999, 749, 499, 249]
    with pytest.raises(ValueError, match="not on the 4-step"):
        next_timestep(torch.tensor([500]), 4)
    # Unchecked (the training step's lookup, no read-back): an off-grid t still fails loudly at its use.
    with pytest.raises(IndexError):
        SCHED.alpha_sigma(next_timestep(torch.tensor([500]), 4, check=False))


def test_student_grid_is_every_nth_teacher_timestep():
    for student, teacher in [(32, 128), (8, 32), (4, 8), (2, 4), (1, 2)]:
        assert trailing_timesteps(student) == trailing_timesteps(teacher)[:: teacher // student]


def test_teacher_jump_is_n_moves_and_cfg_is_one_doubled_batch():
    calls = []

    class Net(torch.nn.Module):
        def forward(self, x, t, encoder_hidden_states, added_cond_kwargs=None, return_dict=False):
            calls.append(x.shape[0])
            # conditional rows see embeds of 1, unconditional rows zeros: output differs by design
            return (0.1 * x + encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1),)

    cond = Conditioning(torch.ones(3, 4, 8), torch.ones(3, 8), torch.zeros(3, 6))
    x = torch.randn(3, 2, 4, 4)
    t = torch.full((3,), 999)
    denoise = guided_denoiser(Net(), cond, guidance=6.0, dtype=torch.float32)
    out = teacher_jump(SCHED, denoise, x, t, 4, 128, "epsilon")
    assert calls == [6, 6, 6, 6]  # 4 moves, each one doubled batch
    # by hand: the guided output is uncond + 6 * (cond - uncond) = 0.1 x + 6
    ref, tt = x.clone(), t
    for _ in range(4):
        nt = next_timestep(tt, 128)
        ref = move(SCHED, 0.1 * ref + 6.0, ref, tt, nt, "epsilon")
        tt = nt
    assert int(tt[0]) == trailing_timesteps(32)[1]
    assert torch.allclose(out, ref, atol=1e-5)
