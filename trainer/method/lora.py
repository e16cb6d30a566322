"""LoRA on the UNet: the first half of each distillation stage (docs/method.md, "LoRA, merge, full UNet").

Each stage trains a LoRA, merges it, and trains the full UNet further. The LoRA follows LCM-LoRA:
every Conv2d and Linear of the UNet except the input/output convs and the shared conditioning
embeddings (the timestep MLP and SDXL's added text/time MLP), which every block reads.

Saved LoRAs are single `.safetensors` files in the layout diffusers reads with
`StableDiffusionXLPipeline.load_lora_weights` (and `StableDiffusionPipeline`'s, which is the same):
peft keys under a `unet.` prefix, plus the adapter's LoraConfig as diffusers' `lora_adapter_metadata`
header so that a loader rebuilds the right rank *and* alpha (without it diffusers assumes alpha ==
rank, i.e. a different scale whenever alpha != rank).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Union

import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from trainer.files import canonical_safetensors

ADAPTER = "default"  # peft's name for a model's first adapter; the only one this trainer uses
UNET_PREFIX = "unet"  # diffusers' prefix for UNet keys in a pipeline LoRA file
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the name load_lora_weights(folder) looks for

# Modules every block reads: a LoRA there would shift all blocks at once (LCM-LoRA leaves them out).
# class_embedding is not in SDXL; it is the same kind of shared embedding MLP in class-conditioned UNets.
_EXCLUDED_NAMES = ("conv_in", "conv_out")
_EXCLUDED_PREFIXES = ("time_embedding.", "add_embedding.", "class_embedding.")
_LORA_PARAM = re.compile(r"\.lora_(A|B)\.")


def _has_adapter(unet: nn.Module) -> bool:
    return any(isinstance(m, BaseTunerLayer) for m in unet.modules())


def lora_target_modules(unet: nn.Module) -> list[str]:
    """Full names of the modules that get a LoRA, in module order (a plain UNet, without LoRA)."""
    if _has_adapter(unet):
        raise ValueError("the UNet already has LoRA layers: pass the plain UNet")
    return [
        name
        for name, module in unet.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear))
        and name not in _EXCLUDED_NAMES
        and not name.startswith(_EXCLUDED_PREFIXES)
    ]


def _freeze_base(unet: nn.Module) -> None:
    """Only LoRA factors train: the optimizer (and DeepSpeed) must be handed exactly these."""
    for name, param in unet.named_parameters():
        param.requires_grad_(bool(_LORA_PARAM.search(name)))


def add_lora(unet: UNet2DConditionModel, rank: int = 64, alpha: Optional[float] = None,
             init_seed: int = 0) -> UNet2DConditionModel:
    """Adds a LoRA (scale alpha / rank; alpha defaults to rank) and freezes the base weights.

    lora_B starts at zero, so the LoRA'd UNet starts out equal to the base. lora_A is drawn from
    init_seed alone, so every rank of a distributed run (and a rerun) starts from the same adapter;
    the caller's RNG stream is left untouched. Returns the same (modified) unet.

    A conv's LoRA is lora_A with the conv's own kernel, stride and padding, then a 1x1 lora_B: the
    pair is itself a conv of the same shape as the base, which is what lets merge_lora fold it in.
    """
    targets = lora_target_modules(unet)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        target_modules=targets,
        init_lora_weights=True,  # kaiming-uniform A, zero B
    )
    # peft creates and initialises the factors on the CPU, then moves them to each layer's device:
    # the CPU generator alone decides them, whatever device the UNet is on.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        unet.add_adapter(config, adapter_name=ADAPTER)
    # peft matches list entries as name suffixes (and stores a long list as the shortest suffixes
    # that pick the same modules of this UNet); make sure exactly the targets got a LoRA.
    wrapped = [name for name, m in unet.named_modules() if isinstance(m, BaseTunerLayer)]
    if sorted(wrapped) != sorted(targets):
        raise RuntimeError(f"LoRA landed on {len(wrapped)} modules, expected the {len(targets)} targets")
    _freeze_base(unet)
    return unet


def lora_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights, peft keys without the adapter name (`<module>.lora_A.weight`)."""
    return get_peft_model_state_dict(unet, adapter_name=ADAPTER)


def _lora_file(path: Path) -> Path:
    """`x.safetensors` is the file itself; anything else is a folder holding LORA_WEIGHT_NAME."""
    path = Path(path)
    return path if path.suffix == ".safetensors" else path / LORA_WEIGHT_NAME


def save_lora(unet: nn.Module, path: Union[str, Path]) -> Path:
    """Writes the LoRA as a diffusers pipeline LoRA file; returns the file's path.

    `path` ending in `.safetensors` is the file; otherwise it is a folder and the file is
    `<path>/pytorch_lora_weights.safetensors`. Either path works with `pipe.load_lora_weights(path)`.

    Keys are saved in peft form (`unet.<module>.lora_A.weight`), not passed through
    `convert_state_dict_to_diffusers`: that renames only attention projections (to `lora.down`/
    `lora.up`), and diffusers looks at the first key only to decide whether to convert back: when
    that key is not an attention one, the attention LoRAs are skipped with just a warning (checked
    with diffusers 0.42). peft keys load as they are.
    """
    file = _lora_file(path)
    weights = {k: v.detach().contiguous() for k, v in lora_state_dict(unet).items()}
    StableDiffusionXLPipeline.save_lora_weights(
        save_directory=file.parent,
        unet_lora_layers=weights,
        weight_name=file.name,
        unet_lora_adapter_metadata=_stable_metadata(unet.peft_config[ADAPTER].to_dict()),
    )
    return canonical_safetensors(file)


