"""What rank 0 does alone while the other ranks wait, timed on the node's CPU with ONE thread, against the
trainer's timeouts.

    python bench/rank0.py --preset tiny --json /tmp/rank0.json            # small models, seconds (the test)
    python bench/rank0.py --preset sdxl --out /scratch/rank0 --json r.json  # SDXL sizes: ~21 GB disk, ~25 GB RAM

Measured, in this order (each with torch.set_num_threads(1); building the random models is set-up, not timed):

    vae_decode_gpu      (with a GPU) the sample grid's decode where the trainer runs it: 4 latents (SDXL:
                        4x128x128) through an SDXL-architecture AutoencoderKL (random init, SDXL's VAE config
                        written inline), fp32, with slicing, as trainer.pipeline.load_codec / GridMaker do;
                        the second call (the first, cold one is recorded too)
    unet_load           trainer.method.models.load_unet of an SDXL-architecture UNet saved as a diffusers folder (fp32,
                        evicted from the page cache), and a first read of every weight (load_unet maps the
                        files lazily; the trainer reads them all next)
    unet_export         trainer.export.export_unet of those fp32 weights: the diffusers folder + the single
                        file, the base folder's VAE linked (what every phase's export does on rank 0)
    zero_save           a one-rank ZeRO-2 checkpoint of the UNet (CheckpointManager.save, after one optimizer
                        step so Adam's moments are in it): every rank works here
    zero_consolidate    trainer.runtime.checkpoint.fp32_weights of that checkpoint (rank 0, before a phase's export)
    vae_decode_cpu      the same grid's decode on the CPU; --cpu-decode-images N decodes N of the 4 and scales
                        the time to the grid (SDXL: ~10 TFLOP per 1024 px image, over a minute on one
                        core). Last, so that a time limit cuts it rather than the others

Which timeout each one runs under (trainer/runtime/collectives.py): rank 0's solo work between jobs (consolidating,
exporting, the end-of-job grid) is waited for in the rank-0 wait group, run.main_work_timeout_s (default
14400 s); a grid drawn in the middle of a job (log.sample_every_samples) is waited for by the other ranks in
the next step's collective, and a checkpoint write is a collective: run.collective_timeout_s (default 1800 s).
Each time is printed against both.

The ZeRO measurements need a DeepSpeed engine over all the UNet's parameters (SDXL: 2.6 B, ~40 GB of
device memory and ~31 GB of checkpoint): on by default for the tiny preset, with --zero only at SDXL size.
The scratch folder (--out) is removed at the end unless --keep. The JSON (--json) is rewritten after every
measurement, so a run stopped by a time limit still leaves what it measured.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/rank0.py` from a clone, and `import bench.rank0` in tests
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import PRESETS  # noqa: E402
from trainer.config import RunConfig  # noqa: E402

GIB = 2 ** 30

# stabilityai/stable-diffusion-xl-base-1.0, vae/config.json (83.7 M parameters): the architecture only.
SDXL_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,
)
# The same architecture, narrow and shallow: a 128 px image from a 4x16x16 latent.
TINY_VAE = {**SDXL_VAE, "block_out_channels": [32, 32, 64, 64], "layers_per_block": 1, "sample_size": 128}

VAES = {"tiny": TINY_VAE, "sdxl": SDXL_VAE}
GRID_IMAGES = 4  # configs/sdxl.yaml's log.grid_prompts

# which timeout the other ranks wait under while rank 0 does this (see the module docstring)
BINDING = {
    "vae_decode_cpu": "collective_timeout_s",  # a mid-job grid: the other ranks wait in the next step's collective
    "vae_decode_gpu": "collective_timeout_s",
    "unet_load": "main_work_timeout_s",  # the LoRA merge re-reads the teacher inside the export
    "unet_export": "main_work_timeout_s",
    "zero_save": "collective_timeout_s",  # every rank writes its partition
    "zero_consolidate": "main_work_timeout_s",
}


def latent_shape(vae_config: dict) -> tuple[int, int, int]:
    down = 2 ** (len(vae_config["block_out_channels"]) - 1)
    side = vae_config["sample_size"] // down
    return vae_config["latent_channels"], side, side


def fast_random_init(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """The module's storage, filled with N(0, 0.02) from one seeded generator: what a load or an export does
    with the weights does not depend on their values, and this set-up should cost little next to what is timed
    (diffusers' own per-layer initialisation of SDXL's UNet is slow on one core). Built on the meta device."""
    module = module.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            if tensor.is_floating_point():
                tensor.normal_(0.0, 0.02, generator=gen)
            else:
                tensor.zero_()
    return module


def build_unet(preset: str):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**PRESETS[preset].unet)
    return fast_random_init(unet)


def build_vae(preset: str):
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(**VAES[preset])
    return fast_random_init(vae).eval()


def evict_from_page_cache(paths) -> None:
    """Drop these files' pages from the page cache (bench/loader.py's way: no root needed)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Recorder:
    """Collects the measurements and rewrites the JSON after each one."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.started = time.perf_counter()
        self.timeouts = {"main_work_timeout_s": args.main_work_timeout_s,
                         "collective_timeout_s": args.collective_timeout_s}
        self.result = {
            "preset": args.preset, "threads": args.threads,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "cpu": _cpu_name(), "accelerate": _version("accelerate"), "timeouts": self.timeouts, "times": {}, "skipped": {}, "errors": {},
            "scratch": str(args.out), "ok": False, "wall_s": 0.0,
        }

    def add(self, name: str, seconds: float, what: str, **extra) -> dict:
        binding = BINDING[name]
        row = {"seconds": seconds, "what": what, "binding_timeout": binding,
               "of_binding_timeout": seconds / self.timeouts[binding],
               "of_main_work_timeout": seconds / self.timeouts["main_work_timeout_s"],
               "of_collective_timeout": seconds / self.timeouts["collective_timeout_s"], **extra}
        self.result["times"][name] = row
        print(f"  {name:<17} {seconds:9.2f} s   {row['of_main_work_timeout']:7.2%} of main_work_timeout_s "
              f"({self.timeouts['main_work_timeout_s']:.0f} s), {row['of_collective_timeout']:7.2%} of "
              f"collective_timeout_s ({self.timeouts['collective_timeout_s']:.0f} s)   [{what}]", flush=True)
        self.write()
        return row

    def skip(self, name: str, why: str) -> None:
        self.result["skipped"][name] = why
        print(f"  {name:<17} skipped: {why}", flush=True)
        self.write()

    def error(self, name: str, err: BaseException) -> None:
        self.result["errors"][name] = f"{type(err).__name__}: {err}"
        print(f"  {name:<17} FAILED: {type(err).__name__}: {err}", flush=True)
        self.write()

    def write(self, done: bool = False) -> None:
        self.result["wall_s"] = time.perf_counter() - self.started
        self.result["done"] = done
        self.result["ok"] = done and not self.result["errors"]
        if self.args.json:
            path = Path(self.args.json)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(self.result, indent=1))
            os.replace(tmp, path)


def _version(package: str) -> Optional[str]:
    """diffusers loads lazily (safetensors mapped into memory) only with accelerate installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def timed(fn: Callable[[], object], threads: int) -> tuple[float, object]:
    """fn() with torch limited to `threads` intra-op threads, synchronised on a GPU around it."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        return time.perf_counter() - start, out
    finally:
        torch.set_num_threads(before)


# -- the measurements ------------------------------------------------------------------------------


class Grid:
    """The sample grid's latents and the VAE that decodes them (GridMaker's codec: VaeCodec with slicing); the
    VAE is also saved into the base folder, where the export links it as it links SDXL's."""

    def __init__(self, preset: str, scratch: Path):
        from trainer.data.encoders import VaeCodec

        self.vae = build_vae(preset)
        self.vae.save_pretrained(scratch / "base" / "vae", safe_serialization=True)
        self.codec = VaeCodec(self.vae)
        self.codec.enable_slicing()
        self.latents = torch.randn(GRID_IMAGES, *latent_shape(VAES[preset]), generator=torch.Generator().manual_seed(0))
        self.side = VAES[preset]["sample_size"]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor):
        from trainer.method.sampling import to_uint8

        return to_uint8(self.codec.decode(latents.float()))


