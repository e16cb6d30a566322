"""Every export format loads and samples with diffusers (+ transformers / safetensors) alone.

The exports are written with the trainer's own writers (trainer.export.export_unet, trainer.method.lora.save_lora
and merge_lora, as trainer.method.stages does); everything after that, in each test's loading path, is plain
diffusers / transformers / safetensors / json. Project code appears only as an oracle to compare against.
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextModelWithProjection

from trainer.config import ScheduleConfig
from trainer.data.encoders import create_toy_encoders, load_encoders
from trainer.testing import make_tiny_sdxl_folder
from trainer.export import export_unet
from trainer.method.lora import add_lora, merge_lora, save_lora
from trainer.method.models import Conditioning, build_toy_unet
from trainer.method.sampling import sample_latents

PROMPTS = ["a red circle at top left", "a blue frame at center"]


@torch.no_grad()
def _perturb(module: torch.nn.Module, seed: int, std: float, lora_only: bool = False) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(module.named_parameters()):
        if not lora_only or ".lora_B." in name:
            p.add_(torch.randn(p.shape, generator=g) * std) if not lora_only else p.copy_(torch.randn(p.shape, generator=g) * std)


def _export_with_lora(base_unet: UNet2DConditionModel, out: Path, base_dir: Path, prediction_type: str,
                      steps: int, stage: str) -> Path:
    """What trainer.method.stages does for a LoRA phase: LoRA file + merged UNet in one export."""
    unet = add_lora(copy.deepcopy(base_unet), rank=4, alpha=8)
    _perturb(unet, seed=1, std=0.05, lora_only=True)
    lora_file = save_lora(unet, out.parent / f"{stage}_lora_tmp" / "pytorch_lora_weights.safetensors")
    merged = merge_lora(unet)

    def write_lora(tmp: Path) -> None:
        (tmp / "lora").mkdir()
        shutil.move(str(lora_file), tmp / "lora" / lora_file.name)

    return export_unet(merged.state_dict(), dict(merged.config), out, base_dir=base_dir, schedule=ScheduleConfig(),
                       prediction_type=prediction_type, steps=steps, stage=stage, extra=write_lora)


@pytest.fixture(scope="module")
def toy_exports(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("toy_exports")
    base = create_toy_encoders(root / "base")
    teacher = build_toy_unet(seed=0)
    _perturb(teacher, seed=0, std=0.01)  # not at diffusers' init, so that outputs carry weights' detail
    exports = {"teacher": export_unet(teacher.state_dict(), dict(teacher.config), root / "teacher", base_dir=base,
                                      schedule=ScheduleConfig(), prediction_type="v_prediction", steps=32,
                                      guidance=3.0, stage="teacher")}
    exports["lora"] = _export_with_lora(teacher, root / "stage2_8_lora", base, "v_prediction", 8, "stage2_8")
    exports["one_step"] = export_unet(teacher.state_dict(), dict(teacher.config), root / "stage5_1", base_dir=base,
                                      schedule=ScheduleConfig(), prediction_type="sample", steps=1, stage="stage5_1")
    return exports


def _toy_conditioning_without_project_code(export: Path, prompts: list[str]):
    """The toy's text encoder with transformers, its word tokenizer from vocab.json by hand."""
    vocab = json.loads((export / "tokenizer" / "vocab.json").read_text())
    max_length = json.loads((export / "tokenizer" / "tokenizer_config.json").read_text())["max_length"]
    rows = []
    for prompt in prompts:
        ids = [vocab["<bos>"], *(vocab.get(w, vocab["<unk>"]) for w in prompt.lower().split()), vocab["<eos>"]]
        rows.append(ids + [vocab["<pad>"]] * (max_length - len(ids)))
    text_model = CLIPTextModelWithProjection.from_pretrained(export / "text_encoder").eval()
    with torch.no_grad():
        out = text_model(torch.tensor(rows), output_hidden_states=True)
    res = json.loads((export / "latent_codec.json").read_text())["resolution"]
    time_ids = torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32).repeat(len(prompts), 1)
    return out.hidden_states[-2], out.text_embeds, time_ids


