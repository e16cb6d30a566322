"""The adversarial step on two real DeepSpeed engines (ZeRO-2, bf16), in this process."""
import copy

import pytest
import torch

from trainer.config import OptimConfig, ScheduleConfig
from trainer.method.discriminator import discriminator_from_unet
from trainer.runtime.engines import build_ds_config, compute_dtype, init_distributed, make_engine
from trainer.method.models import build_toy_unet, freeze
from trainer.method.methods import Adversarial, implied_x0
from trainer.runtime.randomness import SampleRandom
from trainer.method.schedule import NoiseSchedule, move, next_timestep

from conftest import ROOT

SCHED = NoiseSchedule.from_config(ScheduleConfig())
ADAM = OptimConfig(lr=1e-3, betas=[0.0, 0.99], grad_clip=0.0)


@pytest.fixture(scope="module")
def dist():
    return init_distributed()


def batch(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"latent": torch.randn(b, 12, 16, 16, generator=g), "prompt_embeds": torch.randn(b, 16, 32, generator=g),
            "pooled": torch.randn(b, 32, generator=g), "time_ids": torch.tensor([[32., 32, 0, 0, 32, 32]] * b)}


def make_objective(dist, conditional=False, t_star=(), weights=()):
    teacher_net = build_toy_unet(seed=0)
    ds = build_ds_config(str(ROOT / "ds_configs/zero2_cpu.json"), 4, 1, dist.world_size, ADAM, "test")
    student = make_engine(copy.deepcopy(teacher_net), ds)
    disc = make_engine(discriminator_from_unet(teacher_net, conditional=conditional), ds)
    teacher = freeze(teacher_net, compute_dtype(ds))
    return Adversarial(student, disc, teacher, SCHED, "v_prediction", "v_prediction", 4, 8,
                                conditional=conditional, t_star=list(t_star), t_star_weights=list(weights))


