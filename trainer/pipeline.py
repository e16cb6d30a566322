"""The progression, job by job: base model -> shards -> teacher -> stage 1 -> ... -> exports.

Every rank runs this; work that only one process should do (writing the toy base model, encoding
shards, exporting) happens on rank 0 between barriers. Each step is skipped when its output is
already complete, so re-running a finished or interrupted progression only does what is missing.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from trainer.runtime.preemption import preemption_handler, solo
from trainer.config import Config, PhaseConfig, dump_config
from trainer.runtime.engines import DistInfo, device
from trainer.export import is_complete, prediction_type_of
from trainer.method.models import Conditioning, build_toy_unet, load_unet
from trainer.method.phases import PhaseExport, PhaseStart, run_phase
from trainer.method.stages import StageRunner
from trainer.method.sampling import make_grid, make_scheduler, sample_images, save_png
from trainer.runtime.probe import Probe

DEFAULT_GRID_PROMPTS = [
    "a red circle at top left", "a green square at top right", "a blue triangle at bottom left",
    "a yellow cross at bottom right", "a magenta ring at center", "a cyan frame at top left",
    "a blue circle at bottom right", "a red frame at center",
]


# -- inputs -------------------------------------------------------------------------------------


def prepare_base(cfg: Config, info: DistInfo) -> Path:
    """The base model folder: the user's (SDXL, SD 1.5) or the toy's, written once from seeds."""
    from trainer.base_model import convert_single_file, is_single_file

    if is_single_file(cfg.model.base):
        # a single-file finetune: converted once into a diffusers folder that everything after reads

        base = cfg.out_dir / "base"
        solo("converting the single-file base model",
             lambda: convert_single_file(cfg.model.base, cfg.model.base_config, base), log=False)
        return base
    if cfg.model.base != "toy":
        return Path(cfg.model.base)
    if cfg.teacher.init:
        # A finished toy teacher carries the text encoder and codec it was trained with: they are the base.
        return Path(cfg.teacher.init)
    base = cfg.out_dir / "base"

    def write() -> None:
        import shutil

        from trainer.data.encoders import create_toy_encoders

        if base.is_dir():
            return
        tmp = base.with_name(base.name + ".tmp")  # published whole: a kill midway leaves no half a model
        shutil.rmtree(tmp, ignore_errors=True)
        create_toy_encoders(tmp, seed=cfg.run.seed, resolution=cfg.data.shapes.resolution)
        build_toy_unet(cfg.model.unet, seed=cfg.run.seed).save_pretrained(tmp / "unet", safe_serialization=True)
        make_scheduler(cfg.schedule, cfg.model.prediction_type).save_pretrained(tmp / "scheduler")
        os.replace(tmp, base)

    solo("writing the toy base model", write, log=False)
    return base


def prepare_shards(cfg: Config, base: Path, info: DistInfo) -> Path:
    """The training shards: the recipe's folder (data.source: shards, encoded beforehand with
    trainer.data.encode), or the embedded shapes dataset, rendered and encoded here once (data.source: shapes)."""
    shard_dir = cfg.shard_dir
    if cfg.data.source != "shapes" or (shard_dir / "index.json").is_file():
        return shard_dir

    def encode() -> None:
        from trainer.data.encode import encode_to_shards, iter_shapes
        from trainer.data.encoders import load_encoders
        from trainer.data.shapes import ShapesOptions

        shapes = cfg.data.shapes
        options = ShapesOptions(shapes.position_in_caption, shapes.texture, shapes.dots, shapes.objects)
        items = iter_shapes(shapes.count, shapes.seed, shapes.resolution, options)
        encode_to_shards(load_encoders(base), items, shard_dir, resolution=shapes.resolution,
                         samples_per_shard=shapes.samples_per_shard, dtype=cfg.data.dtype, total=shapes.count)

    solo(f"encoding the shapes dataset into {shard_dir}", encode)
    return shard_dir


def load_codec(model_dir: Path, dev: torch.device = torch.device("cpu")):
    """Only the latent codec (no text encoders): what sampling needs to turn latents into pixels. The
    VAE decodes one image at a time (slicing): a 1024 px decode's activations are the peak otherwise."""
    from trainer.data.encoders import LATENT_CODEC_FILE, VaeCodec, load_toy_codec

    if (Path(model_dir) / LATENT_CODEC_FILE).is_file():
        return load_toy_codec(model_dir)[0]
    from diffusers import AutoencoderKL

    codec = VaeCodec(AutoencoderKL.from_pretrained(Path(model_dir) / "vae", local_files_only=True).eval().to(dev))
    codec.enable_slicing()
    return codec


