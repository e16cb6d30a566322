"""The discriminator of the adversarial stages (docs/method.md, "The discriminator").

Backbone: a trainable copy of the pretrained UNet's encoder path (conv_in, time and added embeddings,
down blocks, mid block). It works in latent space and takes t and the text condition exactly like the
UNet, so at initialisation it already "understands" noisy latents at every timestep; the paper
re-initialises it from the base model at every stage, which is what `discriminator_from_unet` does.

Head: stride-2 4x4 convs with GroupNorm(32) and SiLU, then a 1x1 projection to one logit per spatial
position, averaged over the map. The paper does not state the number of blocks; by default we halve the
mid-block map down to 4x4 (SDXL at 1024 px: 32x32 -> 3 blocks, like the public peer; the toy's 4x4 -> 1).

Two forms:
- conditional   D(x_t, x_{t-ns}, t, t-ns, c): both latents go through the shared backbone, their
  mid-block maps are concatenated on channels; it keeps the student on the teacher's flow.
- unconditional D'(x_{t-ns}, t-ns, c): still text-conditioned, no longer sees x_t.

Losses are the non-saturating GAN losses written with softplus, so large logits never give inf/nan.
"""
from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from trainer.method.models import Conditioning

# The parts of a UNet2DConditionModel that run before (and including) its mid block.
ENCODER_PARTS = ("conv_in", "time_proj", "time_embedding", "time_embed_act",
                  "add_time_proj", "add_embedding", "encoder_hid_proj", "down_blocks", "mid_block")


