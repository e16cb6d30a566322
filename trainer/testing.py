"""Tiny random models in the real diffusers layouts (SDXL, SD 1.5), built from configs in seconds: the tests
and the CPU checks run the SDXL and SD 1.5 code paths offline through them. Nothing in training uses them."""
from __future__ import annotations

from pathlib import Path

import torch


TINY_MAX_LENGTH = 16
_TINY_WORDS = ("a", "at", "the", "red", "blue", "green", "circle", "square", "top", "left", "right")


def tiny_clip_tokenizer(max_length: int = TINY_MAX_LENGTH):
    """A real CLIPTokenizer built offline: every byte-level character (alone and as a word end),
    a few merges so that BPE has work to do, and CLIP's two special tokens at the end of the
    vocabulary (as in the real one, where <|endoftext|> also has the highest id)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for symbol in [*alphabet, *(c + "</w>" for c in alphabet)]:
        vocab[symbol] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in _TINY_WORDS:  # merge each word left to right: r e -> re, re d</w> -> red</w>
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces = [pair[0] + pair[1], *pieces[2:]]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def _tiny_clip_config(tokenizer, hidden_size: int, projection_dim: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=projection_dim,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),  # two blocks: downsample 2
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=0.13025,  # SDXL's value; any fixed number works for a random VAE
    )


def _tiny_unet(cross_attention_dim: int, sdxl_pooled_dim: int | None):
    """A 2-level UNet; with sdxl_pooled_dim it takes SDXL's text_time added conditioning."""
    from diffusers import UNet2DConditionModel

    sdxl_kwargs = {}
    if sdxl_pooled_dim is not None:
        time_embed_dim = 8
        sdxl_kwargs = dict(
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            # 6 time ids, each given a sinusoidal embedding, plus the pooled text embedding
            projection_class_embeddings_input_dim=time_embed_dim * 6 + sdxl_pooled_dim,
        )
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=(2, 4),
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=32,
        **sdxl_kwargs,
    )


def tiny_scheduler():
    """SDXL's scheduler: Euler over the scaled-linear betas, trailing spacing (Lightning's choice)."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="trailing",
        prediction_type="epsilon",
        steps_offset=1,  # as in the real SD/SDXL configs (pipelines warn otherwise; trailing ignores it)
    )


def make_tiny_sdxl_folder(path: str | Path, seed: int = 0) -> Path:
    """Save a tiny random SDXL in the real diffusers layout (loads with StableDiffusionXLPipeline)."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = tiny_clip_tokenizer()
        # Real SDXL pads the second tokenizer with "!" (id 0) rather than <|endoftext|>.
        tokenizer_2 = tiny_clip_tokenizer()
        tokenizer_2.pad_token = "!"
        text_encoder = CLIPTextModel(_tiny_clip_config(tokenizer, hidden_size=32, projection_dim=32))
        text_encoder_2 = CLIPTextModelWithProjection(
            _tiny_clip_config(tokenizer_2, hidden_size=64, projection_dim=32)
        )
        pipe = StableDiffusionXLPipeline(
            vae=_tiny_vae(),
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=_tiny_unet(cross_attention_dim=32 + 64, sdxl_pooled_dim=32),
            scheduler=tiny_scheduler(),
        )
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)


def make_tiny_sd15_folder(path: str | Path, seed: int = 0) -> Path:
    """Save a tiny random SD 1.5-layout model (loads with StableDiffusionPipeline)."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = tiny_clip_tokenizer()
        text_encoder = CLIPTextModel(_tiny_clip_config(tokenizer, hidden_size=32, projection_dim=32))
        pipe = StableDiffusionPipeline(
            vae=_tiny_vae(),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=_tiny_unet(cross_attention_dim=32, sdxl_pooled_dim=None),
            scheduler=tiny_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)