def snapshot(engine):
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def changed(before, engine):
    after = engine.module.state_dict()
    return sum(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("conditional", [False, True])
def test_d_step_moves_only_d_and_g_step_only_the_student(dist, conditional):
    obj = make_objective(dist, conditional)
    p = obj.landings(batch(), SampleRandom(1, range(4)))
    s0, d0 = snapshot(obj.student), snapshot(obj.disc)
    logs = obj.d_step(p)
    assert changed(s0, obj.student) == 0 and changed(d0, obj.disc) > 0
    assert 0 <= float(logs["d_acc_real"]) <= 1 and torch.isfinite(logs["d_loss"])
    s1, d1 = snapshot(obj.student), snapshot(obj.disc)
    obj.g_step(p)
    assert changed(d1, obj.disc) == 0 and changed(s1, obj.student) > 0
    assert all(q.requires_grad for q in obj.disc.module.parameters())  # restored after the G step


def test_student_learns_only_through_d(dist):
    """With mse_weight 0 the student's only gradient comes through D: a D whose output ignores its input
    (zero last projection) gives the student no gradient, and Adam then does not move it;
    the same step through a normal D does. (D steps first, as in the loop: DeepSpeed sets up its
    gradient buckets on the first backward.)"""
    for zero_head, expect_moved in ((True, False), (False, True)):
        obj = make_objective(dist)
        p = obj.landings(batch(), SampleRandom(2, range(4)))
        obj.d_step(p)
        if zero_head:  # after D's step, which rewrites the bf16 module weights from its fp32 master copy
            with torch.no_grad():
                [m for m in obj.disc.module.head.modules() if isinstance(m, torch.nn.Conv2d)][-1].weight.zero_()
        s0 = snapshot(obj.student)
        obj.g_step(p)
        assert (changed(s0, obj.student) > 0) == expect_moved


def test_multi_timestep_renoises_both_to_t_star(dist):
    obj = make_objective(dist, t_star=(10, 250, 500, 750), weights=(5, 1, 1, 1))
    p = obj.landings(batch(b=32), SampleRandom(3, range(32)))
    assert set(p["d_t"].tolist()) <= {10, 250, 500, 750}
    assert (p["d_t"] == 10).sum() > 8  # weight 5 of 8
    logs = obj.d_step(p)
    assert any(k.startswith("d_acc_fake_t") for k in logs)


def test_d_warmup_does_not_touch_the_student(dist):
    obj = make_objective(dist)
    obj.d_only = True
    s0, d0 = snapshot(obj.student), snapshot(obj.disc)
    logs = obj.micro_step(batch(), SampleRandom(4, range(4)))
    assert "g_loss" not in logs and changed(s0, obj.student) == 0 and changed(d0, obj.disc) > 0


def test_progress_sets_d_warmup_and_switches_the_t_star_weights_halfway():
    """What changes along a phase is the method's own (set_progress), a pure function of the step."""
    obj = Adversarial(None, None, None, SCHED, "v_prediction", "v_prediction", 2, 4, conditional=False,
                      t_star=[10, 250], t_star_weights=[1, 1], warmup_steps=3, late_weights=[5, 1])
    seen = []
    for step in range(10):
        obj.set_progress(step, 10)
        seen.append((obj.d_only, obj.t_star_weights.tolist()))
    assert [d for d, _ in seen] == [True] * 3 + [False] * 7
    assert [w for _, w in seen] == [[1.0, 1.0]] * 5 + [[5.0, 1.0]] * 5
    obj.set_progress(2, 10)  # a resume mid-phase lands in the same state
    assert obj.d_only and obj.t_star_weights.tolist() == [1.0, 1.0]


def test_after_the_warm_up_the_student_steps_on_every_nth_step_only():
    obj = Adversarial(None, None, None, SCHED, "v_prediction", "v_prediction", 2, 4, conditional=False,
                      t_star=[10], t_star_weights=[1], warmup_steps=2, d_per_student=3)
    student_steps = []
    for step in range(11):
        obj.set_progress(step, 11)
        student_steps.append(not obj.d_only)
    assert student_steps == [False, False, True, False, False, True, False, False, True, False, False]
    obj.set_progress(5, 11)  # a resume mid-phase lands in the same state
    assert not obj.d_only


def test_implied_x0_inverts_a_ddim_move():
    g = torch.Generator().manual_seed(5)
    x_t, out = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([999, 749, 499])
    t_next = next_timestep(t, 4)
    x_next = move(SCHED, out, x_t, t, t_next, "epsilon")
    x0, _ = SCHED.to_x0_eps(out, x_t, t, "epsilon")
    assert torch.allclose(implied_x0(SCHED, x_t, x_next, t, t_next), x0, atol=1e-3)
    last = torch.tensor([249])
    x_last = move(SCHED, out[:1], x_t[:1], last, next_timestep(last, 4), "epsilon")
    assert torch.allclose(implied_x0(SCHED, x_t[:1], x_last, last, torch.tensor([-1])), x_last)


def test_x0_head_from_v_predicts_x0_at_T_up_to_alpha_x_t():
    from trainer.method.models import Conditioning, unet_forward
    from trainer.method.methods import x0_head_from_v

    v_net = build_toy_unet(seed=3)
    x0_net = copy.deepcopy(v_net)
    x0_head_from_v(x0_net, SCHED)
    b = batch(2)
    cond = Conditioning.from_batch(b)
    x_t = torch.randn(2, 12, 16, 16, generator=torch.Generator().manual_seed(6))
    t = torch.full((2,), 999)
    with torch.no_grad():
        x0_from_v, _ = SCHED.to_x0_eps(unet_forward(v_net, x_t, t, cond, torch.float32), x_t, t, "v_prediction")
        direct = unet_forward(x0_net, x_t, t, cond, torch.float32)
    alpha, _ = SCHED.alpha_sigma(t)
    assert torch.allclose(direct, x0_from_v - alpha * x_t, atol=1e-5)


def test_mse_objective_in_x0_space_is_the_landing_error_rescaled(dist):
    """mse_space x0 compares the x0 the two landings imply from x_t: per sample, the landing error divided
    by (a' - s' a / s); a student equal to a teacher without guidance has zero loss in both spaces."""
    from trainer.method.methods import MSEDistill

    net = build_toy_unet(seed=0)
    ds = build_ds_config(str(ROOT / "ds_configs/zero2_cpu_fp32.json"), 4, 1, dist.world_size, ADAM, "test")
    losses = {}
    for space in ("landing", "x0"):
        student = make_engine(copy.deepcopy(net), ds)
        obj = MSEDistill(student, freeze(copy.deepcopy(net), torch.float32), SCHED, "v_prediction",
                                  "v_prediction", 4, 4, 1.0, loss_space=space)
        losses[space] = float(obj.micro_step(batch(), SampleRandom(3, range(4)))["loss"])
    assert losses["landing"] < 1e-10 and losses["x0"] < 1e-10
    x_t, landed, target = torch.randn(3, 12, 16, 16), torch.randn(3, 12, 16, 16), torch.randn(3, 12, 16, 16)
    t, t_next = torch.tensor([999, 749, 249]), torch.tensor([749, 499, -1])
    a, s = SCHED.alpha_sigma(t)
    a2, s2 = SCHED.alpha_sigma(t_next)
    scale = 1 / (a2 - s2 * a / s)
    err = implied_x0(SCHED, x_t, landed, t, t_next) - implied_x0(SCHED, x_t, target, t, t_next)
    torch.testing.assert_close(err, scale * (landed - target), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="loss_space"):
        MSEDistill(None, None, SCHED, "v_prediction", "v_prediction", 4, 4, 1.0, loss_space="eps")


def test_accumulated_micro_batches_equal_one_larger_micro_batch(tmp_path):
    """2 ranks, fp32 ZeRO-2: grad_accum 4 x micro-batch 2 gives the same student and D as one micro-batch
    of 8 (two optimizer steps, conditional multi-timestep D, MSE term), within float32 summation error.
    The control, D stepped before G in each micro-batch, moves the student 100x further off: the last
    micro-batch's G step would judge through an updated D and the others through the old one."""
    import json
    import subprocess
    import sys

    from conftest import cli_env

    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "tests" / "accumulation_runner.py")], cwd=ROOT, env=cli_env(OUT=str(tmp_path)),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "accumulation.json").read_text())
    for name in ("student", "disc"):
        assert result[name]["update"] > 1e-5, result  # the step really moved the weights
        assert result[name]["difference"] <= 1e-2 * result[name]["update"], result
    assert result["student"]["control_difference"] > 10 * 1e-2 * result["student"]["update"], result