@torch.no_grad()
def _diffusers_sample(unet, scheduler, embeds, pooled, time_ids, noise, steps: int, guidance: float):
    """A plain diffusers Euler loop (CFG with zero unconditional embeddings, SDXL's convention)."""
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t)
        if guidance == 1.0:
            out = unet(inp, t, encoder_hidden_states=embeds,
                       added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        else:
            both = unet(torch.cat([inp, inp]), t, encoder_hidden_states=torch.cat([embeds, torch.zeros_like(embeds)]),
                        added_cond_kwargs={"text_embeds": torch.cat([pooled, torch.zeros_like(pooled)]),
                                           "time_ids": torch.cat([time_ids, time_ids])}).sample
            cond, uncond = both.chunk(2)
            out = uncond + guidance * (cond - uncond)
        x = scheduler.step(out, t, x).prev_sample
    return x


@pytest.mark.parametrize("name", ["teacher", "one_step"])
def test_unet_folder_and_scheduler_load_and_sample(toy_exports, name):
    export = toy_exports[name]
    manifest = json.loads((export / "export.json").read_text())
    unet = UNet2DConditionModel.from_pretrained(export / "unet").eval()
    scheduler = EulerDiscreteScheduler.from_pretrained(export / "scheduler")
    assert scheduler.config.timestep_spacing == "trailing"
    assert scheduler.config.prediction_type == manifest["prediction_type"]

    embeds, pooled, time_ids = _toy_conditioning_without_project_code(export, PROMPTS)
    noise = torch.randn(len(PROMPTS), 12, 16, 16, generator=torch.Generator().manual_seed(0))
    steps = min(manifest["steps"], 3)
    latents = _diffusers_sample(unet, scheduler, embeds, pooled, time_ids, noise, steps, manifest["guidance"])
    images = F.pixel_shuffle(latents, 2)  # the toy's lossless codec
    assert images.shape == (2, 3, 32, 32) and bool(torch.isfinite(images).all())

    # the oracle: the project's own sampler from the same folder gives the same result
    enc = load_encoders(export)
    text = enc.text.encode(PROMPTS)
    torch.testing.assert_close(text.prompt_embeds, embeds)
    ours = sample_latents(unet, EulerDiscreteScheduler.from_pretrained(export / "scheduler"),
                          Conditioning(text.prompt_embeds, text.pooled, time_ids), noise, steps, manifest["guidance"])
    torch.testing.assert_close(ours, latents, atol=1e-5, rtol=1e-5)


def test_single_file_unet_equals_the_folder(toy_exports):
    export = toy_exports["teacher"]
    folder = UNet2DConditionModel.from_pretrained(export / "unet").eval()
    single = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(export / "unet"))
    missing, unexpected = single.load_state_dict(load_file(export / "unet.safetensors"), strict=True)
    assert not missing and not unexpected
    single.eval()
    x = torch.randn(2, 12, 16, 16, generator=torch.Generator().manual_seed(1))
    embeds, pooled, time_ids = _toy_conditioning_without_project_code(export, PROMPTS)
    cond = dict(encoder_hidden_states=embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})
    with torch.no_grad():
        assert torch.equal(single(x, 999, **cond).sample, folder(x, 999, **cond).sample)


def test_toy_lora_loads_with_load_lora_adapter(toy_exports):
    """LoRA file + the stage's teacher UNet (diffusers' load_lora_adapter) == the export's merged UNet."""
    lora_export, teacher = toy_exports["lora"], toy_exports["teacher"]
    assert (lora_export / "lora" / "pytorch_lora_weights.safetensors").is_file()
    unet = UNet2DConditionModel.from_pretrained(teacher / "unet").eval()
    merged = UNet2DConditionModel.from_pretrained(lora_export / "unet").eval()
    embeds, pooled, time_ids = _toy_conditioning_without_project_code(teacher, PROMPTS)
    cond = dict(encoder_hidden_states=embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})
    x = torch.randn(2, 12, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = unet(x, 500, **cond).sample
        # weight_name (or use_safetensors=True) matters: given a bare file path diffusers takes its .bin branch
        # and ignores the file's metadata, i.e. assumes alpha == rank
        unet.load_lora_adapter(str(lora_export / "lora"), weight_name="pytorch_lora_weights.safetensors", prefix="unet")
        with_lora = unet(x, 500, **cond).sample
        expected = merged(x, 500, **cond).sample
    assert (with_lora - plain).abs().max() > 1e-3  # the LoRA does something...
    torch.testing.assert_close(with_lora, expected, atol=1e-4, rtol=1e-4)  # ...and the right thing (alpha 8, rank 4)


def test_sdxl_layout_export_and_its_lora_load_in_the_pipeline(tmp_path):
    base = make_tiny_sdxl_folder(tmp_path / "tiny-sdxl")
    base_unet = UNet2DConditionModel.from_pretrained(base / "unet")
    export = _export_with_lora(base_unet, tmp_path / "exports" / "stage2_8_lora", base, "epsilon", 2, "stage2_8")
    card = (export / "README.md").read_text()
    assert "StableDiffusionXLPipeline" in card and "load_lora_weights" in card

    # the export is a complete SDXL pipeline folder
    pipe = StableDiffusionXLPipeline.from_pretrained(export)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    image = pipe(PROMPTS[0], num_inference_steps=2, guidance_scale=0, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and bool(torch.isfinite(torch.from_numpy(image)).all())

    # the LoRA file on the base pipeline == the export's merged UNet
    base_pipe = StableDiffusionXLPipeline.from_pretrained(base)
    base_pipe.set_progress_bar_config(disable=True)
    base_pipe.load_lora_weights(str(export / "lora"))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 32, 32, generator=g)
    cond = dict(encoder_hidden_states=torch.randn(1, 16, 96, generator=g),
                added_cond_kwargs={"text_embeds": torch.randn(1, 32, generator=g),
                                   "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])})
    with torch.no_grad():
        torch.testing.assert_close(base_pipe.unet(x, 700, **cond).sample, pipe.unet(x, 700, **cond).sample,
                                   atol=1e-4, rtol=1e-4)
    lora_image = base_pipe(PROMPTS[0], num_inference_steps=2, guidance_scale=0, output_type="np",
                           generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(torch.from_numpy(lora_image), torch.from_numpy(image), atol=2e-3, rtol=0)


@pytest.mark.parametrize("name,steps,prediction,guidance", [("teacher", 32, "v_prediction", "3.0"),
                                                            ("one_step", 1, "sample", "guidance_scale=0")])
def test_model_card_says_how_to_sample(toy_exports, name, steps, prediction, guidance):
    card = (toy_exports[name] / "README.md").read_text()
    assert f"Sampling steps: **{steps}**" in card
    assert 'timestep_spacing="trailing"' in card and f'prediction_type="{prediction}"' in card
    assert "Guidance:" in card and guidance in card
    assert "unet.safetensors" in card
    lora_card = (toy_exports["lora"] / "README.md").read_text()
    assert "load_lora_adapter" in lora_card and "lora/pytorch_lora_weights.safetensors" in lora_card