def _stable_metadata(config: dict) -> dict:
    """peft's config holds sets (target_modules), which JSON lists in hash order: the same LoRA would get
    different file bytes in every process. Sorted, the file depends only on the weights and the config."""
    return {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in config.items()}


def _read_lora(source: Union[str, Path, dict]) -> tuple[dict[str, torch.Tensor], Optional[dict]]:
    """(state dict without the `unet.` prefix, LoraConfig kwargs or None) from a file, folder or dict."""
    if isinstance(source, dict):
        weights, metadata = source, None
    else:
        file = _lora_file(Path(source))
        if not file.is_file():
            raise FileNotFoundError(f"no LoRA file at {file}")
        weights, _, metadata = StableDiffusionXLPipeline.lora_state_dict(
            str(file), return_lora_metadata=True, use_safetensors=True)
    prefix = UNET_PREFIX + "."
    # No UNet module is called "unet", so a leading "unet." can only be the pipeline prefix.
    if weights and all(k.startswith(prefix) for k in weights):
        weights = {k.removeprefix(prefix): v for k, v in weights.items()}
    if metadata is not None:
        metadata = {k.removeprefix(prefix): v for k, v in metadata.items() if k.startswith(prefix)} or None
    return weights, metadata


def load_lora_into(unet: UNet2DConditionModel, source: Union[str, Path, dict]) -> UNet2DConditionModel:
    """Loads a saved LoRA (file, folder, or a `lora_state_dict`) into unet, ready to train on.

    - unet has no LoRA yet: a file's metadata gives rank and alpha and the adapter is created from it
      (a bare state dict cannot say alpha, so then call `add_lora` first with the run's rank/alpha).
    - unet already has the adapter (`add_lora` with the run's settings, the resume path): the weights
      are copied in; the keys must match exactly, and a file's rank/alpha must equal the adapter's.
    Either way the base stays frozen and the LoRA trainable. Returns the same unet.
    """
    weights, metadata = _read_lora(source)
    if not _has_adapter(unet):
        if metadata is None:
            raise ValueError("a LoRA without its config (a state dict, or a file without metadata) "
                             "needs add_lora(unet, rank, alpha) first: alpha cannot be inferred")
        unet.load_lora_adapter(weights, prefix=None, adapter_name=ADAPTER, metadata=metadata)
        # diffusers only warns about keys it could not place; a resumed run must not start half-loaded.
        if set(lora_state_dict(unet)) != set(weights):
            raise ValueError("the LoRA file's modules do not match this UNet's")
    else:
        if metadata is not None:
            config = unet.peft_config[ADAPTER]
            if (metadata.get("r"), metadata.get("lora_alpha")) != (config.r, config.lora_alpha):
                raise ValueError(f"LoRA has rank {metadata.get('r')} alpha {metadata.get('lora_alpha')}, "
                                 f"the UNet's adapter rank {config.r} alpha {config.lora_alpha}")
        expected = set(lora_state_dict(unet))
        if set(weights) != expected:
            missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
            raise ValueError(f"LoRA keys do not match the adapter: missing {missing[:5]}, unexpected {unexpected[:5]}")
        set_peft_model_state_dict(unet, weights, adapter_name=ADAPTER)
    _freeze_base(unet)
    return unet


@torch.no_grad()
def init_lora_from_difference(unet: nn.Module, target: nn.Module) -> float:
    """Sets `unet`'s adapter (just added, on the base weights) to the best rank-r approximation (truncated
    SVD) of `target` minus the base in every LoRA'd layer: base + LoRA then starts as close to `target` as
    an adapter of this rank gets. Returns the share of the weight difference's energy (squared norm) it
    holds; what the adapter cannot hold (other layers, biases, the rest of the spectrum) is left out.

    Each layer: delta = U S V^T, truncated to r; lora_A = sqrt(S) V^T, lora_B = U sqrt(S) / scale, so that
    scale * B @ A = delta_r (a conv's delta is [out, in * kh * kw], A its kernel-shaped half, B 1x1)."""
    target_weights = dict(target.named_parameters())
    total = held = 0.0
    for name, module in unet.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        base = module.get_base_layer().weight
        delta = (target_weights[f"{name}.weight"].to(base.device, torch.float32) - base.float())
        matrix = delta.reshape(delta.shape[0], -1)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        a_layer, b_layer = module.lora_A[ADAPTER], module.lora_B[ADAPTER]
        rank, scale = a_layer.weight.shape[0], module.scaling[ADAPTER]
        root = s[:rank].sqrt()
        a_layer.weight.copy_((root[:, None] * vh[:rank]).reshape(a_layer.weight.shape))
        b_layer.weight.copy_((u[:, :rank] * root[None, :] / scale).reshape(b_layer.weight.shape))
        total += float((s ** 2).sum())
        held += float((s[:rank] ** 2).sum())
    return held / total if total else 1.0


def merge_lora(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """Folds the LoRA into the base weights and removes it: a plain UNet with the original keys.

    The merged UNet is what the stage's full-UNet phase trains, so all its parameters are made
    trainable again (as a freshly loaded UNet would be). Returns the same (modified) unet.
    """
    if not _has_adapter(unet):
        raise ValueError("the UNet has no LoRA to merge")
    unet.fuse_lora(lora_scale=1.0)  # W += scale * B @ A in every LoRA'd module
    unet.unload_lora()  # swap each peft wrapper back for its (now merged) base module
    unet.requires_grad_(True)
    return unet


def count_trainable(unet: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(unet.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