def write_grid_conditioning(cfg: Config, base: Path) -> Path:
    """Encodes the fixed grid prompts once (rank 0, atomically) into a cache beside the run. Collective."""
    cache = cfg.out_dir / "grid_prompts.safetensors"

    def write() -> None:
        if cache.is_file():
            return
        from trainer.data.encoders import load_encoders

        encoders = load_encoders(base)
        prompts = cfg.log.grid_prompts or DEFAULT_GRID_PROMPTS
        with torch.no_grad():
            cond = Conditioning.for_captions(encoders, prompts)
        tensors = {"prompt_embeds": cond.prompt_embeds.float().contiguous()}
        if cond.pooled is not None:
            tensors["pooled"] = cond.pooled.float().contiguous()
            tensors["time_ids"] = cond.time_ids.contiguous()
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, cache)  # a reader never sees half a file

    solo("encoding the grid prompts", write, log=False)
    return cache


def grid_conditioning(cfg: Config, base: Path) -> Conditioning:
    """The grid prompts' text conditioning (written by write_grid_conditioning), on the CPU."""
    t = load_file(str(cfg.out_dir / "grid_prompts.safetensors"), device="cpu")
    return Conditioning(t["prompt_embeds"], t.get("pooled"), t.get("time_ids"))


def latent_shape(cfg: Config) -> list[int]:
    return json.loads((cfg.shard_dir / "index.json").read_text())["shapes"]["latent"]


class GridMaker:
    """Fixed prompts x fixed noise -> a uint8 image grid, for any UNet at any step count. Sampling runs
    where the UNet is and in its dtype (the training dtype on the GPU), decoding on this process's device.
    Only rank 0 draws grids: the prompts' conditioning, the codec (SDXL: the VAE) and the noise are loaded
    on first use, so the other ranks never load them."""

    def __init__(self, cfg: Config, base: Path):
        self.cfg, self.base = cfg, base
        write_grid_conditioning(cfg, base)  # collective: every rank constructs one
        self._cond = self._codec = self._noise = None

    def _load(self) -> None:
        if self._cond is None:
            self._cond = grid_conditioning(self.cfg, self.base)
            self._codec = load_codec(self.base, device())
            gen = torch.Generator().manual_seed(self.cfg.log.grid_seed)
            self._noise = torch.randn([self._cond.prompt_embeds.shape[0], *latent_shape(self.cfg)], generator=gen)

    @property
    def columns(self) -> int:
        return len(self.cfg.log.grid_prompts or DEFAULT_GRID_PROMPTS)

    @torch.no_grad()
    def __call__(self, unet: torch.nn.Module, steps: int, prediction_type: str, guidance: float = 1.0) -> np.ndarray:
        return make_grid(self.images(unet, steps, prediction_type, guidance), ncols=self.columns, scale=2)

    @torch.no_grad()
    def images(self, unet: torch.nn.Module, steps: int, prediction_type: str, guidance: float = 1.0) -> np.ndarray:
        self._load()
        return sample_images(unet, make_scheduler(self.cfg.schedule, prediction_type), self._cond, self._noise,
                             self._codec, steps, guidance)

    def bind(self, steps: int, prediction_type: str, guidance: float = 1.0) -> Callable[[torch.nn.Module], np.ndarray]:
        return lambda unet: self(unet, steps, prediction_type, guidance)


# -- jobs ---------------------------------------------------------------------------------------


def run_teacher(cfg: Config, info: DistInfo, base: Path, grids: GridMaker) -> Path:
    """The toy teacher: ordinary diffusion training of the base UNet (a phase of kind denoise), its EMA
    weights exported."""
    if cfg.teacher.init:
        return Path(cfg.teacher.init)
    export_dir = cfg.out_dir / "exports" / "teacher"
    if cfg.teacher.samples == 0:
        return base
    if is_complete(export_dir):
        return export_dir
    preemption_handler().check("before the teacher job")
    tc, pred = cfg.teacher, cfg.model.prediction_type
    start = PhaseStart(cfg, info, "teacher", "teacher", PhaseConfig("denoise", "full", tc.samples, optim=tc.optim),
                       student_dir=base, student_pred=pred, micro_batch=tc.micro_batch,
                       accumulation=tc.accumulation(info.world_size), deepspeed=tc.deepspeed or cfg.deepspeed,
                       gradient_checkpointing=tc.gradient_checkpointing, ema_decay=tc.ema_decay)
    export = PhaseExport(steps=tc.sample_steps, prediction_type=pred, base_dir=base, guidance=tc.guidance)
    run_phase(start, cfg.out_dir / "jobs" / "teacher", export_dir, export,
              make_grid=grids.bind(tc.sample_steps, pred, tc.guidance))
    return export_dir


