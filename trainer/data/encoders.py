"""The encoding side of a latent diffusion model: images -> latents, captions -> embeddings.

One interface covers SDXL (VAE + two CLIP encoders), SD 1.5-layout models (VAE + one CLIP
encoder) and the embedded toy (lossless pixel_unshuffle + a tiny frozen CLIP text model over a
word vocabulary). The caching step (`trainer.data.encode`) only talks to `Encoders`, so adding a model
family means adding a codec or text encoder here, not another copy of the pipeline.

Model folders use the diffusers layout and are detected by their contents (`load_encoders`).
Tiny random SDXL / SD 1.5 folders for tests are built by trainer/testing.py.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

# Heavy libraries (diffusers, transformers) are imported inside the functions that need them, so
# that importing this module (e.g. for the toy's PixelUnshuffleCodec) stays cheap.


# --------------------------------------------------------------------------------------------
# Latent codecs: images [B,3,H,W] in [-1,1] <-> latents [B,C,h,w] (already scaled)
# --------------------------------------------------------------------------------------------


class LatentCodec(ABC):
    """Maps images to the space the UNet denoises, and back."""

    @abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B,3,H,W] in [-1,1] -> latents [B,C,H/d,W/d], scaled for the diffusion model."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B,C,h,w] -> images [B,3,h*d,w*d], nominally in [-1,1]."""

    def enable_slicing(self) -> None:
        """Encode/decode a batch one image at a time where that saves memory (a VAE); a no-op otherwise."""

    @property
    @abstractmethod
    def latent_channels(self) -> int: ...

    @property
    @abstractmethod
    def downsample(self) -> int:
        """Spatial factor d between image and latent."""


class PixelUnshuffleCodec(LatentCodec):
    """Lossless pixel-space "latent": fold each factor x factor patch into channels.

    The toy's choice: exact, free and needs no training, yet gives the UNet a 16x16 grid for 32 px
    images, a few times cheaper per step than a 32x32 one
    (measured: bench/README.md#measurements-behind-defaults).
    """

    def __init__(self, factor: int = 2):
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        self.factor = factor

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(images, self.factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(latents, self.factor)

    @property
    def latent_channels(self) -> int:
        return 3 * self.factor**2

    @property
    def downsample(self) -> int:
        return self.factor


class VaeCodec(LatentCodec):
    """A diffusers AutoencoderKL, with the model's scaling (and SD3/Flux-style shift) applied."""

    def __init__(self, vae):  # vae: diffusers.AutoencoderKL
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)
        shift = getattr(vae.config, "shift_factor", None)
        self.shift_factor = float(shift) if shift is not None else 0.0

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        param = next(self.vae.parameters())
        posterior = self.vae.encode(images.to(device=param.device, dtype=param.dtype)).latent_dist
        # The distribution's mean, not a sample: cached latents must be reproducible (re-encoding
        # a dataset gives the same shards, resumed runs see the same data), and the VAE's
        # posterior std is tiny next to the diffusion noise added later anyway.
        return (posterior.mean - self.shift_factor) * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        param = next(self.vae.parameters())
        latents = latents.to(device=param.device, dtype=param.dtype)
        return self.vae.decode(latents / self.scaling_factor + self.shift_factor).sample

    def enable_slicing(self) -> None:
        """Encode/decode a batch one image at a time: the peak activation memory is one image's, not the
        batch's (a batch of 1024 px images through SDXL's VAE would not fit a GPU otherwise). The results
        are the unsliced ones to float rounding (tests/test_vae_slicing.py)."""
        self.vae.enable_slicing()

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


# --------------------------------------------------------------------------------------------
# Text encoders: captions -> (prompt_embeds [B,L,D], pooled [B,P] | None)
# --------------------------------------------------------------------------------------------


@dataclass
class EncodedText:
    prompt_embeds: torch.Tensor  # [B, L, D]: what the UNet cross-attends to
    pooled: torch.Tensor | None  # [B, P]: SDXL's extra global conditioning; None for SD 1.5


class TextEncoder(ABC):
    @abstractmethod
    def encode(self, captions: list[str]) -> EncodedText: ...

    @property
    @abstractmethod
    def embed_dim(self) -> int:
        """D of prompt_embeds: the UNet's cross_attention_dim."""

    @property
    @abstractmethod
    def pooled_dim(self) -> int | None: ...


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _clip_ids(tokenizer, captions: list[str], device: torch.device) -> torch.Tensor:
    """Pad every caption to the tokenizer's full length, as SD/SDXL were trained."""
    return tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)