class UNetEncoder(nn.Module):
    """A copy of a UNet's encoder path: forward(x, t, cond) -> the mid block's output [B, C_mid, h, w],
    computed exactly as UNet2DConditionModel.forward computes it (checked by the tests)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        config = unet.config
        # Conditioning carries no class labels and no image embeddings, so UNets that need them are
        # refused here rather than silently computing something the base model never saw.
        if getattr(unet, "class_embedding", None) is not None:
            raise ValueError("UNets with a class embedding are not supported by the discriminator")
        if config.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"addition_embed_type {config.addition_embed_type!r} is not supported "
                             "(only None for SD 1.5-style UNets and 'text_time' for SDXL)")
        if getattr(unet, "encoder_hid_proj", None) is not None and config.encoder_hid_dim_type != "text_proj":
            raise ValueError(f"encoder_hid_dim_type {config.encoder_hid_dim_type!r} is not supported")
        if unet.mid_block is None:
            raise ValueError("the UNet has no mid block to take features from")

        # One deepcopy over all parts (one memo): the copy shares no tensor with the source UNet, so
        # training D never moves the student or teacher, and any sharing among the parts is kept.
        parts = copy.deepcopy({name: getattr(unet, name, None) for name in ENCODER_PARTS})
        self.conv_in = parts["conv_in"]
        self.time_proj = parts["time_proj"]
        self.time_embedding = parts["time_embedding"]
        self.time_embed_act = parts["time_embed_act"]
        self.add_time_proj = parts["add_time_proj"] if config.addition_embed_type == "text_time" else None
        self.add_embedding = parts["add_embedding"]
        self.encoder_hid_proj = parts["encoder_hid_proj"]
        self.down_blocks = parts["down_blocks"]
        self.mid_block = parts["mid_block"]
        self.center_input_sample = bool(config.center_input_sample)

        self.mid_channels = int(config.block_out_channels[-1])
        # Each downsampler halves the latent; the mid block keeps the size of the last down block.
        self.downsample_factor = 2 ** sum(getattr(b, "downsamplers", None) is not None for b in self.down_blocks)

    def enable_gradient_checkpointing(self) -> None:
        """Same switch as diffusers' ModelMixin.enable_gradient_checkpointing: every submodule that has a
        `gradient_checkpointing` flag (resnet/attention loops in down and mid blocks, transformers) gets
        the flag and a `_gradient_checkpointing_func`; the blocks only use it when grad is enabled."""
        def checkpoint_func(module, *args):
            return checkpoint(module.__call__, *args, use_reentrant=False)

        found = False
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module._gradient_checkpointing_func = checkpoint_func
                module.gradient_checkpointing = True
                found = True
        if not found:
            raise ValueError("no block of this backbone supports gradient checkpointing")

    def disable_gradient_checkpointing(self) -> None:
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = False

    def _embedding(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        # The timestep embedding is float32 out of the sinusoidal projection; cast like diffusers does.
        t_emb = self.time_proj(t.to(x.device).expand(x.shape[0])).to(x.dtype)
        emb = self.time_embedding(t_emb)
        if self.add_embedding is not None:  # SDXL's "text_time": pooled text + embedded micro-conditioning
            if cond.pooled is None or cond.time_ids is None:
                raise ValueError("this UNet needs pooled text embeddings and time_ids in the conditioning")
            time_embeds = self.add_time_proj(cond.time_ids.flatten()).reshape(cond.pooled.shape[0], -1)
            added = torch.concat([cond.pooled, time_embeds], dim=-1).to(emb.dtype)
            emb = emb + self.add_embedding(added)
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)
        return emb

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        emb = self._embedding(x, t, cond)
        context = cond.prompt_embeds
        if self.encoder_hid_proj is not None:
            context = self.encoder_hid_proj(context)
        if self.center_input_sample:
            x = 2 * x - 1.0
        h = self.conv_in(x)
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=context)
            else:
                h, _ = block(hidden_states=h, temb=emb)
        if getattr(self.mid_block, "has_cross_attention", False):
            return self.mid_block(h, emb, encoder_hidden_states=context)
        return self.mid_block(h, emb)


def adaptive_head_blocks(mid_size: int) -> int:
    """Stride-2 blocks that halve a mid_size map down to 4x4, at least one (32 -> 3, 16 -> 2, <=8 -> 1)."""
    blocks = 0
    while mid_size > 4:
        mid_size //= 2
        blocks += 1
    return max(1, blocks)


class DiscriminatorHead(nn.Sequential):
    """[B, c_in, h, w] -> [B] logits: optional 1x1 width change, `blocks` x (4x4 stride-2 conv,
    GroupNorm(32), SiLU), 1x1 projection to one channel, mean over the remaining map."""

    def __init__(self, in_channels: int, channels: int, blocks: int):
        if channels % 32:
            raise ValueError(f"head channels must be divisible by 32 for GroupNorm(32), got {channels}")
        layers: list[nn.Module] = []
        if channels != in_channels:
            layers.append(nn.Conv2d(in_channels, channels, kernel_size=1))
        for _ in range(blocks):
            layers += [nn.Conv2d(channels, channels, kernel_size=4, stride=2, padding=1),
                       nn.GroupNorm(32, channels), nn.SiLU()]
        layers.append(nn.Conv2d(channels, 1, kernel_size=1))
        super().__init__(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return super().forward(h).mean(dim=(1, 2, 3))


class Discriminator(nn.Module):
    """Backbone copied from `unet` + head. Call as conditional `d(x_next, t_next, cond, x_t, t)` or
    unconditional `d(x_next, t_next, cond)`; returns raw float32 logits [B] (no sigmoid)."""

    def __init__(self, unet: nn.Module, conditional: bool, head_blocks: Optional[int] = None,
                 head_channels: Optional[int] = None, sample_size: Optional[int] = None, seed: int = 0):
        super().__init__()
        self.conditional = conditional
        self.backbone = UNetEncoder(unet)
        in_channels = self.backbone.mid_channels * (2 if conditional else 1)
        # Default width: the mid block's (SDXL: 1280), for both forms; the conditional head first mixes its
        # two concatenated maps down to it with a 1x1 conv, instead of keeping 2x the width (4x the
        # parameters) in every stride-2 block. GroupNorm(32) needs a multiple of 32: rounded up to one.
        channels = 32 * math.ceil((head_channels or self.backbone.mid_channels) / 32)

        sample_size = sample_size or unet.config.sample_size
        if isinstance(sample_size, (tuple, list)):
            sample_size = min(sample_size)
        self.mid_size = max(1, int(sample_size) // self.backbone.downsample_factor)
        if head_blocks is None:
            head_blocks = adaptive_head_blocks(self.mid_size)
        if head_blocks < 1 or self.mid_size >> head_blocks < 1:
            raise ValueError(f"{head_blocks} stride-2 head blocks do not fit a "
                             f"{self.mid_size}x{self.mid_size} mid-block map")
        self.head_blocks = head_blocks

        # The head is new; build it where the backbone lives (meta included) from a fixed seed, so a
        # rebuilt D (every stage, or after a restart before the first checkpoint) starts the same.
        weight = self.backbone.conv_in.weight
        with torch.random.fork_rng(devices=[]), torch.device(weight.device):
            torch.manual_seed(seed)
            self.head = DiscriminatorHead(in_channels, channels, head_blocks)
        self.head.to(weight.dtype)

    def enable_gradient_checkpointing(self) -> None:
        self.backbone.enable_gradient_checkpointing()

    def disable_gradient_checkpointing(self) -> None:
        self.backbone.disable_gradient_checkpointing()

    @staticmethod
    def _timesteps(t: torch.Tensor) -> torch.Tensor:
        # t = -1 marks the clean sample at the end of a trajectory (schedule.py). The pretrained time
        # embedding has only seen 0..T-1, and at t = 0 SDXL's latent is already ~clean (abar ~ 0.999),
        # so 0 is the nearest timestep the backbone knows; feeding -1 would be an unseen embedding.
        return t.clamp(min=0)

    def forward(self, x_next: torch.Tensor, t_next: torch.Tensor, cond: Conditioning,
                x_t: Optional[torch.Tensor] = None, t: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits for x_next. x_next may stack k candidates per sample (k x B rows, e.g. real then fake):
        the text condition is repeated k times and the conditional form runs its x_t branch, which all
        k share, once (the D step judges real and fake in one call: 3 backbone passes instead of 4)."""
        if self.conditional != (x_t is not None and t is not None):
            raise ValueError("conditional D takes (x_next, t_next, cond, x_t, t); "
                             "unconditional D takes (x_next, t_next, cond)")
        # Callers hand in float32; the module may run in bf16 (DeepSpeed engines do not cast inputs).
        dtype = self.backbone.conv_in.weight.dtype
        rows, base = x_next.shape[0], cond.prompt_embeds.shape[0]
        if rows % base:
            raise ValueError(f"x_next has {rows} rows: not a multiple of the condition's {base}")
        k = rows // base
        cond = cond.to(dtype=dtype)
        cond_k = cond if k == 1 else cond.repeat(k)
        t_next = self._timesteps(torch.as_tensor(t_next, device=x_next.device).expand(rows))
        if self.conditional:
            # Shared backbone, one call on x_t and all candidates (GroupNorm is per sample, so this equals
            # separate calls), then each candidate's mid-block map beside its x_t's on the channel axis.
            t = self._timesteps(torch.as_tensor(t, device=x_t.device).expand(base))
            maps = self.backbone(torch.cat([x_t, x_next]).to(dtype), torch.cat([t, t_next]),
                                 Conditioning.cat(cond, cond_k))
            features = torch.cat([maps[:base].repeat(k, 1, 1, 1), maps[base:]], dim=1)
        else:
            features = self.backbone(x_next.to(dtype), t_next, cond_k)
        return self.head(features).float()