def measure_decode_gpu(rec: Recorder, grid: Grid) -> None:
    """The grid's decode where the trainer runs it: on the GPU, fp32."""
    try:
        grid.vae.to("cuda")
        torch.cuda.reset_peak_memory_stats()
        latents = grid.latents.cuda()
        cold, _ = timed(lambda: grid.decode(latents), rec.args.threads)
        warm, _ = timed(lambda: grid.decode(latents), rec.args.threads)
        peak = torch.cuda.max_memory_allocated() / GIB
        rec.add("vae_decode_gpu", warm, f"{GRID_IMAGES} latents -> {grid.side} px, fp32 on {torch.cuda.get_device_name()}, "
                f"slicing; first call {cold:.2f} s, peak {peak:.1f} GiB", first_call_s=cold, images=GRID_IMAGES,
                peak_gib=peak)
    finally:
        grid.vae.to("cpu")
        torch.cuda.empty_cache()


def measure_decode_cpu(rec: Recorder, grid: Grid) -> None:
    """The grid's decode on one CPU thread (--cpu-decode-images of the 4, scaled to the grid)."""
    n = max(1, min(GRID_IMAGES, rec.args.cpu_decode_images))
    seconds, _ = timed(lambda: grid.decode(grid.latents[:n]), rec.args.threads)
    note = "" if n == GRID_IMAGES else f"; measured on {n} image(s), scaled to {GRID_IMAGES}"
    rec.add("vae_decode_cpu", seconds * GRID_IMAGES / n,
            f"{GRID_IMAGES} latents {'x'.join(map(str, grid.latents.shape[1:]))} -> {grid.side} px, fp32, "
            f"{rec.args.threads} CPU thread(s), slicing{note}", per_image_s=seconds / n, images_measured=n,
            images=GRID_IMAGES)


