"""Injected faults: non-finite losses and gradients."""
import pytest
import torch

from trainer.config import OptimConfig, ScheduleConfig
from trainer.engines import build_ds_config, init_distributed, make_engine
from trainer.models import build_toy_unet
from trainer.objectives import DenoiseObjective
from trainer.schedule import NoiseSchedule

from conftest import ROOT, run_cli


def batch(b=4, nan=False):
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(b, 12, 16, 16, generator=g)
    if nan:
        latent[0, 0, 0, 0] = float("nan")
    return {"latent": latent, "prompt_embeds": torch.randn(b, 16, 32, generator=g),
            "pooled": torch.randn(b, 32, generator=g), "time_ids": torch.tensor([[32., 32, 0, 0, 32, 32]] * b)}


@pytest.mark.parametrize("ds_file", ["zero2_cpu.json", "zero2_cpu_fp32.json"])
def test_nan_step_is_skipped_without_touching_weights_or_moments(ds_file):
    init_distributed()
    ds = build_ds_config(str(ROOT / "ds_configs" / ds_file), 4, 1, 1, OptimConfig(lr=1e-3), "test")
    engine = make_engine(build_toy_unet(), ds)
    objective = DenoiseObjective(engine, NoiseSchedule.from_config(ScheduleConfig()), "v_prediction", 0.0)
    objective.micro_step(batch(), torch.Generator().manual_seed(1))  # one good step: moments exist
    weights = {k: v.clone() for k, v in engine.module.state_dict().items()}
    moments = [v.clone() for st in engine.optimizer.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    skipped = engine.skipped_steps

    logs = objective.micro_step(batch(nan=True), torch.Generator().manual_seed(2))
    assert not torch.isfinite(logs["loss"])
    assert engine.skipped_steps == skipped + 1
    assert all(torch.equal(weights[k], v) for k, v in engine.module.state_dict().items())
    after = [v for st in engine.optimizer.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    assert all(torch.equal(a, b) for a, b in zip(moments, after, strict=True))

    objective.micro_step(batch(), torch.Generator().manual_seed(3))  # training goes on
    assert engine.skipped_steps == skipped + 1
    assert any(not torch.equal(weights[k], v) for k, v in engine.module.state_dict().items())


def test_consecutive_nonfinite_steps_stop_the_run_with_a_message(tmp_path):
    """An absurd learning rate blows the weights up; every later step is non-finite and skipped, and the
    run stops after run.max_consecutive_skips of them with exit code 3 and one clear line."""
    proc = run_cli(["trainer.run", "--config", "configs/smoke.yaml", "--set", f"run.out_dir={tmp_path}",
                    "--set", "teacher.optim.lr=1e30", "--set", "teacher.optim.warmup_steps=0",
                    "--set", "teacher.optim.grad_clip=0", "--set", "run.max_consecutive_skips=3"], check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "consecutive steps with NaN/Inf gradients (run.max_consecutive_skips=3)" in proc.stderr
    assert "step skipped" in proc.stdout