def discriminator_from_unet(unet: nn.Module, conditional: bool, head_blocks: Optional[int] = None,
                            head_channels: Optional[int] = None, sample_size: Optional[int] = None,
                            seed: int = 0) -> Discriminator:
    """The one way to build D: a fresh copy of `unet`'s encoder plus a new head (call it again at every
    stage with the base model to re-initialise D, as the paper does)."""
    return Discriminator(unet, conditional, head_blocks=head_blocks, head_channels=head_channels,
                         sample_size=sample_size, seed=seed)


def d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(real) - log(1 - sigmoid(fake)), each averaged over the batch.
    softplus(-x) = -log sigmoid(x) and softplus(x) = -log(1 - sigmoid(x)) without overflow."""
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


def g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss -log sigmoid(fake), averaged: strong gradients while D wins."""
    return F.softplus(-fake_logits.float()).mean()


@torch.no_grad()
def d_accuracy(real_logits: torch.Tensor, fake_logits: torch.Tensor,
               mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(fraction of real judged real, fraction of fake judged fake). D's loss is 2 ln 2 both for a blind
    D and for one the student has beaten; these two numbers tell them apart. A logit of exactly 0 is
    a coin flip and counts one half. With `mask`, over the masked samples only (NaN if there are none)."""
    def judged(logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float().reshape(-1)
        hits = (logits > 0).float() + 0.5 * (logits == 0).float()
        if mask is None:
            return hits.mean()
        weight = mask.reshape(-1).float()
        return (hits * weight).sum() / weight.sum()
    return judged(real_logits), judged(-fake_logits)