def measure_unet(rec: Recorder, preset: str, scratch: Path):
    """Save a random UNet as a diffusers folder (set-up), then time load_unet and export_unet on it."""
    from trainer.config import ScheduleConfig
    from trainer.export import export_unet
    from trainer.method.models import load_unet

    base = scratch / "base"
    start = time.perf_counter()
    unet = build_unet(preset)
    params = sum(p.numel() for p in unet.parameters())
    unet.save_pretrained(base / "unet", safe_serialization=True)
    config = dict(unet.config)
    del unet
    setup_s = time.perf_counter() - start
    size = sum(p.stat().st_size for p in (base / "unet").rglob("*") if p.is_file())
    print(f"  (set-up: {params / 1e6:,.1f} M-parameter UNet built and saved, {size / GIB:.2f} GiB, in {setup_s:.1f} s)",
          flush=True)

    evict_from_page_cache(p for p in (base / "unet").rglob("*") if p.is_file())  # read from storage, as a teacher is

    def load_and_read():
        """load_unet maps the safetensors file(s) lazily: what the trainer does next (to the device, a bf16 copy,
        the LoRA merge) reads every weight, so reading them is part of the load (a copy into memory here)."""
        start = time.perf_counter()
        unet = load_unet(base)
        call = time.perf_counter() - start
        with torch.no_grad():
            for tensor in itertools.chain(unet.parameters(), unet.buffers()):
                tensor.data = tensor.data.clone()
        return unet, call

    seconds, (unet, call) = timed(load_and_read, rec.args.threads)
    rec.add("unet_load", seconds, f"load_unet of a {params / 1e6:,.1f} M-parameter fp32 diffusers folder "
            f"({size / GIB:.2f} GiB, not in the page cache) and a first read of every weight (the call itself "
            f"{call:.2f} s)", params=params, bytes=size, call_s=call)
    weights = {k: v.detach() for k, v in unet.state_dict().items()}
    shutil.rmtree(base / "unet")  # the export needs only the base folder's other parts: halves the disk peak

    out = scratch / "export"
    seconds, _ = timed(lambda: export_unet(weights, config, out, base_dir=base, schedule=ScheduleConfig(),
                                           prediction_type="epsilon", steps=4, stage="bench"), rec.args.threads)
    written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and not p.is_symlink())
    rec.add("unet_export", seconds, f"export_unet: diffusers folder + single file ({written / GIB:.2f} GiB written), "
            f"VAE linked", bytes=written)
    del weights
    shutil.rmtree(out, ignore_errors=True)
    return unet


def measure_zero(rec: Recorder, preset: str, scratch: Path, unet) -> None:
    """A one-rank ZeRO-2 engine over the whole UNet, one optimizer step (zero gradients: Adam's moments exist,
    the weights do not move), the trainer's checkpoint write, then fp32_weights."""
    from trainer.runtime.checkpoint import CheckpointManager, fp32_weights
    from trainer.config import OptimConfig
    from trainer.runtime.engines import build_ds_config, device, init_distributed, make_engine

    info = init_distributed(rec.args.collective_timeout_s, rec.args.main_work_timeout_s)
    ds_json = ROOT / ("ds_configs/zero2_gpu.json" if torch.cuda.is_available() else "ds_configs/zero2_cpu.json")
    engine = make_engine(unet.to(device()), build_ds_config(str(ds_json), 1, 1, info.world_size,
                                                            OptimConfig(lr=1e-6, betas=[0.0, 0.99]), "bench"))
    try:
        params = [p for p in engine.module.parameters() if p.requires_grad]
        engine.backward(sum(p.sum() for p in params) * 0.0)
        engine.step()
        ckpt = CheckpointManager(scratch / "ckpt", keep_last=1)
        state = {"job": "bench", "step": 1, "samples_seen": 1, "done": True}
        seconds, final = timed(lambda: ckpt.save({"student": engine}, state), rec.args.threads)
        size = sum(p.stat().st_size for p in Path(final).rglob("*") if p.is_file())
        rec.add("zero_save", seconds, f"CheckpointManager.save of a one-rank ZeRO-2 engine ({size / GIB:.2f} GiB)", bytes=size)
    finally:
        engine.destroy()
    del engine
    seconds, weights = timed(lambda: fp32_weights(final, "student"), rec.args.threads)
    rec.add("zero_consolidate", seconds, f"fp32_weights of that checkpoint ({len(weights)} tensors)", tensors=len(weights))