class SDXLTextEncoder(TextEncoder):
    """SDXL's conditioning: penultimate hidden states of both CLIP encoders, concatenated
    (768 + 1280 = 2048 on the real model); pooled = text_encoder_2's projected text embedding."""

    def __init__(self, tokenizer, tokenizer_2, text_encoder, text_encoder_2):
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2

    def encode(self, captions: list[str]) -> EncodedText:
        ids_1 = _clip_ids(self.tokenizer, captions, _device_of(self.text_encoder))
        ids_2 = _clip_ids(self.tokenizer_2, captions, _device_of(self.text_encoder_2))
        out_1 = self.text_encoder(ids_1, output_hidden_states=True)
        out_2 = self.text_encoder_2(ids_2, output_hidden_states=True)
        hidden_1 = out_1.hidden_states[-2]
        hidden_2 = out_2.hidden_states[-2].to(hidden_1.device)
        return EncodedText(torch.cat([hidden_1, hidden_2], dim=-1), out_2.text_embeds)

    @property
    def embed_dim(self) -> int:
        return self.text_encoder.config.hidden_size + self.text_encoder_2.config.hidden_size

    @property
    def pooled_dim(self) -> int:
        return self.text_encoder_2.config.projection_dim


class SD15TextEncoder(TextEncoder):
    """SD 1.x/2.x conditioning: the final hidden states of one CLIP text encoder, no pooled vector."""

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder

    def encode(self, captions: list[str]) -> EncodedText:
        ids = _clip_ids(self.tokenizer, captions, _device_of(self.text_encoder))
        return EncodedText(self.text_encoder(ids).last_hidden_state, None)

    @property
    def embed_dim(self) -> int:
        return self.text_encoder.config.hidden_size

    @property
    def pooled_dim(self) -> None:
        return None


# --- the toy: a word-level tokenizer + a tiny random, frozen CLIP text model ------------------

TOY_MAX_LENGTH = 16
# <eos> is deliberately not id 2: transformers' CLIP treats eos_token_id == 2 as a legacy config
# and pools at argmax(input_ids) instead of at the <eos> position.
TOY_SPECIAL_TOKENS = {"<pad>": 0, "<bos>": 1, "<unk>": 2, "<eos>": 3}


def toy_vocabulary() -> dict[str, int]:
    """Special tokens, then every word the shapes captions can use, sorted (stable ids)."""
    from trainer.data import shapes  # local: shapes is only needed to build a new toy

    words = {"a", "at"}
    for phrase in [*shapes.SHAPES, *shapes.COLOURS, *shapes.POSITIONS]:
        words.update(phrase.lower().split())
    vocab = dict(TOY_SPECIAL_TOKENS)
    for word in sorted(words):
        vocab.setdefault(word, len(vocab))
    return vocab


class WordTokenizer:
    """Splits on whitespace; <bos> words <eos> then <pad> to a fixed length; unknown -> <unk>. A caption
    longer than that raises rather than being cut: a toy caption is a scene description, and a cut one
    names shapes that the image then draws unnamed."""

    def __init__(self, vocab: dict[str, int], max_length: int = TOY_MAX_LENGTH):
        for token in TOY_SPECIAL_TOKENS:
            if token not in vocab:
                raise ValueError(f"vocabulary lacks the special token {token}")
        self.vocab, self.max_length = dict(vocab), max_length

    def __len__(self) -> int:
        return len(self.vocab)

    def token_id(self, token: str) -> int:
        return self.vocab[token]

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        unk = self.vocab["<unk>"]
        rows = []
        for caption in captions:
            words = re.findall(r"[^\s,.;:!?]+", caption.lower())
            if len(words) > self.max_length - 2:
                raise ValueError(f"caption {caption!r} has {len(words)} words; the toy text encoder holds "
                                 f"{self.max_length - 2}")
            ids = [self.vocab["<bos>"], *(self.vocab.get(w, unk) for w in words), self.vocab["<eos>"]]
            rows.append(ids + [self.vocab["<pad>"]] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(self.vocab, indent=1))
        config = {"tokenizer_class": "WordTokenizer", "max_length": self.max_length}
        config.update({name.strip("<>") + "_token": name for name in TOY_SPECIAL_TOKENS})
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))

    @classmethod
    def load(cls, folder: str | Path) -> "WordTokenizer":
        folder = Path(folder)
        vocab = json.loads((folder / "vocab.json").read_text())
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        return cls(vocab, int(config.get("max_length", TOY_MAX_LENGTH)))


