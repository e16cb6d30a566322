"""What users deploy: one-file checkpoints in the original Stability layout, and LoRAs in the kohya layout.

ComfyUI and A1111 load (a) a *single-file checkpoint*: UNet, VAE and text encoder(s) in one .safetensors
file with the original (LDM/SGM) keys, and (b) LoRAs with kohya's `lora_unet_<module>.lora_down.weight`
/ `.lora_up.weight` / `.alpha` keys. This module writes both from what the trainer produces (a diffusers
model folder, a LoRA file from `trainer.method.lora.save_lora`).

    SDXL   model.diffusion_model.*                      UNet
           first_stage_model.*                          VAE
           conditioner.embedders.0.transformer.*        CLIP ViT-L (transformers layout)
           conditioner.embedders.1.model.*              OpenCLIP ViT-bigG (q/k/v fused into in_proj_*,
                                                        text_projection stored transposed)
    SD 1.5 model.diffusion_model.*, first_stage_model.*, cond_stage_model.transformer.*

One mapping, the inverse of diffusers' own reader. The original->diffusers direction is diffusers'
(`diffusers.loaders.single_file_utils`: `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
`convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`: what `from_single_file` runs). The
diffusers->original renames below use diffusers' tables where it has them (`DIFFUSERS_TO_LDM_MAPPING`,
the LDM prefixes) and spell out the block arithmetic those converters do inline; every conversion then
runs diffusers' converters on its result and refuses to return unless they give back exactly the
folder's keys and tensors. The same UNet renames name the modules of an SDXL kohya LoRA.

API
    write_single_file(model_dir, out_file, family=None, dtype=float16)   folder -> one original-layout file
    diffusers_to_original(model_dir, family=None, dtype=float32)         the same as a state dict
    verify_single_file(file, model_dir)       diffusers' from_single_file (offline) reads the folder's weights back
    lora_to_kohya(lora_file, out_file, family=None, naming=None)        save_lora file -> kohya layout
    plan / key_map / to_original / from_original / check_inverse        the mapping itself, both directions
Errors about the files and folders given are FormatError (a ValueError) naming the file and what is off.

Files are written by `_write_safetensors`, not `safetensors.torch.save_file`: that one writes its
metadata in hash order (a different byte order each process); here keys, tensors and metadata are
sorted, so the same input gives the same bytes.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Iterable, Mapping, Optional, Union

import torch

FAMILIES = ("sdxl", "sd15")
PARTS = {"sdxl": ("unet", "vae", "text_encoder", "text_encoder_2"), "sd15": ("unet", "vae", "text_encoder")}

# Where each part lives in the original layout (diffusers' single_file_utils reads these prefixes).
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = {"sdxl": "conditioner.embedders.0.transformer.", "sd15": "cond_stage_model.transformer."}
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

_MODELSPEC_ARCH = {"sdxl": "stable-diffusion-xl-v1-base", "sd15": "stable-diffusion-v1"}
_KOHYA_BASE_VERSION = {"sdxl": "sdxl_base_v1-0", "sd15": "sd_v1"}  # kohya's ss_base_model_version values
_CROSS_ATTENTION_WIDTH = {2048: "sdxl", 768: "sd15"}  # the real models' text widths, to tell a LoRA's family

PathLike = Union[str, Path]


class FormatError(ValueError):
    """A file or folder that is not what the conversion needs; the message names it and what is off."""


# --------------------------------------------------------------------------------------------------
# The key mapping: diffusers -> original, one entry per original tensor


@dataclass(frozen=True)
class Entry:
    """One tensor of the original layout and the diffusers tensors it is made of.

    op: "copy" (same tensor), "conv1x1" (a linear weight stored as a 1x1 conv: the VAE's attention),
    "transpose" (OpenCLIP's text_projection), "cat" (OpenCLIP's fused q/k/v in_proj, in q, k, v order).
    """
    original: str
    sources: tuple[str, ...]  # "<part>.<key of that part's diffusers state dict>"
    op: str = "copy"


def _diffusers_tables() -> dict:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    return DIFFUSERS_TO_LDM_MAPPING


# diffusers' resnet names -> the LDM ResBlock's (diffusers' update_unet_resnet_ldm_to_diffusers, inverted)
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
# diffusers' VAE attention names -> the LDM AttnBlock's (update_vae_attentions_ldm_to_diffusers, inverted)
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _layers_per_block(config: Mapping, part: str) -> int:
    lpb = config.get("layers_per_block")
    if not isinstance(lpb, int):
        raise FormatError(f"{part}: layers_per_block {lpb!r} is not one number; the original layout has one")
    return lpb


def unet_original_key(key: str, layers_per_block: int, up_blocks_with_attention: Iterable[int]) -> str:
    """A diffusers UNet key (parameter or module name) -> its name in the original UNet (no prefix).

    Inverse of diffusers' `convert_ldm_unet_checkpoint`: input_blocks.0 is conv_in; each down level
    has layers_per_block (resnet, attention) pairs, then its downsampler; each up level has
    layers_per_block + 1 pairs, the upsampler after the last (index .2 behind an attention, else .1).
    """
    tables = _diffusers_tables()["unet"]
    whole = {**tables["layers"], **tables["class_embed_type"], **tables["addition_embed_type"]}
    if key in whole:
        return whole[key]
    for diffusers_name, ldm_name in whole.items():  # module names (a LoRA's) of the same layers
        if diffusers_name.endswith(".weight") and key == diffusers_name[: -len(".weight")]:
            return ldm_name[: -len(".weight")]
    step = layers_per_block + 1
    parts = key.split(".")

    def resnet(rest: list[str]) -> str:
        if not rest or rest[0] not in _UNET_RESNET:
            raise KeyError(key)
        return ".".join([_UNET_RESNET[rest[0]], *rest[1:]])

    def tail(rest: list[str]) -> str:
        return ".".join(rest)

    try:
        if parts[0] in ("down_blocks", "up_blocks"):
            level, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
            if parts[0] == "down_blocks":
                if kind == "downsamplers" and index == 0 and rest[:1] == ["conv"]:
                    return ".".join([f"input_blocks.{level * step + step}.0.op", *rest[1:]])
                block = f"input_blocks.{1 + level * step + index}"
            else:
                if kind == "upsamplers" and index == 0 and rest[:1] == ["conv"]:
                    inner = 2 if level in set(up_blocks_with_attention) else 1
                    return ".".join([f"output_blocks.{level * step + layers_per_block}.{inner}.conv", *rest[1:]])
                block = f"output_blocks.{level * step + index}"
            if kind == "resnets" and index < step:
                return f"{block}.0.{resnet(rest)}"
            if kind == "attentions" and index < step:
                return f"{block}.1.{tail(rest)}"
        elif parts[0] == "mid_block":
            kind, index, rest = parts[1], int(parts[2]), parts[3:]
            if kind == "resnets" and index in (0, 1):
                return f"middle_block.{2 * index}.{resnet(rest)}"
            if kind == "attentions" and index == 0:
                return f"middle_block.1.{tail(rest)}"
    except (IndexError, ValueError):
        pass
    raise KeyError(key)


def _up_blocks_with_attention(keys: Iterable[str]) -> set[int]:
    return {int(m.group(1)) for k in keys if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}


def _plan_unet(keys: list[str], config: Mapping) -> list[Entry]:
    lpb = _layers_per_block(config, "unet")
    with_attention = _up_blocks_with_attention(keys)
    return [Entry(UNET_PREFIX + unet_original_key(k, lpb, with_attention), (f"unet.{k}",)) for k in keys]


def _vae_original_key(key: str, num_blocks: int) -> tuple[str, str]:
    """(original key without prefix, op) for a diffusers AutoencoderKL key; inverse of convert_ldm_vae_checkpoint."""
    whole = _diffusers_tables()["vae"]
    if key in whole:
        return whole[key], "copy"
    parts = key.split(".")
    side = parts[0]

    def resnet(rest: list[str]) -> str:
        return ".".join(["nin_shortcut" if rest[0] == "conv_shortcut" else rest[0], *rest[1:]])

    try:
        if side == "encoder" and parts[1] == "down_blocks":
            level, kind = int(parts[2]), parts[3]
            if kind == "resnets":
                return f"encoder.down.{level}.block.{int(parts[4])}.{resnet(parts[5:])}", "copy"
            if kind == "downsamplers" and parts[4] == "0" and parts[5] == "conv":
                return ".".join([f"encoder.down.{level}.downsample.conv", *parts[6:]]), "copy"
        elif side == "decoder" and parts[1] == "up_blocks":
            level, kind = num_blocks - 1 - int(parts[2]), parts[3]  # the decoder counts its levels backwards
            if kind == "resnets":
                return f"decoder.up.{level}.block.{int(parts[4])}.{resnet(parts[5:])}", "copy"
            if kind == "upsamplers" and parts[4] == "0" and parts[5] == "conv":
                return ".".join([f"decoder.up.{level}.upsample.conv", *parts[6:]]), "copy"
        elif side in ("encoder", "decoder") and parts[1] == "mid_block":
            kind, index, rest = parts[2], int(parts[3]), parts[4:]
            if kind == "resnets" and index in (0, 1):
                return f"{side}.mid.block_{index + 1}.{resnet(rest)}", "copy"
            if kind == "attentions" and index == 0:
                name = ".".join(rest[:-1])
                if name in _VAE_ATTENTION:
                    op = "conv1x1" if rest[-1] == "weight" and name != "group_norm" else "copy"
                    return f"{side}.mid.attn_1.{_VAE_ATTENTION[name]}.{rest[-1]}", op
    except (IndexError, ValueError):
        pass
    raise KeyError(key)


def _plan_vae(keys: list[str], config: Mapping) -> list[Entry]:
    num_blocks = len(config["up_block_types"])
    entries = []
    for k in keys:
        original, op = _vae_original_key(k, num_blocks)
        entries.append(Entry(VAE_PREFIX + original, (f"vae.{k}",), op))
    return entries


def _text_model_key(key: str) -> str:
    """transformers >= 5.6 flattens CLIPTextModel (no `text_model.` in its keys); older ones have it."""
    return key if key.startswith("text_model.") or key == "text_projection.weight" else "text_model." + key


def _plan_clip(keys: list[str], prefix: str, part: str = "text_encoder") -> list[Entry]:
    """CLIP ViT-L keeps the transformers layout under a prefix (diffusers' convert_ldm_clip_checkpoint strips it)."""
    return [Entry(prefix + _text_model_key(k), (f"{part}.{k}",)) for k in keys]


def _plan_open_clip(keys: list[str], prefix: str, part: str = "text_encoder_2") -> list[Entry]:
    """OpenCLIP layout; inverse of diffusers' convert_open_clip_checkpoint (its tables, read backwards)."""
    tables = _diffusers_tables()["openclip"]
    layer_renames = [(d, o) for d, o in tables["transformer"].items() if not d.startswith("transformer.")]
    fused: dict[str, dict[str, str]] = {}
    entries = []
    for k in keys:
        name = _text_model_key(k)
        if name in tables["layers"]:
            original = tables["layers"][name]
            entries.append(Entry(prefix + original, (f"{part}.{k}",), "transpose" if original == "text_projection" else "copy"))
            continue
        if not name.startswith("text_model.encoder.layers."):
            raise KeyError(k)
        original = "transformer." + name
        for diffusers_name, ldm_name in layer_renames:
            original = original.replace(diffusers_name, ldm_name)
        m = re.fullmatch(r"(.*\.attn)\.(q|k|v)_proj\.(weight|bias)", original)
        if m:
            fused.setdefault(f"{m.group(1)}.in_proj_{m.group(3)}", {})[m.group(2)] = f"{part}.{k}"
        else:
            entries.append(Entry(prefix + original, (f"{part}.{k}",)))
    for original, qkv in fused.items():
        if sorted(qkv) != ["k", "q", "v"]:
            raise KeyError(f"{original}: needs q, k and v projections, has {sorted(qkv)}")
        entries.append(Entry(prefix + original, (qkv["q"], qkv["k"], qkv["v"]), "cat"))
    return entries


def plan(keys: Mapping[str, list[str]], configs: Mapping[str, Mapping], family: str) -> list[Entry]:
    """The whole mapping for a model's parts: {part: its diffusers keys} -> entries sorted by original key.

    Each diffusers key is used exactly once and each original key made once, or this raises.
    """
    _check_family(family)
    planners = {
        "unet": lambda ks: _plan_unet(ks, configs["unet"]),
        "vae": lambda ks: _plan_vae(ks, configs["vae"]),
        "text_encoder": lambda ks: _plan_clip(ks, CLIP_PREFIX[family]),
        "text_encoder_2": lambda ks: _plan_open_clip(ks, OPEN_CLIP_PREFIX),
    }
    entries: list[Entry] = []
    for part in PARTS[family]:
        try:
            entries += planners[part](list(keys[part]))
        except KeyError as e:
            raise FormatError(f"{part}: key {e.args[0]!r} has no place in the original {family} layout") from None
    originals = [e.original for e in entries]
    sources = [s for e in entries for s in e.sources]
    expected = [f"{part}.{k}" for part in PARTS[family] for k in keys[part]]
    if len(set(originals)) != len(originals):
        twice = sorted({k for k in originals if originals.count(k) > 1})
        raise FormatError(f"two diffusers tensors map to the same original key: {twice[:5]}")
    if sorted(sources) != sorted(expected):
        raise FormatError(f"the mapping does not use each diffusers key once: {sorted(set(expected) ^ set(sources))[:5]}")
    return sorted(entries, key=lambda e: e.original)


def key_map(entries: list[Entry]) -> dict[str, str]:
    """"<part>.<diffusers key>" -> original key (q, k and v of one OpenCLIP layer share their in_proj key)."""
    return {source: e.original for e in entries for source in e.sources}


def _apply(entry: Entry, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    values = [tensors[s] for s in entry.sources]
    if entry.op == "copy":
        return values[0]
    if entry.op == "conv1x1":
        return values[0].reshape(*values[0].shape, 1, 1)
    if entry.op == "transpose":
        return values[0].T.contiguous()
    if entry.op == "cat":
        return torch.cat(values, dim=0)
    raise ValueError(entry.op)


def to_original(states: Mapping[str, Mapping[str, torch.Tensor]], configs: Mapping[str, Mapping],
                family: str) -> dict[str, torch.Tensor]:
    """{part: diffusers state dict} -> the original-layout state dict (sorted keys), checked against diffusers' reader."""
    entries = plan({part: list(states[part]) for part in PARTS[family]}, configs, family)
    flat = {f"{part}.{k}": v for part in PARTS[family] for k, v in states[part].items()}
    original = {e.original: _apply(e, flat) for e in entries}
    check_inverse(original, states, configs, family)
    return original


# --------------------------------------------------------------------------------------------------
# The other direction is diffusers' own


def from_original(original: Mapping[str, torch.Tensor], configs: Mapping[str, Mapping], family: str,
                  flat_clip: Mapping[str, bool]) -> dict[str, dict[str, torch.Tensor]]:
    """diffusers' single-file converters, as from_single_file runs them: original -> {part: diffusers state dict}.

    flat_clip[part]: whether that text encoder's diffusers keys lack `text_model.` (transformers >= 5.6's
    CLIPTextModel), as create_diffusers_clip_model_from_ldm handles it.
    """
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)

    def unflatten(state: dict, part: str) -> dict:
        return {k.removeprefix("text_model."): v for k, v in state.items()} if flat_clip.get(part) else state

    out = {
        "unet": convert_ldm_unet_checkpoint(dict(original), config=configs["unet"]),
        "vae": convert_ldm_vae_checkpoint(dict(original), config=configs["vae"]),
        "text_encoder": unflatten(convert_ldm_clip_checkpoint(dict(original)), "text_encoder"),
    }
    if family == "sdxl":
        # the model is consulted only when the file has no text_projection (never for ours)
        model = SimpleNamespace(config=SimpleNamespace(hidden_size=configs["text_encoder_2"]["hidden_size"]))
        out["text_encoder_2"] = unflatten(convert_open_clip_checkpoint(model, dict(original), prefix=OPEN_CLIP_PREFIX),
                                          "text_encoder_2")
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b:
        return True
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return a.is_meta or b.is_meta or torch.equal(a, b)


def check_inverse(original: Mapping[str, torch.Tensor], states: Mapping[str, Mapping[str, torch.Tensor]],
                  configs: Mapping[str, Mapping], family: str) -> None:
    """Raises unless diffusers' converters read `original` back into exactly `states` (keys, shapes, values;
    meta tensors: keys and shapes)."""
    flat_clip = {part: not any(k.startswith("text_model.") for k in states[part])
                 for part in ("text_encoder", "text_encoder_2") if part in states}
    back = from_original(original, configs, family, flat_clip)
    for part in PARTS[family]:
        want, got = states[part], back[part]
        missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        differ = sorted(k for k in set(want) & set(got) if not _same(want[k], got[k]))
        if missing or unexpected or differ:
            raise RuntimeError(f"{part}: the original-layout mapping is not the inverse of diffusers' reader: "
                               f"diffusers does not get back {missing[:5]}, gets extra {unexpected[:5]}, "
                               f"gets different tensors for {differ[:5]}")


# --------------------------------------------------------------------------------------------------
# Model folders


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise FormatError(f"family {family!r}: expected one of {FAMILIES}")


def detect_family(model_dir: PathLike) -> str:
    """"sdxl" when the folder has text_encoder_2/, else "sd15"."""
    return "sdxl" if (Path(model_dir) / "text_encoder_2").exists() else "sd15"


def _resolve_family(model_dir: Path, family: Optional[str]) -> str:
    found = detect_family(model_dir)
    if family is None:
        family = found
    _check_family(family)
    missing = [p for p in PARTS[family] if not (model_dir / p).is_dir()]
    if missing:
        raise FormatError(f"{model_dir}: a diffusers {family} folder needs {', '.join(p + '/' for p in PARTS[family])}; "
                          f"it lacks {', '.join(p + '/' for p in missing)}")
    if family != found:
        raise FormatError(f"{model_dir}: read as {family}, but it is a {found} folder "
                          f"({'has' if found == 'sdxl' else 'has no'} text_encoder_2/)")
    unet_config = json.loads((model_dir / "unet" / "config.json").read_text())
    is_sdxl_unet = unet_config.get("addition_embed_type") == "text_time"
    if is_sdxl_unet != (family == "sdxl"):
        raise FormatError(f"{model_dir}: the folder's parts say {family}, but its UNet "
                          f"{'takes' if is_sdxl_unet else 'does not take'} SDXL's added text/time conditioning")
    return family


def _transformers_dtype_kwarg() -> str:
    """transformers took `torch_dtype` until 4.56 and `dtype` since (5.x deprecates `torch_dtype`)."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__).release >= (4, 56) else "torch_dtype"


def load_folder(model_dir: PathLike, family: Optional[str] = None, dtype: Optional[torch.dtype] = torch.float32):
    """(family, {part: diffusers state dict}, {part: config}) of a diffusers model folder, through diffusers'
    and transformers' own loaders (so shards, symlinked parts and renamed legacy keys read as they do there)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FormatError(f"{model_dir}: no such model folder")
    family = _resolve_family(model_dir, family)
    classes = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
               "text_encoder_2": CLIPTextModelWithProjection}
    states, configs = {}, {}
    for part in PARTS[family]:
        cls = classes[part]
        try:
            if part.startswith("text_encoder"):
                model = cls.from_pretrained(model_dir / part, local_files_only=True, **{_transformers_dtype_kwarg(): dtype})
                configs[part] = model.config.to_dict()
            else:
                model = cls.from_pretrained(model_dir / part, local_files_only=True, torch_dtype=dtype)
                configs[part] = dict(model.config)
        except Exception as e:  # noqa: BLE001 - one message naming the part, the library's reason kept
            raise FormatError(f"{model_dir / part}: cannot be read as {cls.__name__}: {type(e).__name__}: {e}") from e
        # position_ids is a non-persistent buffer (arange), not a weight; older transformers saved it
        states[part] = {k: v.detach() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
        del model
    return family, states, configs


def diffusers_to_original(model_dir: PathLike, family: Optional[str] = None,
                          dtype: Optional[torch.dtype] = torch.float32) -> dict[str, torch.Tensor]:
    """A diffusers model folder -> its state dict in the original single-file layout, keys sorted.

    family: "sdxl" or "sd15"; None detects it (sdxl when text_encoder_2/ exists). A given family that the
    folder does not match is an error. dtype: the tensors' dtype (None: as the loaders give them).
    The result is checked: diffusers' single-file converters turn it back into the folder's tensors.
    """
    family, states, configs = load_folder(model_dir, family, dtype)
    return to_original(states, configs, family)


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                       torch.bool: "BOOL"}


def _dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _SAFETENSORS_DTYPES:
        raise FormatError(f"dtype {dtype} cannot be written to safetensors here")
    return _SAFETENSORS_DTYPES[dtype]


def _write_safetensors(tensors: Mapping[str, torch.Tensor], out_file: PathLike,
                       metadata: Optional[Mapping[str, str]] = None) -> Path:
    """A safetensors file with sorted header keys and tensors laid out by (itemsize descending, name):
    the same tensors and metadata give the same bytes. Written to a temporary name, then renamed."""
    out_file = Path(out_file)
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    offset = 0
    for k in order:
        t = tensors[k]
        size = t.numel() * t.element_size()
        header[k] = {"dtype": _dtype_name(t.dtype), "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":"), sort_keys=False).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(out_file.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for k in order:
            t = tensors[k].detach().to("cpu").contiguous()
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
    os.replace(tmp, out_file)
    return out_file


def single_file_metadata(family: str) -> dict[str, str]:
    return {"format": "pt", "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": _MODELSPEC_ARCH[family]}


def write_single_file(model_dir: PathLike, out_file: PathLike, family: Optional[str] = None,
                      dtype: Optional[torch.dtype] = torch.float16,
                      metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Writes the folder's UNet, VAE and text encoder(s) as one original-layout .safetensors file.

    The bytes depend only on the weights, family, dtype and metadata (no paths, no times), so two writes
    of the same folder are identical. metadata: extra header entries (strings), merged over the defaults.
    Returns out_file.
    """
    original = diffusers_to_original(model_dir, family, dtype)
    family = family or detect_family(model_dir)
    return _write_safetensors(original, out_file, {**single_file_metadata(family), **(metadata or {})})


def _open_safetensors(file: Path, what: str):
    from safetensors import safe_open

    if not file.is_file():
        raise FormatError(f"{file}: no such {what}")
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:  # noqa: BLE001
        raise FormatError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from e


def verify_single_file(file: PathLike, model_dir: PathLike, family: Optional[str] = None) -> None:
    """Raises FormatError unless `file` is `model_dir` in the original layout: the same keys and shapes as
    this module writes, and diffusers' `from_single_file` (offline, the folder as config) reads back every
    weight of the folder's UNet, VAE and text encoder(s), compared in the file's dtype."""
    file, model_dir = Path(file), Path(model_dir)
    with _open_safetensors(file, "single-file checkpoint") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    family, states, configs = load_folder(model_dir, family, dtype=torch.float32)
    entries = plan({p: list(s) for p, s in states.items()}, configs, family)
    expected = {e.original: _apply(e, {f"{p}.{k}": v for p in states for k, v in states[p].items()}).shape
                for e in entries}
    missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise FormatError(f"{file} is not {model_dir} as a {family} single file: it lacks {len(missing)} keys "
                          f"{missing[:3]}, has {len(unexpected)} keys the folder does not {unexpected[:3]}")
    wrong = sorted(k for k in expected if tuple(expected[k]) != shapes[k])
    if wrong:
        raise FormatError(f"{file} does not match {model_dir}: {len(wrong)} tensors have other shapes, e.g. "
                          f"{wrong[0]} {shapes[wrong[0]]} vs {tuple(expected[wrong[0]])}")
    loaded = load_with_diffusers(file, model_dir, family)
    names = {v: k for k, v in _SAFETENSORS_DTYPES.items()}
    file_dtype = {source: names.get(dtypes[e.original], torch.float32) for e in entries for source in e.sources}

    def same(part: str, key: str, a: torch.Tensor, b: torch.Tensor) -> bool:  # compared in the file's dtype
        dtype = file_dtype[f"{part}.{key}"]
        return not b.is_meta and a.shape == b.shape and torch.equal(a.to(dtype), b.to(dtype))

    for part in PARTS[family]:
        got = loaded[part]
        want = states[part]
        bad = sorted(k for k in want if k not in got or not same(part, k, want[k], got[k]))
        extra = sorted(set(got) - set(want))
        if bad or extra:
            raise FormatError(f"{file}: diffusers' from_single_file reads {part} with {len(bad)} weights unlike "
                              f"{model_dir / part} ({bad[:3]}), {len(extra)} it should not have ({extra[:3]})")


def load_with_diffusers(file: PathLike, model_dir: PathLike, family: str) -> dict[str, dict[str, torch.Tensor]]:
    """{part: state dict} of the pipeline diffusers' `from_single_file` builds from `file`, offline, with
    `model_dir` (a diffusers folder with model_index.json) as the config."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    kwargs = {} if family == "sdxl" else {"safety_checker": None, "feature_extractor": None}
    try:
        pipe = cls.from_single_file(str(file), config=str(model_dir), local_files_only=True, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise FormatError(f"{file}: diffusers' {cls.__name__}.from_single_file (config {model_dir}) fails: "
                          f"{type(e).__name__}: {e}") from e
    return {part: {k: v.detach() for k, v in getattr(pipe, part).state_dict().items()
                   if not k.endswith("position_ids")} for part in PARTS[family]}


# --------------------------------------------------------------------------------------------------
# LoRA: this project's file (peft keys under `unet.`, LoraConfig as lora_adapter_metadata) -> kohya


def read_project_lora(lora_file: PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """({`<module>.lora_A.weight` / `.lora_B.weight`: tensor}, LoraConfig dict) of a `save_lora` file."""
    lora_file = Path(lora_file)
    with _open_safetensors(lora_file, "LoRA file") as f:
        metadata = f.metadata() or {}
        try:
            weights = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - a header that promises more bytes than the file has
            raise FormatError(f"{lora_file}: tensor data unreadable ({type(e).__name__}: {e})") from e
    pattern = re.compile(r"unet\.(.+)\.lora_(A|B)\.weight")
    foreign = sorted(k for k in weights if not pattern.fullmatch(k))
    if foreign:
        raise FormatError(f"{lora_file}: not a LoRA file of this trainer (peft keys `unet.<module>.lora_A.weight`): "
                          f"{len(foreign)} keys like {foreign[:3]}")
    if "lora_adapter_metadata" not in metadata:
        raise FormatError(f"{lora_file}: no lora_adapter_metadata header, so its alpha is unknown "
                          "(write it with trainer.method.lora.save_lora)")
    config = {k.removeprefix("unet."): v for k, v in json.loads(metadata["lora_adapter_metadata"]).items()
              if k.startswith("unet.")}
    unsupported = {k: config.get(k) for k in ("alpha_pattern", "use_dora", "use_rslora", "lora_bias")
                   if config.get(k)}
    if unsupported or "lora_alpha" not in config:
        raise FormatError(f"{lora_file}: kohya's layout has one alpha per module and plain LoRA; this one has "
                          f"{unsupported or 'no lora_alpha'}")
    modules = {pattern.fullmatch(k).group(1) for k in weights}
    unpaired = sorted(m for m in modules if f"unet.{m}.lora_A.weight" not in weights or f"unet.{m}.lora_B.weight" not in weights)
    if unpaired:
        raise FormatError(f"{lora_file}: modules without both lora_A and lora_B: {unpaired[:3]}")
    return {k.removeprefix("unet."): v for k, v in weights.items()}, config


def lora_family(weights: Mapping[str, torch.Tensor]) -> Optional[str]:
    """sdxl / sd15 from the cross-attention width the LoRA's attn2.to_k reads (2048 / 768), else None."""
    widths = {v.shape[1] for k, v in weights.items() if k.endswith("attn2.to_k.lora_A.weight")}
    return _CROSS_ATTENTION_WIDTH.get(widths.pop()) if len(widths) == 1 else None


def kohya_module_name(module: str, naming: str, layers_per_block: int, up_blocks_with_attention: Iterable[int]) -> str:
    """`lora_unet_<module, dots as underscores>`: the original UNet's module name ("original") or diffusers' ("diffusers")."""
    if naming == "original":
        module = unet_original_key(module, layers_per_block, up_blocks_with_attention)
    elif naming != "diffusers":
        raise FormatError(f"naming {naming!r}: expected 'original' or 'diffusers'")
    return "lora_unet_" + module.replace(".", "_")


def lora_to_kohya(lora_file: PathLike, out_file: PathLike, family: Optional[str] = None,
                  naming: Optional[str] = None) -> Path:
    """This project's LoRA file -> the kohya layout (`lora_unet_<module>.lora_down.weight`, `.lora_up.weight`,
    `.alpha`) that ComfyUI, A1111 and diffusers' `load_lora_weights` read. Returns out_file.

    The peft -> kohya step is diffusers' `convert_state_dict_to_kohya`; on top of it, alpha is the LoRA's
    own (that converter writes alpha = rank) and the module names follow kohya's convention per family:
    the original UNet's names for SDXL (`lora_unet_input_blocks_4_1_...`, as kohya's SDXL trainer and the
    SDXL-Lightning LoRAs name them), diffusers' for SD 1.5 (`lora_unet_down_blocks_0_...`, as kohya's SD 1.x
    trainer does). `naming` ("original"/"diffusers") overrides. family: None reads it from the
    cross-attention width (2048 SDXL, 768 SD 1.5); other widths (test models) need it given.
    """
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    lora_file = Path(lora_file)
    weights, config = read_project_lora(lora_file)
    if family is None:
        family = lora_family(weights)
        if family is None:
            raise FormatError(f"{lora_file}: cannot tell SDXL from SD 1.5 by its cross-attention width; pass family=")
    _check_family(family)
    naming = naming or ("original" if family == "sdxl" else "diffusers")

    modules = sorted({k.rsplit(".lora_", 1)[0] for k in weights})
    resnets = {int(m.group(1)) for k in modules if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k))}
    if not resnets:
        raise FormatError(f"{lora_file}: no LoRA on down_blocks.0's resnets, so the UNet's layers per block is unknown")
    layers_per_block = max(resnets) + 1
    with_attention = _up_blocks_with_attention(modules)

    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in weights.items()})
    names = {}
    for module in modules:
        theirs = kohya_module_name(module, "diffusers", layers_per_block, with_attention)
        if f"{theirs}.lora_down.weight" not in kohya or f"{theirs}.lora_up.weight" not in kohya:
            raise RuntimeError(f"diffusers' convert_state_dict_to_kohya named {module} unexpectedly")
        try:
            names[theirs] = kohya_module_name(module, naming, layers_per_block, with_attention)
        except KeyError:
            raise FormatError(f"{lora_file}: LoRA module {module} has no place in the original UNet") from None
    if len(set(names.values())) != len(names):
        raise FormatError(f"{lora_file}: two modules get the same kohya name")
    alpha = float(config["lora_alpha"])
    out: dict[str, torch.Tensor] = {}
    for key, value in kohya.items():
        theirs, _, what = key.partition(".")
        if what == "alpha":
            continue
        out[f"{names[theirs]}.{what}"] = value.contiguous()
    for theirs, ours in names.items():
        out[f"{ours}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    ranks = sorted({int(v.shape[0]) for k, v in out.items() if k.endswith(".lora_down.weight")})
    metadata = {
        "format": "pt",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks[0]) if len(ranks) == 1 else "dynamic",
        "ss_network_alpha": f"{alpha:g}",
        "ss_base_model_version": _KOHYA_BASE_VERSION[family],
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{_MODELSPEC_ARCH[family]}/lora",
    }
    return _write_safetensors(out, out_file, metadata)

