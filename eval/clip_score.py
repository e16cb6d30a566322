"""CLIP score (text alignment of the real backend): 100 x max(cos(image embedding, text embedding), 0),
averaged over images, the usual definition (Hessel et al. 2021 without the 2.5 weight; torchmetrics'
CLIPScore). The paper does not say which CLIP; torchmetrics' default is openai/clip-vit-large-patch14.

The model comes from a local folder in the transformers layout (config.json, model.safetensors, the
tokenizer files, and preprocessor_config.json for the image normalisation; e.g. a copy of
openai/clip-vit-large-patch14). Nothing is downloaded.

Image preprocessing follows CLIPImageProcessor: shortest side resized to the model's image size (bicubic),
centre crop, the processor's mean/std (OpenAI CLIP's when there is no preprocessor_config.json); it is
done in torch here, so pixel values can differ from PIL's bicubic by round-off.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from eval.images import to_tensor

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipScorer:
    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        from transformers import AutoTokenizer, CLIPModel

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no CLIP model at {path}: expected a transformers CLIPModel folder "
                                    "(config.json, weights, tokenizer files, preprocessor_config.json)")
        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(path, local_files_only=True).eval().requires_grad_(False).to(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        size = int(self.model.config.vision_config.image_size)
        self.size, self.crop, self.mean, self.std = size, size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        pre = path / "preprocessor_config.json"
        if pre.is_file():
            cfg = json.loads(pre.read_text())
            size_cfg, crop_cfg = cfg.get("size", size), cfg.get("crop_size", size)
            self.size = int(size_cfg.get("shortest_edge", size)) if isinstance(size_cfg, dict) else int(size_cfg)
            self.crop = int(crop_cfg.get("height", size)) if isinstance(crop_cfg, dict) else int(crop_cfg)
            self.mean = tuple(cfg.get("image_mean", self.mean))
            self.std = tuple(cfg.get("image_std", self.std))

    def _pixels(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        out = []
        for im in images:
            x = to_tensor(np.asarray(im)[None])
            h, w = x.shape[-2:]
            scale = self.size / min(h, w)
            nh, nw = max(self.crop, round(h * scale)), max(self.crop, round(w * scale))
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=scale < 1).clamp(0, 1)
            top, left = (nh - self.crop) // 2, (nw - self.crop) // 2
            out.append(x[..., top:top + self.crop, left:left + self.crop])
        x = torch.cat(out)
        mean = torch.tensor(self.mean)[None, :, None, None]
        std = torch.tensor(self.std)[None, :, None, None]
        return ((x - mean) / std).to(self.device)

    @torch.no_grad()
    def scores(self, images: Sequence[np.ndarray], captions: Sequence[str]) -> np.ndarray:
        """Per-image CLIP scores (0..100) of images (uint8 HxWx3) against their captions."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        tokens = self.tokenizer(list(captions), padding=True, truncation=True,
                                max_length=self.tokenizer.model_max_length, return_tensors="pt")
        out = self.model(input_ids=tokens.input_ids.to(self.device), attention_mask=tokens.attention_mask.to(self.device),
                         pixel_values=self._pixels(list(images)))
        cos = (out.image_embeds * out.text_embeds).sum(-1)  # both already unit length
        return (100 * cos.clamp_min(0)).float().cpu().numpy()