def toy_text_model(vocab_size: int, seed: int = 0):
    """A tiny CLIPTextModelWithProjection, randomly initialised from `seed`; never trained."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        projection_dim=32,
        max_position_embeddings=TOY_MAX_LENGTH,
        pad_token_id=TOY_SPECIAL_TOKENS["<pad>"],
        bos_token_id=TOY_SPECIAL_TOKENS["<bos>"],
        eos_token_id=TOY_SPECIAL_TOKENS["<eos>"],
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
        torch.manual_seed(seed)
        model = CLIPTextModelWithProjection(config)
    return _frozen(model)


class ToyTextEncoder(TextEncoder):
    """Random but fixed embeddings for the shapes captions; the UNet learns to read them.

    Same outputs as SDXL's second encoder (penultimate hidden states + projected pooled vector),
    so the toy runs through the SDXL code path: prompt_embeds [B,16,32], pooled [B,32].
    """

    def __init__(self, tokenizer: WordTokenizer, text_model):
        self.tokenizer, self.text_model = tokenizer, text_model

    @classmethod
    def create(cls, seed: int = 0) -> "ToyTextEncoder":
        tokenizer = WordTokenizer(toy_vocabulary())
        return cls(tokenizer, toy_text_model(len(tokenizer), seed))

    def encode(self, captions: list[str]) -> EncodedText:
        ids = self.tokenizer(captions).to(_device_of(self.text_model))
        out = self.text_model(ids, output_hidden_states=True)
        return EncodedText(out.hidden_states[-2], out.text_embeds)

    @property
    def embed_dim(self) -> int:
        return self.text_model.config.hidden_size

    @property
    def pooled_dim(self) -> int:
        return self.text_model.config.projection_dim


# --------------------------------------------------------------------------------------------
# Model folders: detection and loading
# --------------------------------------------------------------------------------------------


@dataclass
class Encoders:
    codec: LatentCodec
    text: TextEncoder
    kind: str  # "sdxl" | "sd15" | "toy"
    resolution: int  # the image size the model was trained at

    def time_ids(
        self, original_hw: tuple[int, int], crop_tl: tuple[int, int], target_hw: tuple[int, int]
    ) -> torch.Tensor | None:
        """SDXL's micro-conditioning [orig_h, orig_w, crop_top, crop_left, target_h, target_w].

        The toy uses SDXL's conditioning too, so that it exercises the same code; SD 1.5 has none.
        """
        if self.kind == "sd15":
            return None
        return torch.tensor([*original_hw, *crop_tl, *target_hw], dtype=torch.float32)


LATENT_CODEC_FILE = "latent_codec.json"
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
_MODEL_PART = ("config.json", "weights")
_CLIP_TOKENIZER = ("vocab.json|tokenizer.json",)
_REQUIRED_PARTS: dict[str, dict[str, tuple[str, ...]]] = {
    "sdxl": {
        "vae": _MODEL_PART,
        "text_encoder": _MODEL_PART,
        "text_encoder_2": _MODEL_PART,
        "tokenizer": _CLIP_TOKENIZER,
        "tokenizer_2": _CLIP_TOKENIZER,
    },
    "sd15": {"vae": _MODEL_PART, "text_encoder": _MODEL_PART, "tokenizer": _CLIP_TOKENIZER},
    "toy": {".": (LATENT_CODEC_FILE,), "text_encoder": _MODEL_PART, "tokenizer": ("vocab.json",)},
}


def _missing_parts(model_dir: Path, kind: str) -> list[str]:
    missing = []
    for sub, needs in _REQUIRED_PARTS[kind].items():
        folder = model_dir / sub
        label = "" if sub == "." else f"{sub}/"
        if not folder.is_dir():
            missing.append(label or str(model_dir))
            continue
        for need in needs:
            if need == "weights":
                found = any(any(folder.glob(p)) for p in _WEIGHT_PATTERNS)
            else:
                found = any((folder / name).is_file() for name in need.split("|"))
            if not found:
                what = "weights (*.safetensors or *.bin)" if need == "weights" else need.replace("|", " or ")
                missing.append(f"{label}{what}")
    return missing


def detect_kind(model_dir: str | Path) -> str:
    """'toy' if latent_codec.json is there, else 'sdxl' if a second text encoder/tokenizer is,
    else 'sd15' if a VAE is; raises FileNotFoundError naming the folder and what is missing."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model folder {model_dir} does not exist")
    if (model_dir / LATENT_CODEC_FILE).exists():
        kind = "toy"
    elif (model_dir / "text_encoder_2").exists() or (model_dir / "tokenizer_2").exists():
        kind = "sdxl"
    elif (model_dir / "vae").exists():
        kind = "sd15"
    else:
        raise FileNotFoundError(
            f"model folder {model_dir} is neither a diffusers SDXL/SD 1.5 folder (needs vae/, "
            f"text_encoder/, tokenizer/ and for SDXL text_encoder_2/, tokenizer_2/) nor a toy "
            f"folder (needs {LATENT_CODEC_FILE}, text_encoder/, tokenizer/vocab.json)"
        )
    missing = _missing_parts(model_dir, kind)
    if missing:
        raise FileNotFoundError(
            f"model folder {model_dir} looks like {kind} but is incomplete: missing {', '.join(missing)}"
        )
    return kind