def wants_comparison_grid(cfg: Config) -> bool:
    return cfg.log.comparison_grid == "always" or (cfg.log.comparison_grid == "auto" and cfg.model.base == "toy")


def comparison_grid(cfg: Config, grids: GridMaker, rows: list[tuple[str, Path, int, float]]) -> Path:
    """Side by side: one row per model (same prompts, same noise), each UNet loaded in turn onto this
    process's device (bf16 on a GPU)."""
    dev = device()
    images = []
    for _, model_dir, steps, guidance in rows:
        unet = load_unet(model_dir).eval().to(dev)
        if dev.type == "cuda":
            unet = unet.to(torch.bfloat16)
        images.extend(grids.images(unet, steps, prediction_type_of(model_dir, cfg.model.prediction_type), guidance))
        del unet
    grid = make_grid(images, ncols=grids.columns, scale=3)
    path = save_png(grid, cfg.out_dir / "grids" / "progression.png")
    (path.with_suffix(".txt")).write_text("rows, top to bottom:\n" + "\n".join(
        f"{name}: {steps} steps, guidance {g}" for name, _, steps, g in rows) + "\n")
    return path


def job_names(cfg: Config) -> list[str]:
    """The names `--jobs` accepts: the teacher and every stage."""
    return ["teacher", *(stage.name for stage in cfg.stages)]


def run_progression(cfg: Config, info: DistInfo, only: Optional[list[str]] = None) -> dict:
    """Everything the recipe asks for, in order; returns the paths a user wants to look at."""
    unknown = [name for name in only or [] if name not in job_names(cfg)]
    if unknown:
        raise ValueError(f"unknown job {', '.join(repr(n) for n in unknown)}: the recipe's jobs are {', '.join(job_names(cfg))}")
    if info.is_main:
        dump_config(cfg, cfg.out_dir / "config.yaml")
    base = prepare_base(cfg, info)
    prepare_shards(cfg, base, info)
    grids = GridMaker(cfg, base)
    probe = Probe(cfg, base) if cfg.probe.every_samples else None  # used on rank 0 only, loaded on first use
    wanted = lambda name: only is None or name in only

    # Without teacher training (teacher.init, or teacher.samples 0: the base model teaches) run_teacher
    # only names the teacher, so a stage run alone (--jobs/--stage) still finds it.
    trains_teacher = not cfg.teacher.init and cfg.teacher.samples > 0
    teacher_dir = run_teacher(cfg, info, base, grids) if wanted("teacher") or not trains_teacher else (
        cfg.out_dir / "exports" / "teacher")
    rows = [("teacher", teacher_dir, cfg.teacher.sample_steps, cfg.teacher.guidance)]
    exports = {"teacher": teacher_dir}
    # D is re-initialised from "the base model" at every stage: the original teacher here (the toy's
    # trained teacher, or the user's SDXL), not the previous stage's student.
    disc_base = teacher_dir
    previous = teacher_dir
    for i, stage in enumerate(cfg.stages):
        if wanted(stage.name):
            if not is_complete(previous) and previous != base:
                raise FileNotFoundError(f"stage '{stage.name}' needs its teacher at {previous}: run the earlier jobs first")
            previous = StageRunner(cfg, info, i, previous, disc_base, base, grids, probe).run()
        else:
            previous = cfg.out_dir / "exports" / stage.name
        exports[stage.name] = previous
        rows.append((stage.name, previous, stage.student_steps, 1.0))

    # only what exists: a stage neither run now nor before has no export to show
    present = lambda path: is_complete(path) or path in (base, Path(cfg.teacher.init or base))
    result = {"exports": {k: str(v) for k, v in exports.items() if present(v)}, "tensorboard": str(cfg.out_dir / "jobs"),
              "grids": str(cfg.out_dir / "grids")}
    done = [r for r in rows if is_complete(r[1])]
    if done and wants_comparison_grid(cfg):
        result["comparison_grid"] = str(solo(
            "drawing the comparison grid", lambda: comparison_grid(cfg, grids, done)))
    return result
