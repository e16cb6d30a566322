"""Exports: a trained UNet as a diffusers model folder that loads without this project.

    <export>/unet/                 UNet2DConditionModel (config.json + diffusion_pytorch_model.safetensors)
    <export>/unet.safetensors      the same UNet weights as one file (diffusers keys, never sharded), the
                                   form SDXL-Lightning ships: UNet2DConditionModel.from_config + load_state_dict
    <export>/scheduler/            EulerDiscreteScheduler, trailing spacing, the model's prediction type
    <export>/export.json           what it is: steps, prediction type, guidance, stage, base model
    <export>/README.md             a short model card
    + the base model's other parts (text encoders, tokenizers, VAE or the toy's latent codec): copied
      when small (the toy), linked when large (SDXL), so the folder is a complete model either way;
      `portable` (key export.portable, trainer.run --portable) copies them all: a folder that can be
      moved to another machine. export.json lists the linked parts and the base as the recipe gave it.

An export is written under a temporary name and renamed when complete: `is_complete` is true only for
a finished one, which is what lets a re-run skip stages that are done.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
from diffusers import UNet2DConditionModel

from trainer.config import ScheduleConfig
from trainer.method.sampling import make_scheduler

MANIFEST = "export.json"
SINGLE_FILE_UNET = "unet.safetensors"
_COMPONENTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae", "latent_codec.json", "model_index.json")
_COPY_LIMIT_BYTES = 64 << 20  # copy parts below this size, link bigger ones


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _bring_component(src: Path, dst: Path, portable: bool = False) -> bool:
    """Copies a small part (any part when portable), links a large one; True if it linked."""
    if portable or _size(src) <= _COPY_LIMIT_BYTES:
        shutil.copytree(src, dst, symlinks=False) if src.is_dir() else shutil.copy2(src, dst)
        return False
    os.symlink(src.resolve(), dst)
    return True


def export_unet(weights: dict[str, torch.Tensor], unet_config: dict, out_dir: Path, *, base_dir: Path,
                schedule: ScheduleConfig, prediction_type: str, steps: int, guidance: float = 1.0,
                stage: str = "", notes: Optional[dict] = None,
                extra: Optional[Callable[[Path], None]] = None, portable: bool = False) -> Path:
    """Writes the export under a temporary name; `extra(tmp_dir)` adds files before it is published."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    # _name_or_path is the folder the student was read from: a path of the machine that trained it
    unet_config = {k: v for k, v in unet_config.items() if k != "_name_or_path"}
    with torch.device("meta"):  # no random initialisation of weights that are overwritten next
        unet = UNet2DConditionModel.from_config(unet_config)
    missing, unexpected = unet.load_state_dict(weights, strict=False, assign=True)
    if missing or unexpected:
        raise RuntimeError(f"export {out_dir}: weights do not match the UNet config "
                           f"(missing {missing[:3]}..., unexpected {unexpected[:3]}...)")
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(tmp / SINGLE_FILE_UNET),
              metadata={"format": "pt"})
    make_scheduler(schedule, prediction_type).save_pretrained(tmp / "scheduler")
    linked = [name for name in _COMPONENTS
              if (base_dir / name).exists() and _bring_component(base_dir / name, tmp / name, portable)]

    manifest = {
        "format": "sdxl-lightning-export/1",
        "stage": stage,
        "steps": steps,
        "prediction_type": prediction_type,
        "timestep_spacing": "trailing",
        "guidance": guidance,
        # the base model as the recipe named it, where the linked parts live; "." when the export holds
        # copies of everything it needs (then the folder can be copied anywhere)
        "base": str(base_dir) if linked else ".",
        "linked": linked,
        **(notes or {}),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if extra is not None:
        extra(tmp)
    write_model_card(tmp)

    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def is_complete(export_dir: Path) -> bool:
    export_dir = Path(export_dir)
    return (export_dir / MANIFEST).is_file() and (export_dir / "unet" / "config.json").is_file()


def read_manifest(export_dir: Path) -> dict:
    return json.loads((Path(export_dir) / MANIFEST).read_text())


def prediction_type_of(model_dir: Path, fallback: str) -> str:
    """An export says what it predicts; a base model's scheduler config does; else `fallback`."""
    model_dir = Path(model_dir)
    if (model_dir / MANIFEST).is_file():
        return read_manifest(model_dir)["prediction_type"]
    sched = model_dir / "scheduler" / "scheduler_config.json"
    if sched.is_file():
        return json.loads(sched.read_text()).get("prediction_type", fallback)
    return fallback


def write_model_card(folder: Path) -> Path:
    """README.md from the folder's export.json and files (rewritten whenever the manifest changes)."""
    folder = Path(folder)
    card = folder / "README.md"
    card.write_text(_model_card(read_manifest(folder), has_lora=(folder / "lora").is_dir(),
                                is_pipeline=(folder / "model_index.json").is_file()))
    return card


def _lora_section(m: dict) -> str:
    base = m.get("lora_base")
    if m.get("lora_relative_to", "base") == "base":
        applies = (f"it applies to the base model `{base}` (and to finetunes of it)" if base
                   else "it applies to the base model")
    else:
        applies = f"it applies to this stage's teacher `{m.get('teacher', '')}` only, not to the base model"
    kohya = [f for f in m.get("single_files", []) if f.endswith("_kohya.safetensors")]
    kohya_line = (f"\nThe same LoRA in kohya's key layout, for ComfyUI's LoraLoader and A1111: `{kohya[0]}`.\n"
                  if kohya else "")
    return f"""
## LoRA

`lora/pytorch_lora_weights.safetensors` (diffusers format); {applies}. `unet/` here is that base with the LoRA
merged in.

```python
pipe = StableDiffusionXLPipeline.from_pretrained("<base model>")  # StableDiffusionPipeline for SD 1.5
pipe.load_lora_weights("<this folder>/lora")
pipe.scheduler = EulerDiscreteScheduler.from_pretrained("<this folder>/scheduler")
```

On a bare UNet: `unet.load_lora_adapter("<this folder>/lora", weight_name="pytorch_lora_weights.safetensors",
prefix="unet")` (name the .safetensors file: without it diffusers ignores the file's alpha).
{kohya_line}"""


def _model_card(m: dict, has_lora: bool = False, is_pipeline: bool = False) -> str:
    guided = m['guidance'] != 1.0
    lora = _lora_section(m) if has_lora else ""
    checkpoint = [f for f in m.get("single_files", []) if not f.endswith("_kohya.safetensors")]
    checkpoint_note = (f"\nSingle-file checkpoint in the original layout (UNet, VAE, text encoders), for ComfyUI's and "
                       f"A1111's checkpoint loaders and `from_single_file`: `{checkpoint[0]}`.\n" if checkpoint else "")
    pipe = f"""pipe = StableDiffusionXLPipeline.from_pretrained("<this folder>")
image = pipe(prompt, num_inference_steps={m['steps']}, guidance_scale={m['guidance'] if guided else 0}).images[0]
""" if is_pipeline else ""
    x0 = """
This UNet predicts **x0** (the clean latent) directly: `prediction_type="sample"`. Schedulers built from
`scheduler/` know it; one built by hand must be given `prediction_type="sample"`, or the output is noise.
In ComfyUI, put a `ModelSamplingDiscrete` node with sampling `x0` between the loader and the sampler.
""" if m['prediction_type'] == "sample" else ""
    comfy = (f"ComfyUI / A1111: sampler Euler, scheduler `sgm_uniform` (ComfyUI) or trailing spacing, "
             f"{m['steps']} steps, CFG {m['guidance'] if guided else 1}.")
    return f"""# {m['stage'] or 'model'}: {m['steps']}-step model

Made by the progressive adversarial distillation trainer (SDXL-Lightning method).

- Sampling steps: **{m['steps']}**
- Scheduler: `EulerDiscreteScheduler` with `timestep_spacing="trailing"`, `prediction_type="{m['prediction_type']}"`
  (both already in `scheduler/scheduler_config.json`)
- Guidance: {m['guidance']} ({'classifier-free guidance scale' if guided else 'no classifier-free guidance: pass guidance_scale=0 (or 1) to a diffusers pipeline'})
- {comfy}
{x0}
```python
from diffusers import UNet2DConditionModel, EulerDiscreteScheduler{', StableDiffusionXLPipeline' if is_pipeline else ''}
unet = UNet2DConditionModel.from_pretrained("<this folder>/unet")
scheduler = EulerDiscreteScheduler.from_pretrained("<this folder>/scheduler")
scheduler.set_timesteps({m['steps']})
{pipe}```

Single-file UNet (`{SINGLE_FILE_UNET}`, diffusers keys):

```python
from safetensors.torch import load_file
unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config("<this folder>/unet"))
unet.load_state_dict(load_file("<this folder>/{SINGLE_FILE_UNET}"))
```
{checkpoint_note}{lora}
"""