def _frozen(module):
    module.requires_grad_(False)
    return module.eval()


def load_toy_codec(model_dir: str | Path) -> tuple[PixelUnshuffleCodec, dict]:
    """The toy's latent codec from its latent_codec.json, and that file's settings."""
    path = Path(model_dir) / LATENT_CODEC_FILE
    codec_config = json.loads(path.read_text())
    if codec_config.get("type") != "pixel_unshuffle":
        raise ValueError(f"{path}: unknown codec {codec_config.get('type')!r}")
    return PixelUnshuffleCodec(int(codec_config.get("factor", 2))), codec_config


def load_encoders(
    model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Encoders:
    """Load the codec and text encoder(s) of a model folder, frozen and in eval mode."""
    model_dir = Path(model_dir)
    kind = detect_kind(model_dir)

    # dtype goes to from_pretrained (not a later .to()) so that diffusers can keep the modules
    # that must stay float32 in float32.
    def load_model(cls, sub: str, dtype_key: str = "dtype"):
        model = cls.from_pretrained(model_dir / sub, local_files_only=True, **{dtype_key: dtype})
        return _frozen(model.to(device=device))

    if kind == "toy":
        from transformers import CLIPTextModelWithProjection

        codec, codec_config = load_toy_codec(model_dir)
        text_model = load_model(CLIPTextModelWithProjection, "text_encoder")
        text = ToyTextEncoder(WordTokenizer.load(model_dir / "tokenizer"), text_model)
        return Encoders(codec, text, kind, int(codec_config.get("resolution", 32)))

    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vae = load_model(AutoencoderKL, "vae", dtype_key="torch_dtype")  # diffusers' name for it
    codec = VaeCodec(vae)
    tokenizer = CLIPTokenizer.from_pretrained(model_dir / "tokenizer", local_files_only=True)
    text_encoder = load_model(CLIPTextModel, "text_encoder")
    if kind == "sdxl":
        tokenizer_2 = CLIPTokenizer.from_pretrained(model_dir / "tokenizer_2", local_files_only=True)
        text_encoder_2 = load_model(CLIPTextModelWithProjection, "text_encoder_2")
        text = SDXLTextEncoder(tokenizer, tokenizer_2, text_encoder, text_encoder_2)
    else:
        text = SD15TextEncoder(tokenizer, text_encoder)
    # The VAE's sample_size is the image size the model family was trained at (1024 for SDXL).
    return Encoders(codec, text, kind, int(vae.config.sample_size))


def create_toy_encoders(model_dir: str | Path, seed: int = 0, resolution: int = 32, factor: int = 2) -> Path:
    """Write the toy's encoder files into model_dir (deterministic from seed); returns the folder."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    codec_config = {"type": "pixel_unshuffle", "factor": factor, "resolution": resolution}
    (model_dir / LATENT_CODEC_FILE).write_text(json.dumps(codec_config, indent=1))
    text = ToyTextEncoder.create(seed)
    text.tokenizer.save(model_dir / "tokenizer")
    text.text_model.save_pretrained(model_dir / "text_encoder", safe_serialization=True)
    return model_dir

