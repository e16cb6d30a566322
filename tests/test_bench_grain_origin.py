"""bench/grain_origin.py on the smoke progression's teacher: the trajectory it measures is the model's sampler's."""
from __future__ import annotations

import json
import math

import torch

from bench import grain_origin
from trainer.config import load_config
from trainer.export import prediction_type_of
from trainer.method.models import Conditioning, guided_denoiser, load_unet
from trainer.method.sampling import make_scheduler, sample_latents
from trainer.method.schedule import NoiseSchedule, trailing_timesteps


def test_its_trajectory_ends_where_the_exported_sampler_does(smoke_run):
    cfg = load_config(smoke_run / "config.yaml", check_paths=False)
    model = smoke_run / "exports" / "teacher"
    unet = load_unet(model).eval().requires_grad_(False)
    pred = prediction_type_of(model, cfg.model.prediction_type)
    c = unet.config
    noise = torch.randn(3, c.in_channels, c.sample_size, c.sample_size, generator=torch.Generator().manual_seed(0))
    cond = Conditioning(torch.randn(3, 4, c.cross_attention_dim, generator=torch.Generator().manual_seed(1)), None, None)
    if c.addition_embed_type == "text_time":  # the toy UNet takes pooled text and time ids as SDXL's does
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        cond = Conditioning(cond.prompt_embeds, torch.randn(3, pooled), torch.zeros(3, 6))
    schedule = NoiseSchedule.from_config(cfg.schedule)
    denoise = guided_denoiser(unet, cond, 1.5)

    def x0_eps(x_t, t):
        ts = torch.full((len(x_t),), t, dtype=torch.long)
        return schedule.to_x0_eps(denoise(x_t, ts), x_t, ts, pred)

    with torch.no_grad():
        predictions, final = grain_origin.sample_with_predictions(x0_eps, schedule, noise, trailing_timesteps(4))
        expected = sample_latents(unet, make_scheduler(cfg.schedule, pred), cond, noise, 4, 1.5)
    assert list(predictions) == [999, 749, 499, 249]
    torch.testing.assert_close(final, expected, rtol=1e-4, atol=1e-4)


def test_report_on_the_smoke_teacher(smoke_run, tmp_path):
    assert grain_origin.main(["--model", str(smoke_run / "exports" / "teacher"), "--config",
                              str(smoke_run / "config.yaml"), "--steps", "4", "--count", "6", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "grain_origin.json").read_text())
    assert list(result["from_real"]) == list(result["trajectory"]) == ["999", "749", "499", "249"]
    # at T both start from the same noise (the sampler's scaled by sigma_T, 0.998): one model call on nearly one input
    assert math.isclose(result["from_real"]["999"], result["trajectory"]["999"], rel_tol=0.05)
    assert all(math.isfinite(v) for v in [result["real"], result["final"], *result["from_real"].values()])
    assert "| 499 |" in (tmp_path / "grain_origin.md").read_text()
    assert (tmp_path / "grain_origin.png").stat().st_size > 0
