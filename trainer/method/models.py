"""The UNet: building the toy, loading a base or teacher from a diffusers folder, and calling it with
SDXL-style conditioning (prompt embeddings, pooled embedding, micro-conditioning time ids) or
SD 1.5-style conditioning (prompt embeddings only)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from diffusers import UNet2DConditionModel

# The embedded default's UNet, sized for a CPU: 12x16x16 pixel-unshuffled "latents", channels
# (32, 64, 64), one layer per block, attention at 16x16 and 8x8 only (at 4x4 it buys nothing, at 32x32
# it makes steps slow; measured: bench/README.md#measurements-behind-defaults), SDXL's text_time
# conditioning so the toy exercises the SDXL code path.
TOY_TEXT_DIM = 32
TOY_UNET = dict(
    sample_size=16,
    in_channels=12,
    out_channels=12,
    block_out_channels=[32, 64, 64],
    layers_per_block=1,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=TOY_TEXT_DIM,
    attention_head_dim=8,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=8 * 6 + TOY_TEXT_DIM,
    norm_num_groups=32,
)


@dataclass
class Conditioning:
    """One batch of text conditioning; `pooled`/`time_ids` are None for SD 1.5-layout models."""
    prompt_embeds: torch.Tensor
    pooled: Optional[torch.Tensor] = None
    time_ids: Optional[torch.Tensor] = None

    @classmethod
    def from_batch(cls, batch: dict) -> "Conditioning":
        return cls(batch["prompt_embeds"], batch.get("pooled"), batch.get("time_ids"))

    @classmethod
    def for_captions(cls, encoders, captions) -> "Conditioning":
        """`captions` encoded by a model's `Encoders` for a whole, uncropped image at the model's resolution
        (what sampling conditions on), on the encoders' device."""
        text = encoders.text.encode(list(captions))
        res = encoders.resolution
        time_ids = None
        if text.pooled is not None:
            time_ids = encoders.time_ids((res, res), (0, 0), (res, res)).expand(len(captions), -1)
            time_ids = time_ids.to(text.pooled.device)
        return cls(text.prompt_embeds, text.pooled, time_ids)

    def to(self, device=None, dtype=None) -> "Conditioning":
        move = lambda x: None if x is None else x.to(device=device, dtype=dtype)
        return Conditioning(move(self.prompt_embeds), move(self.pooled), move(self.time_ids))

    def unconditional(self) -> "Conditioning":
        """SDXL's convention for "no negative prompt" (force_zeros_for_empty_prompt): zero text
        embeddings, same micro-conditioning. The toy teacher is trained with the same zeros."""
        zeros = lambda x: None if x is None else torch.zeros_like(x)
        return Conditioning(zeros(self.prompt_embeds), zeros(self.pooled), self.time_ids)

    def drop(self, keep: torch.Tensor) -> "Conditioning":
        """Caption dropout: rows where keep is False become unconditional."""
        def mix(x):
            if x is None:
                return None
            mask = keep.view(-1, *([1] * (x.dim() - 1))).to(x.device)
            return torch.where(mask, x, torch.zeros_like(x))
        return Conditioning(mix(self.prompt_embeds), mix(self.pooled), self.time_ids)

    def repeat(self, k: int) -> "Conditioning":
        """The batch k times over (rows 0..B-1, then again 0..B-1, ...)."""
        rep = lambda x: None if x is None else x.repeat(k, *([1] * (x.dim() - 1)))
        return Conditioning(rep(self.prompt_embeds), rep(self.pooled), rep(self.time_ids))

    @staticmethod
    def cat(a: "Conditioning", b: "Conditioning") -> "Conditioning":
        join = lambda x, y: None if x is None else torch.cat([x, y])
        return Conditioning(join(a.prompt_embeds, b.prompt_embeds), join(a.pooled, b.pooled), join(a.time_ids, b.time_ids))


def build_toy_unet(overrides: Optional[dict] = None, seed: int = 0) -> UNet2DConditionModel:
    config = {**TOY_UNET, **(overrides or {})}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return UNet2DConditionModel(**config)