def run(args: argparse.Namespace) -> dict:
    rec = Recorder(args)
    torch.set_num_threads(args.setup_threads)
    zero = args.zero if args.zero is not None else args.preset == "tiny"
    print(f"# rank 0's solo work, {args.preset} preset, {args.threads} thread(s) on {rec.result['cpu']}"
          f"{' + ' + rec.result['device'] if torch.cuda.is_available() else ''}; scratch {args.out}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="rank0-", dir=args.out))
    unet = grid = None

    def attempt(name: str, fn: Callable[[], object]):
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - reported; the other measurements still run
            rec.error(name, err)
            return None

    try:
        # Most telling first: a time limit (the GPU check's budget) cuts the slow CPU decode, not the rest.
        if "decode" not in args.skip:
            grid = attempt("vae_decode", lambda: Grid(args.preset, scratch))
        if grid is not None and torch.cuda.is_available():
            attempt("vae_decode_gpu", lambda: measure_decode_gpu(rec, grid))
        if "unet" in args.skip:
            rec.skip("unet_export", "--skip unet")
        else:
            unet = attempt("unet_export", lambda: measure_unet(rec, args.preset, scratch))
        if not zero:
            rec.skip("zero_consolidate", "needs a DeepSpeed ZeRO-2 engine over all 2.6 B parameters (~40 GB of device "
                     "memory, ~31 GB of checkpoint, minutes): not within the GPU check's budget; --zero runs it")
        elif unet is None:
            rec.skip("zero_consolidate", "no UNet (its measurement was skipped or failed)")
        else:
            attempt("zero_consolidate", lambda: measure_zero(rec, args.preset, scratch, unet))
        unet = None
        if "decode" in args.skip:
            rec.skip("vae_decode_cpu", "--skip decode")
        elif grid is not None:
            attempt("vae_decode_cpu", lambda: measure_decode_cpu(rec, grid))
    finally:
        if args.keep:
            print(f"  (kept {scratch})")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
            if args.created_out and not any(args.out.iterdir()):
                args.out.rmdir()
    rec.write(done=True)
    print(f"({rec.result['wall_s']:.1f} s)", flush=True)
    return rec.result


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    defaults = RunConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=("tiny", "sdxl"), default="tiny")
    p.add_argument("--out", type=Path, default=None,
                   help="scratch folder (SDXL: ~21 GB free disk); removed at the end (default: the system's temp folder)")
    p.add_argument("--json", type=Path, default=None, help="write the results here (rewritten after every measurement)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads for the timed work (default 1)")
    p.add_argument("--setup-threads", type=int, default=min(4, os.cpu_count() or 1),
                   help="threads for building and saving the random models (not timed)")
    p.add_argument("--cpu-decode-images", type=int, default=GRID_IMAGES,
                   help=f"decode this many of the grid's {GRID_IMAGES} latents on the CPU and scale to the grid "
                        f"(SDXL: ~1 min per image on one thread)")
    p.add_argument("--zero", dest="zero", action="store_true", default=None,
                   help="also time a ZeRO-2 checkpoint write and its consolidation (default: tiny only)")
    p.add_argument("--no-zero", dest="zero", action="store_false")
    p.add_argument("--skip", action="append", default=[], choices=("decode", "unet"), help="leave a measurement out")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument("--main-work-timeout-s", type=float, default=defaults.main_work_timeout_s)
    p.add_argument("--collective-timeout-s", type=float, default=defaults.collective_timeout_s)
    args = p.parse_args(argv)
    if args.threads < 1 or args.setup_threads < 1:
        p.error("--threads and --setup-threads must be >= 1")
    args.created_out = args.out is None or not args.out.exists()
    if args.out is None:
        args.out = Path(tempfile.gettempdir()) / "rank0_bench"
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    # `timeout` (the GPU check's budget) sends SIGTERM: unwind, so the scratch folder is removed
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    result = run(args)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
