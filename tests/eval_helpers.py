"""Tiny stand-ins for the real backend's networks: a random FID InceptionV3 weights file (the real
architecture, so the full-size file layout is exercised) and a tiny random CLIPModel folder."""
from __future__ import annotations

from pathlib import Path

import torch


def random_inception_file(path: Path, seed: int = 0, drop_num_batches_tracked: bool = False) -> Path:
    from eval.inception import FIDInceptionV3

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FIDInceptionV3()
    state = {k: v for k, v in model.state_dict().items()
             if not (drop_num_batches_tracked and k.endswith("num_batches_tracked"))}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def tiny_clip_folder(path: Path, seed: int = 0) -> Path:
    from transformers import CLIPConfig, CLIPModel

    from trainer.testing import tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)
