"""A base model held as one single-file checkpoint (how SDXL and SD 1.5 finetunes are shared and loaded in
ComfyUI and A1111) becomes a diffusers folder once, through diffusers' own `from_single_file`; everything
after (the encoders that make the shards, the teacher, the discriminator) reads that folder.

    python -m trainer.base_model my_finetune.safetensors --config sdxl-base-folder --out my_finetune
    # or in a recipe:  model: {base: my_finetune.safetensors, base_config: sdxl-base-folder}
    #   (the run converts it into <run.out_dir>/base)

`--config` / `model.base_config` is a local diffusers folder of the checkpoint's architecture (the SDXL or
SD 1.5 base as `save_pretrained` writes it: model_index.json, each part's config, the tokenizers and the
scheduler); its weights, if it has any, are not used. Before anything is converted, the file's keys and
shapes are checked against that architecture: a file of another family or size is one line naming the file,
the folder and what differs. Extra keys (EMA copies, `denoiser.sigmas`) are ignored, as diffusers does.

The folder is written under a temporary name and renamed, with `single_file_source.json` saying which file
it came from: a later run reuses it, and one whose `model.base` names another file stops instead of
continuing a run on a different base.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Optional, Sequence

import torch

from trainer.formats import OPEN_CLIP_PREFIX, PARTS, FormatError, _apply, _open_safetensors, plan

SOURCE_FILE = "single_file_source.json"
_FAMILY_NAMES = {"sdxl": "SDXL", "sd15": "SD 1.5"}
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def is_single_file(base: str | Path) -> bool:
    return str(base).endswith(".safetensors")


def _header(file: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """({key: shape}, {key: dtype name}) from the file's header alone (no tensor is read)."""
    with _open_safetensors(file, "single-file checkpoint") as f:
        keys = list(f.keys())
        return ({k: tuple(f.get_slice(k).get_shape()) for k in keys}, {k: f.get_slice(k).get_dtype() for k in keys})