def test_the_mse_term_is_in_landing_space_whatever_d_is_shown(dist):
    """The MSE beside the adversarial loss compares the landings x_{t_next} (stage 1's space): the same
    value with D shown the landings, or x0 re-noised to t* = 10 or to t* = 750."""
    values = []
    for t_star in ((), (10,), (750,)):
        obj = make_objective(dist, t_star=t_star, weights=(1,) * len(t_star))
        obj.mse_weight = 1.0
        p = obj.landings(batch(), SampleRandom(7, range(4)))
        expected = torch.nn.functional.mse_loss(p["fake_landing"], p["real_landing"]).detach()
        if t_star:  # D sees something else than the landings
            assert not torch.allclose(p["fake"], p["fake_landing"])
        logs = obj.g_step(p)
        assert torch.equal(logs["mse"], expected)
        values.append(float(logs["mse"]))
    assert values[0] == pytest.approx(values[1]) == pytest.approx(values[2])


def test_the_mse_term_in_x0_space_compares_the_implied_x0(dist):
    """`mse_space: x0` for the adversarial stages: the term compares the x0 the two landings imply from x_t,
    again whatever D is shown, and differs from the landing-space value (4 steps: 1 / (a' - s' a / s) is
    1 to 6)."""
    values = {}
    for space, t_star in (("x0", ()), ("x0", (250,)), ("landing", (250,))):
        obj = make_objective(dist, t_star=t_star, weights=(1,) * len(t_star))
        obj.mse_weight, obj.mse_space = 1.0, space
        p = obj.landings(batch(), SampleRandom(7, range(4)))
        x0 = [implied_x0(SCHED, p["x_t"], p[k].detach(), p["t"], p["t_next"]) for k in ("fake_landing", "real_landing")]
        values[space, t_star] = float(obj.g_step(p)["mse"])
        if space == "x0":
            assert values[space, t_star] == pytest.approx(float(torch.nn.functional.mse_loss(*x0)), rel=1e-6)
    assert values["x0", ()] == pytest.approx(values["x0", (250,)])
    assert values["x0", (250,)] > 1.5 * values["landing", (250,)]
