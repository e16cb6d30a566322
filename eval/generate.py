"""Samples from an export (or a base model folder) through diffusers objects, with fixed seeds.

- toy folders (latent_codec.json): `UNet2DConditionModel.from_pretrained(<model>/unet)` and
  `EulerDiscreteScheduler.from_pretrained(<model>/scheduler)` (prediction type from export.json), Euler
  steps with classifier-free guidance as one doubled batch (trainer.method.sampling.sample_latents); the toy's
  text encoder and pixel codec come from the folder (trainer.data.encoders).
- SDXL / SD 1.5 layout folders: `StableDiffusionXLPipeline` / `StableDiffusionPipeline.from_pretrained`
  with the folder's EulerDiscreteScheduler (prediction type from export.json); guidance is the pipeline's
  guidance_scale (the same convention: <= 1 means no CFG; zero negative embeddings for SDXL).

Image i of a set starts from noise seeded by (seed, i) alone, so a set does not depend on the batch size
(beyond float round-off: a pixel may differ by 1/255),
and every model and step count of a comparison starts from the same noise for the same prompt.
An optional LoRA file (diffusers format, eval: `--lora`) is loaded with diffusers' own loaders.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch


def image_seed(seed: int, index: int) -> int:
    return seed * 1_000_003 + index


def lora_export_of(lora: Path) -> Optional[Path]:
    """The export folder a LoRA path belongs to (the folder, its lora/ or the file in it), or None."""
    for folder in (lora, lora.parent, lora.parent.parent):
        if (folder / "export.json").is_file() and (folder / "lora").is_dir():
            return folder
    return None


class ExportSampler:
    def __init__(self, model_dir: str | Path, lora: Optional[str | Path] = None, device: str = "cpu",
                 dtype: torch.dtype = torch.float32):
        from trainer.data.encoders import detect_kind

        self.model_dir = Path(model_dir)
        self.device, self.dtype = torch.device(device), dtype
        self.kind = detect_kind(self.model_dir)
        self.lora = Path(lora) if lora else None
        # A LoRA export (exports/<stage>_lora, its lora/ folder or file) on a base model: steps, guidance and
        # scheduler are the LoRA export's, the network is the base's with the LoRA loaded by diffusers.
        self.lora_export = lora_export_of(self.lora) if self.lora else None
        if self.lora is not None and self.lora == self.lora_export:
            self.lora = self.lora / "lora"
        self.settings_dir = self.lora_export or self.model_dir
        manifest_file = self.settings_dir / "export.json"
        self.manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {}
        sched_cfg = json.loads((self.settings_dir / "scheduler" / "scheduler_config.json").read_text())
        self.prediction_type = self.manifest.get("prediction_type", sched_cfg.get("prediction_type", "epsilon"))
        self.default_steps = int(self.manifest.get("steps", 0)) or None
        self.default_guidance = float(self.manifest.get("guidance", 1.0))
        if self.kind == "toy":
            self._init_toy()
        else:
            self._init_pipeline()

    # -- loading ------------------------------------------------------------------------------------

    def _scheduler(self):
        from diffusers import EulerDiscreteScheduler

        return EulerDiscreteScheduler.from_pretrained(self.settings_dir / "scheduler", prediction_type=self.prediction_type)

    def _init_toy(self) -> None:
        from diffusers import UNet2DConditionModel

        from trainer.data.encoders import load_encoders

        self.unet = UNet2DConditionModel.from_pretrained(self.model_dir / "unet", local_files_only=True,
                                                         torch_dtype=self.dtype)
        if self.lora is not None:
            # folder + weight_name: diffusers then reads the file's metadata (alpha); a bare file path would not
            folder, name = (self.lora.parent, self.lora.name) if self.lora.is_file() else (self.lora, "pytorch_lora_weights.safetensors")
            self.unet.load_lora_adapter(str(folder), weight_name=name, prefix="unet", local_files_only=True)
        self.unet = self.unet.eval().requires_grad_(False).to(self.device)
        self.scheduler = self._scheduler()
        self.encoders = load_encoders(self.model_dir, self.device)

    def _init_pipeline(self) -> None:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        cls = StableDiffusionXLPipeline if self.kind == "sdxl" else StableDiffusionPipeline
        extra = {} if self.kind == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
        self.pipe = cls.from_pretrained(self.model_dir, local_files_only=True, torch_dtype=self.dtype,
                                        scheduler=self._scheduler(), **extra)
        if self.lora is not None:
            self.pipe.load_lora_weights(str(self.lora))
        self.pipe = self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)

    # -- sampling -----------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, captions: Sequence[str], indices: Sequence[int], steps: int, guidance: float,
               seed: int = 0) -> np.ndarray:
        """uint8 [N,H,W,3] for captions[i] from the noise of image index indices[i]."""
        if self.kind == "toy":
            return self._sample_toy(captions, indices, steps, guidance, seed)
        generators = [torch.Generator("cpu").manual_seed(image_seed(seed, i)) for i in indices]
        shape = self._pipeline_latent_shape()
        latents = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.device, self.dtype)
        out = self.pipe(prompt=list(captions), num_inference_steps=steps, guidance_scale=guidance, latents=latents,
                        output_type="np").images
        return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)

    def _pipeline_latent_shape(self) -> tuple[int, int, int]:
        c = self.pipe.unet.config
        return (c.in_channels, c.sample_size, c.sample_size)

    def _sample_toy(self, captions, indices, steps, guidance, seed) -> np.ndarray:
        from trainer.method.models import Conditioning
        from trainer.method.sampling import sample_latents, to_uint8

        enc = self.encoders
        cond = Conditioning.for_captions(enc, captions).to(self.device)
        c = self.unet.config
        noise = torch.stack([torch.randn(c.in_channels, c.sample_size, c.sample_size,
                                         generator=torch.Generator().manual_seed(image_seed(seed, i))) for i in indices])
        latents = sample_latents(self.unet, self.scheduler, cond, noise.to(self.device), steps, guidance, self.dtype)
        return to_uint8(enc.codec.decode(latents))