def file_family(file: Path, keys) -> str:
    """sdxl when the file has OpenCLIP-bigG text encoder keys, sd15 when it has SD 1.5's text encoder."""
    if any(k.startswith(OPEN_CLIP_PREFIX) for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd15"
    raise FormatError(f"{file}: not an SDXL or SD 1.5 single-file checkpoint (it has neither SDXL's "
                      f"'{OPEN_CLIP_PREFIX}' nor SD 1.5's 'cond_stage_model.transformer.' text encoder keys)")


def _config_family(config_dir: Path) -> str:
    if not (config_dir / "model_index.json").is_file():
        raise FormatError(f"{config_dir}: not a diffusers model folder (no model_index.json): the config folder must "
                          f"be the base model's architecture as save_pretrained writes it")
    return "sdxl" if (config_dir / "text_encoder_2").is_dir() else "sd15"


def expected_layout(config_dir: Path, family: str) -> dict[str, tuple[int, ...]]:
    """{original key: shape} of the architecture in `config_dir`, from its configs alone (meta tensors)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    classes = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
               "text_encoder_2": CLIPTextModelWithProjection}
    states, configs = {}, {}
    for part in PARTS[family]:
        try:
            with torch.device("meta"):
                if part.startswith("text_encoder"):
                    model = classes[part](CLIPTextConfig.from_pretrained(config_dir / part, local_files_only=True))
                    configs[part] = model.config.to_dict()
                else:
                    model = classes[part].from_config(classes[part].load_config(config_dir / part, local_files_only=True))
                    configs[part] = dict(model.config)
        except Exception as e:  # noqa: BLE001 - one line naming the part, the library's reason kept
            raise FormatError(f"{config_dir / part}: no {classes[part].__name__} config there ({type(e).__name__}: {e})") from e
        states[part] = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    flat = {f"{p}.{k}": v for p in states for k, v in states[p].items()}
    return {e.original: tuple(_apply(e, flat).shape) for e in plan({p: list(s) for p, s in states.items()}, configs, family)}


def check_single_file(file: str | Path, config_dir: str | Path) -> tuple[str, torch.dtype]:
    """(family, the UNet's dtype in the file) when `file` holds every tensor of `config_dir`'s architecture
    with its shape; else FormatError, one line naming both and what does not match."""
    file, config_dir = Path(file), Path(config_dir)
    shapes, dtypes = _header(file)
    family, folder_family = file_family(file, shapes), _config_family(config_dir)
    if family != folder_family:
        raise FormatError(f"{file} is an {_FAMILY_NAMES[family]} checkpoint, but the config folder {config_dir} is "
                          f"{_FAMILY_NAMES[folder_family]}: give the folder of the checkpoint's own architecture")
    expected = expected_layout(config_dir, family)
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise FormatError(f"{file} does not hold {config_dir}'s {_FAMILY_NAMES[family]} architecture: it lacks "
                          f"{len(missing)} of its {len(expected)} tensors, e.g. {missing[0]}")
    wrong = sorted(k for k in expected if shapes[k] != expected[k])
    if wrong:
        raise FormatError(f"{file} does not match {config_dir}: {len(wrong)} tensors have other shapes, e.g. "
                          f"{wrong[0]} {list(shapes[wrong[0]])} in the file, {list(expected[wrong[0]])} in the config")
    unet_dtypes = [dtypes[k] for k in expected if k.startswith("model.diffusion_model.")]
    return family, _DTYPES.get(max(set(unet_dtypes), key=unet_dtypes.count), torch.float32)


def _source(file: Path, config_dir: Path) -> dict:
    stat = file.stat()
    return {"file": str(file), "bytes": stat.st_size, "modified_ns": stat.st_mtime_ns, "config": str(config_dir)}


def convert_single_file(file: str | Path, config_dir: str | Path, out_dir: str | Path) -> Path:
    """The diffusers folder of a single-file checkpoint, written once to `out_dir` (reused when it was made
    from the same file). Weights keep the file's dtype, so the folder holds exactly the file's values."""
    file, config_dir, out_dir = Path(file), Path(config_dir), Path(out_dir)
    source = _source(file, config_dir) if file.is_file() else None
    if (out_dir / SOURCE_FILE).is_file():
        made_from = json.loads((out_dir / SOURCE_FILE).read_text())
        if source is not None and {k: made_from.get(k) for k in ("file", "bytes", "modified_ns")} != \
                {k: source[k] for k in ("file", "bytes", "modified_ns")}:
            raise FormatError(f"{out_dir} was converted from {made_from['file']} ({made_from['bytes']} bytes), not from "
                              f"{file} as it is now: use another output folder (run.out_dir), or delete {out_dir}")
        return out_dir
    if out_dir.exists():
        raise FormatError(f"{out_dir} exists and was not converted from a single file: use another output folder")
    family, dtype = check_single_file(file, config_dir)

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    extra = {} if family == "sdxl" else {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    try:
        pipe = cls.from_single_file(str(file), config=str(config_dir), local_files_only=True, torch_dtype=dtype, **extra)
    except Exception as e:  # noqa: BLE001
        raise FormatError(f"{file}: diffusers' {cls.__name__}.from_single_file (config {config_dir}) fails: "
                          f"{type(e).__name__}: {e}") from e
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / SOURCE_FILE).write_text(json.dumps({**source, "family": family, "dtype": str(dtype).removeprefix("torch.")},
                                              indent=1))
    os.replace(tmp, out_dir)
    return out_dir


def main(argv: Optional[Sequence[str]] = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("file", type=Path, help="the single-file checkpoint (.safetensors, original SDXL or SD 1.5 keys)")
    p.add_argument("--config", type=Path, required=True, help="diffusers folder of the checkpoint's architecture")
    p.add_argument("--out", type=Path, required=True, help="the diffusers folder to write")
    args = p.parse_args(argv)
    try:
        out = convert_single_file(args.file, args.config, args.out)
    except FormatError as e:
        raise SystemExit(f"error: {e}")
    print(f"{args.file} -> {out}")
    return out


if __name__ == "__main__":
    main()