def unet_folder(path: str | Path) -> Path:
    """The UNet's own folder inside a diffusers model folder (with unet/), or the UNet folder itself."""
    path = Path(path)
    folder = path / "unet" if (path / "unet" / "config.json").is_file() else path
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no UNet at '{path}': expected {path}/unet/config.json or {path}/config.json")
    return folder


def load_unet(path: str | Path, only: Optional[tuple[str, ...]] = None) -> UNet2DConditionModel:
    """A UNet from a diffusers model folder (with unet/) or a UNet folder itself.

    `only`: read just the weights under these module names (e.g. the encoder path, for the
    discriminator); every other parameter stays on the meta device, unread."""
    folder = unet_folder(path)
    if only is not None:
        return _load_unet_parts(folder, only)
    try:
        return UNet2DConditionModel.from_pretrained(folder, local_files_only=True)
    except Exception as err:  # a folder with a config that is not a UNet's
        raise ValueError(f"'{folder}' does not hold a UNet2DConditionModel: {err}") from None


def _weight_files(folder: Path) -> list[Path]:
    """The UNet's safetensors file(s), sharded or not."""
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        import json

        return sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
    single = folder / "diffusion_pytorch_model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"'{folder}' has no diffusion_pytorch_model.safetensors (or its index)")
    return [single]


def _load_unet_parts(folder: Path, only: tuple[str, ...]) -> UNet2DConditionModel:
    from safetensors import safe_open

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder))
    wanted = tuple(f"{name}." for name in only)
    weights = {}
    for file in _weight_files(folder):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            # float32 like from_pretrained's default, whatever the file holds
            weights.update({k: f.get_tensor(k).float() for k in f.keys() if k.startswith(wanted)})
    expected = [k for k in unet.state_dict() if k.startswith(wanted)]
    missing = sorted(set(expected) - set(weights))
    if missing or not expected:
        raise ValueError(f"'{folder}': the weights lack {missing[:3] or list(only)}")
    unet.load_state_dict(weights, strict=False, assign=True)
    return unet


def frozen_copy(unet: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A frozen copy of `unet` in `dtype` on `device`: the same weights a fresh read of its folder
    would give (the teacher when it starts where the student does), without the read and without a
    second full-precision copy in memory."""
    with torch.device("meta"):
        twin = UNet2DConditionModel.from_config(unet.config)
    # copy=True: where dtype and device already match, .to() would return the same tensors, and the
    # student's updates (or the x0 phase's head rewrite) would move the frozen copy with it
    twin.load_state_dict({k: v.detach().to(device=device, dtype=dtype, copy=True)
                          for k, v in unet.state_dict().items()}, assign=True)
    return freeze(twin, dtype)


def unet_forward(unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                 dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Calls the UNet with inputs cast to `dtype` (default: its weights' dtype; DeepSpeed engines do not
    cast inputs themselves) and returns float32."""
    dtype = dtype or next(unet.parameters()).dtype
    added = None
    if cond.pooled is not None:
        added = {"text_embeds": cond.pooled.to(dtype), "time_ids": cond.time_ids.to(dtype)}
    out = unet(x.to(dtype), t.to(x.device), encoder_hidden_states=cond.prompt_embeds.to(dtype),
               added_cond_kwargs=added, return_dict=False)[0]
    return out.float()


def guided_denoiser(unet: torch.nn.Module, cond: Conditioning, guidance: float, dtype: Optional[torch.dtype] = None):
    """(x, t) -> network output with classifier-free guidance computed as one doubled batch.
    Guidance is applied to the raw output; for epsilon and v predictions that is the usual CFG."""
    if guidance == 1.0:
        return lambda x, t: unet_forward(unet, x, t, cond, dtype)
    both = Conditioning.cat(cond, cond.unconditional())

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = unet_forward(unet, torch.cat([x, x]), torch.cat([t, t]), both, dtype)
        out_cond, out_uncond = out.chunk(2)
        return out_uncond + guidance * (out_cond - out_uncond)

    return denoise


def freeze(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A frozen teacher: no grads, eval mode, in `dtype` (the engines' compute dtype; it only runs under
    no_grad)."""
    module.requires_grad_(False)
    return module.eval().to(dtype)
