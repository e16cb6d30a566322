"""What the benchmarks share: the model presets (the shapes toy and the real SDXL UNet's architecture,
randomly initialised: no weights are needed to time or size it) and the batch shapes that go with them."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/x.py` from a clone, without installing the project
    sys.path.insert(0, str(ROOT))

from trainer.method.models import TOY_TEXT_DIM, TOY_UNET  # noqa: E402

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (2.57 B parameters): the architecture only.
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=[320, 640, 1280],
    layers_per_block=2,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=[1, 2, 10],
    attention_head_dim=[5, 10, 20],
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
    flip_sin_to_cos=True,
    freq_shift=0,
)


@dataclass(frozen=True)
class Preset:
    """A model and the shapes of one training sample for it."""
    name: str
    unet: dict
    latent: tuple[int, int, int]  # C, H, W
    text_tokens: int
    text_dim: int
    pooled_dim: int
    time_ids: int = 6
    lora_rank: int = 8

    def sample_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"latent": self.latent, "prompt_embeds": (self.text_tokens, self.text_dim),
                "pooled": (self.pooled_dim,), "time_ids": (self.time_ids,)}


PRESETS = {
    # The embedded default: 12x16x16 pixel-unshuffled 32 px images, 16-token toy text embeddings.
    "tiny": Preset("tiny", TOY_UNET, (12, 16, 16), 16, TOY_TEXT_DIM, TOY_TEXT_DIM, lora_rank=8),
    # SDXL at 1024 px: 4x128x128 latents, 77 tokens of the two text encoders' 768+1280 = 2048 features,
    # the second encoder's 1280-d pooled embedding, 6 micro-conditioning ids; LoRA rank 64 as the paper.
    "sdxl": Preset("sdxl", SDXL_UNET, (4, 128, 128), 77, 2048, 1280, lora_rank=64),
}
