"""Everything a job will need, checked before it starts (or is queued behind others for hours).

`problems(cfg, world_size)` returns one line per problem, each naming the config key and the path: model
folder parts, the teacher, the shards and their index, the DeepSpeed JSON, the batch arithmetic at this
world size, and whether the output folder can be written. `python -m trainer.run` refuses to start and
`python -m trainer.launch` (also with --dry-run) refuses to submit while any remain.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from trainer.config import Config, ConfigError, ds_config_from_file


def problems(cfg: Config, world_size: int) -> list[str]:
    found: list[str] = []
    unet_config = _check_models(cfg, found)
    _check_shards(cfg, unet_config, found)
    _check_deepspeed(cfg, world_size, found)
    _check_writable(cfg.out_dir, found)
    return found


def _check_models(cfg: Config, found: list[str]) -> dict | None:
    """The base folder's parts and the teacher's UNet; returns the UNet config the shards must fit."""
    from trainer.data.encoders import detect_kind

    unet_dir = None
    from trainer.base_model import is_single_file

    if is_single_file(cfg.model.base):
        # a single file, checked against model.base_config's architecture by the config's validation; the
        # shards must fit that architecture's UNet
        unet_dir = Path(cfg.model.base_config) / "unet"
        if not (unet_dir / "config.json").is_file():
            found.append(f"model.base_config: {unet_dir}/config.json is missing")
    elif cfg.model.base != "toy":
        try:
            detect_kind(cfg.model.base)
        except FileNotFoundError as err:
            found.append(f"model.base: {err}")
        unet_dir = Path(cfg.model.base) / "unet"
        found.extend(f"model.base: {p}" for p in _unet_problems(unet_dir))
    if cfg.teacher.init:
        unet_dir = Path(cfg.teacher.init) / "unet"
        found.extend(f"teacher.init: {p}" for p in _unet_problems(unet_dir))
    if unet_dir is not None and (unet_dir / "config.json").is_file():
        try:
            return json.loads((unet_dir / "config.json").read_text())
        except json.JSONDecodeError as err:
            found.append(f"{unet_dir / 'config.json'}: not valid JSON: {err}")
    return None


def _unet_problems(unet_dir: Path) -> list[str]:
    if not (unet_dir / "config.json").is_file():
        return [f"{unet_dir}/config.json is missing"]
    weights = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")
    if not any((unet_dir / name).is_file() for name in weights):
        return [f"{unet_dir} has no diffusion_pytorch_model.safetensors (or its index)"]
    return []


def _check_shards(cfg: Config, unet_config: dict | None, found: list[str]) -> None:
    if cfg.data.source == "shapes" and not (cfg.shard_dir / "index.json").is_file():
        return  # the run renders and encodes them
    from trainer.data.shards import read_index

    try:
        index = read_index(cfg.shard_dir)
    except (FileNotFoundError, ValueError, json.JSONDecodeError) as err:
        found.append(f"data.shards: {err}")
        return
    shards = index.get("shards", [])
    if not shards:
        found.append(f"data.shards: {cfg.shard_dir}/index.json lists no shards")
    missing = [s["name"] for s in shards if not (cfg.shard_dir / s["name"]).is_file()]
    if missing:
        found.append(f"data.shards: {len(missing)} of {len(shards)} shards listed in {cfg.shard_dir}/index.json "
                     f"are missing (e.g. {missing[0]})")
    shapes = index.get("shapes", {})
    if unet_config and shapes.get("latent") and shapes["latent"][0] != unet_config.get("in_channels"):
        found.append(f"data.shards: latents have {shapes['latent'][0]} channels, the UNet takes "
                     f"{unet_config.get('in_channels')} (shards encoded for another model?)")
    if unet_config and shapes.get("prompt_embeds") and shapes["prompt_embeds"][-1] != unet_config.get("cross_attention_dim"):
        found.append(f"data.shards: prompt embeddings are {shapes['prompt_embeds'][-1]}-dimensional, the UNet "
                     f"attends to {unet_config.get('cross_attention_dim')} (shards encoded for another model?)")


def _check_deepspeed(cfg: Config, world_size: int, found: list[str]) -> None:
    for key, path in (("deepspeed", cfg.deepspeed), ("teacher.deepspeed", cfg.teacher.deepspeed)):
        if not path:
            continue
        if not Path(path).is_file():
            found.append(f"{key}: DeepSpeed config '{path}' does not exist")
            continue
        try:
            ds_config_from_file(path)
        except ConfigError as err:
            found.append(f"{key}: {err}")
    for key, job in (("teacher", cfg.teacher), *((f"stages[{i}]", stage) for i, stage in enumerate(cfg.stages))):
        try:
            job.accumulation(world_size, key)
        except ConfigError as err:
            found.append(str(err))


def _check_writable(out_dir: Path, found: list[str]) -> None:
    """The output folder, or the nearest folder above it that exists, must be writable."""
    folder = Path(out_dir).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        found.append(f"run.out_dir: cannot write '{out_dir}' ({folder} is not a writable folder)")
