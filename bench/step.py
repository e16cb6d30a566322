"""One distillation step, split into its parts and timed: where does a step's time go, and how much does
the trainer add on top of the work itself?

    python bench/step.py --preset tiny                       # CPU: the shapes UNet, real DeepSpeed engines
    python bench/step.py --preset tiny --objective mse       # the first stage (teacher jump with CFG)
    python bench/step.py --preset sdxl --mode lora,full      # a GPU: the SDXL UNet at 1024 px, bf16
    python bench/step.py --preset sdxl --meta                # no GPU: SDXL's FLOPs per part, on the meta device

The step is the trainer's own: the micro-step of trainer.method.methods.Adversarial (or MSEDistill, the first
stage), run whole, with a timer on its named sections (`method.timer`: a no-op in training; here each section
synchronises the device around itself, so a section's time is its own):

    data             next batch from a real shard loader (trainer.data.loader) and its copy to the device
    teacher          x_t, then the frozen teacher's n-move jump (CFG as one doubled batch where the stage has it)
    student forward  the student's move from x_t (and, with a multi-timestep D, the re-noise to t*)
    G step           the G loss through D (frozen), the student's backward and optimizer step   (adversarial)
    D step           D on real and fake in one call, D's loss, backward and optimizer step      (adversarial)
    student step     the MSE loss's backward and the student's optimizer step                   (mse)

`whole` is the same step run as the trainer runs it (the loader's next batch, then method.micro_step with the
no-op timer), and `loop` the trainer's own loop (trainer.runtime.loop.train) in steady state, read from its
samples/s log. whole / sum(parts) is the trainer's overhead on the step's work (target <= 1.05); below 1 where
the loader's worker prepares the next batch while the step runs.

On a GPU it also prints the student's forward+backward FLOPs (torch.utils.flop_counter, counted once
without gradient checkpointing' recomputation: model FLOPs), the achieved TFLOP/s and MFU against the
card's dense bf16 peak, and the peak memory of the step.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/step.py` from a clone, and `import bench.step` in tests
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import PRESETS, Preset  # noqa: E402
from trainer.config import OptimConfig, ScheduleConfig  # noqa: E402
from trainer.method.discriminator import d_loss, discriminator_from_unet  # noqa: E402
from trainer.method.methods import NO_TIMING, Adversarial, MSEDistill, StepTimer  # noqa: E402
from trainer.method.models import Conditioning, unet_forward  # noqa: E402
from trainer.method.schedule import NoiseSchedule  # noqa: E402
from trainer.runtime.randomness import SampleRandom  # noqa: E402

# Dense bf16 peak (no sparsity) by device name, for MFU.
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0}

PARTS_ADV = ("data", *Adversarial.sections)
PARTS_MSE = ("data", *MSEDistill.sections)


def is_cuda() -> bool:
    return torch.cuda.is_available()


def sync() -> None:
    if is_cuda():
        torch.cuda.synchronize()


# -- building the step -------------------------------------------------------------------------


def write_shards(preset: Preset, count: int, out_dir: Path) -> Path:
    """`count` random samples of the preset's shapes as real shards (the trainer's writer)."""
    from trainer.data.shards import ShardWriter

    rng = np.random.default_rng(0)
    shapes = preset.sample_shapes()
    with ShardWriter(out_dir, samples_per_shard=max(1, count // 4)) as writer:
        for i in range(count):
            arrays = {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
            arrays["time_ids"] = np.abs(arrays["time_ids"]) * 100
            writer.write(f"s{i:06d}", caption="bench", **arrays)
    return out_dir


def build_unet(preset: Preset, seed: int = 0, device=None):
    """Random weights of the preset's architecture, built where they will run (SDXL's 2.6 B parameters
    initialise in seconds on a GPU, minutes on a CPU)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        return UNet2DConditionModel(**preset.unet)


def ds_config_path(offload: bool) -> str:
    if not is_cuda():
        return str(ROOT / "ds_configs/zero2_cpu.json")
    return str(ROOT / ("ds_configs/zero2_gpu_offload.json" if offload else "ds_configs/zero2_gpu.json"))


class SectionTimes(StepTimer):
    """The method's sections, each timed alone: the device is synchronised on entry and exit."""

    def __init__(self):
        self.times: dict[str, float] = {}

    @contextmanager
    def section(self, name: str):
        sync()
        start = time.perf_counter()
        yield
        sync()
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start


class Step:
    """The networks, engines and method of one stage (random weights of the preset's shape: no folders)."""

    def __init__(self, preset: Preset, mode: str, objective: str, micro_batch: int, offload: bool,
                 student_steps: int, cfg_scale: float, compile_student: bool = False):
        from trainer.runtime.engines import build_ds_config, device, init_distributed, make_engine
        from trainer.method.lora import add_lora
        from trainer.method.models import freeze

        info = init_distributed()
        self.dev = device()
        self.preset, self.mode, self.kind = preset, mode, objective
        self.micro_batch = micro_batch
        self.schedule = NoiseSchedule.from_config(ScheduleConfig())
        self.student_steps, self.teacher_steps = student_steps, student_steps * 2
        self.cfg_scale = cfg_scale if objective == "mse" else 1.0
        prediction = "epsilon"

        base = build_unet(preset, device=self.dev)
        self.teacher = freeze(copy.deepcopy(base)).to(self.dev)  # bf16, no grads, eval
        student = add_lora(copy.deepcopy(base), rank=preset.lora_rank) if mode == "lora" else copy.deepcopy(base)
        student.enable_gradient_checkpointing()
        self.attention = sorted({type(p).__name__ for p in student.attn_processors.values()})
        optim = OptimConfig(lr=1e-6, betas=[0.0, 0.99])
        ds = build_ds_config(ds_config_path(offload), micro_batch, 1, info.world_size, optim, "bench")
        self.student = make_engine(student, ds)
        if compile_student:
            self.student.compile()
        self.trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
        self.disc = None
        if objective == "adv":
            disc = discriminator_from_unet(base, conditional=True)
            disc.enable_gradient_checkpointing()
            self.disc = make_engine(disc, ds)
            self.method = Adversarial(self.student, self.disc, self.teacher, self.schedule, prediction, prediction,
                                      student_steps, self.teacher_steps, conditional=True, t_star=[],
                                      t_star_weights=[], optims={"student": optim, "disc": optim})
        else:
            self.method = MSEDistill(self.student, self.teacher, self.schedule, prediction, prediction, student_steps,
                                     self.teacher_steps, self.cfg_scale, optims={"student": optim})
        del base
        self.prediction = prediction

    @property
    def part_names(self) -> tuple[str, ...]:
        return PARTS_ADV if self.kind == "adv" else PARTS_MSE

    def parts_once(self, batches, rand: SampleRandom) -> dict[str, float]:
        """One step, the method's own micro-step, with its sections timed."""
        from trainer.runtime.loop import _to_device

        timer = SectionTimes()
        with timer.section("data"):
            batch = _to_device(next(batches), self.dev)
            batch.pop("data_stats", None)
            batch.pop("positions", None)
        self.method.timer = timer
        try:
            self.method.micro_step(batch, rand)
        finally:
            self.method.timer = NO_TIMING
        return timer.times

    def d_call_variants(self, batches, rand: SampleRandom, iters: int) -> dict[str, float]:
        """The D step (forward, backward, optimizer step) with real and fake judged in one stacked call
        (the trainer's way) against two separate calls, alternated in one run: seconds (median) each."""
        from trainer.runtime.loop import _to_device

        batch = _to_device(next(batches), self.dev)
        batch.pop("data_stats", None)
        batch.pop("positions", None)
        p = self.method.landings(batch, rand)
        judge = lambda x: self.method._judge(x, p["d_t"], p["cond"], p["x_t"], p["t"])
        variants = {
            "stacked": lambda: d_loss(*self.method.judge_real_and_fake(p)),
            "separate": lambda: d_loss(judge(p["real"]), judge(p["fake"].detach())),
        }
        times: dict[str, list] = {name: [] for name in variants}
        for i in range(iters + 1):
            for name, loss_of in variants.items():
                sync()
                start = time.perf_counter()
                self.disc.backward(loss_of())
                self.disc.step()
                sync()
                if i:  # the first round warms up
                    times[name].append(time.perf_counter() - start)
        return {name: statistics.median(v) for name, v in times.items()}

    def whole_once(self, batches, rand: SampleRandom) -> float:
        """One step as the loop runs it: next batch, then the method's micro-step, nothing in between."""
        from trainer.runtime.loop import _to_device

        sync()
        start = time.perf_counter()
        batch = _to_device(next(batches), self.dev)
        batch.pop("data_stats", None)
        batch.pop("positions", None)
        self.method.micro_step(batch, rand)
        sync()
        return time.perf_counter() - start


# -- FLOPs ---------------------------------------------------------------------------------------


def student_flops(preset: Preset, micro_batch: int, mode: str, device: str) -> dict[str, float]:
    """Model FLOPs of the student's forward and backward at `micro_batch`, and of one teacher forward,
    counted by torch's FLOP counter (no checkpointing recomputation; on the meta device where asked)."""
    from torch.utils.flop_counter import FlopCounterMode

    from trainer.method.lora import add_lora

    unet = build_unet(preset, device=device).to(torch.bfloat16)
    if mode == "lora":
        unet = add_lora(unet, rank=preset.lora_rank)
    c, h, w = preset.latent
    make = lambda *s: torch.randn(*s, device=device, dtype=torch.bfloat16)
    x = make(micro_batch, c, h, w)  # the student's input needs no gradient: weight (or LoRA) gradients only
    cond = Conditioning(make(micro_batch, preset.text_tokens, preset.text_dim), make(micro_batch, preset.pooled_dim),
                        make(micro_batch, preset.time_ids))
    t = torch.full((micro_batch,), 500, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        out = unet_forward(unet, x, t, cond)
        forward = counter.get_total_flops()
        out.float().square().mean().backward()
    total = counter.get_total_flops()
    return {"student_fwd_flops": float(forward), "student_fwd_bwd_flops": float(total)}


def peak_tflops(name: str, override: float) -> float:
    if override:
        return override
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return math.nan


# -- running -------------------------------------------------------------------------------------


def run_preset(preset: Preset, mode: str, objective: str, micro_batch: int, iters: int, warmup: int,
               offload: bool, student_steps: int, cfg_scale: float, workers: int, loop: bool,
               compile_student: bool, peak_override: float) -> dict:
    from trainer.data.loader import make_loader

    with tempfile.TemporaryDirectory() as tmp:
        shards = write_shards(preset, micro_batch * 8, Path(tmp) / "shards")
        step = Step(preset, mode, objective, micro_batch, offload, student_steps, cfg_scale, compile_student)
        loader = make_loader(shards, micro_batch, seed=0, num_workers=workers)
        batches = _forever(loader)
        rand = SampleRandom(0, range(micro_batch))
        if is_cuda():
            torch.cuda.reset_peak_memory_stats()
        for _ in range(warmup):
            step.parts_once(batches, rand)
        # Interleaved, so that drift on a noisy machine hits both measurements alike.
        parts, wholes = [], []
        for _ in range(iters):
            parts.append(step.parts_once(batches, rand))
            wholes.append(step.whole_once(batches, rand))
        median = {name: statistics.median(p[name] for p in parts) for name in step.part_names}
        whole = statistics.median(wholes)
        result = {
            "preset": preset.name, "mode": mode, "objective": objective, "micro_batch": micro_batch,
            "world_size": 1, "offload": offload, "student_steps": student_steps, "cfg_scale": step.cfg_scale,
            "device": torch.cuda.get_device_name() if is_cuda() else "cpu",
            "torch_threads": torch.get_num_threads(), "attention": step.attention,
            "trainable_params": step.trainable, "iters": iters,
            "parts_s": median, "sum_parts_s": sum(median.values()), "whole_s": whole,
            "whole_over_parts": whole / sum(median.values()),
            "samples_per_s": micro_batch / whole,
        }
        if objective == "adv":
            d_calls = step.d_call_variants(batches, rand, iters)
            result["d_step_stacked_s"], result["d_step_separate_s"] = d_calls["stacked"], d_calls["separate"]
            result["d_stacked_over_separate"] = d_calls["stacked"] / d_calls["separate"]
        if loop:
            result["loop_s"] = loop_step_seconds(step, shards, iters, workers)
            result["loop_over_parts"] = result["loop_s"] / result["sum_parts_s"]
        if is_cuda():
            result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            flops = student_flops(preset, micro_batch, mode, "cuda")
            # the student's forward, and its backward inside the G step (which also runs D's forward on the
            # fake and the optimizer step: the TFLOP/s and MFU below are lower bounds)
            fwd_bwd_s = median["student forward"] + median["G step" if objective == "adv" else "student step"]
            result.update(flops)
            result["student_tflops"] = flops["student_fwd_bwd_flops"] / fwd_bwd_s / 1e12
            result["mfu"] = result["student_tflops"] / peak_tflops(result["device"], peak_override)
        return result


def _forever(loader):
    while True:
        yield from loader


def loop_step_seconds(step: Step, shards: Path, iters: int, workers: int) -> float:
    """Seconds per step of trainer.runtime.loop.train itself in steady state: its samples/s log over windows of
    `iters` steps (five), the median of all but the first (loader start-up)."""
    from trainer.config import Config
    from trainer.runtime.engines import DistInfo
    from trainer.runtime.loop import Job, train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = Config()
        cfg.run.out_dir = tmp
        cfg.data.shards = str(shards)
        cfg.data.num_workers = workers
        cfg.log.every_steps = iters
        cfg.log.checkpoint_every_samples = 0
        job = Job("bench", Path(tmp) / "job", step.micro_batch * iters * 5, step.micro_batch, 1, step.method)
        train(job, cfg, DistInfo(0, 0, 1))
        from trainer.runtime.tracking import read_metrics

        rates = [row["bench/samples_per_s"] for row in read_metrics(Path(tmp) / "job" / "tb", "bench/samples_per_s")]
    return step.micro_batch / statistics.median(rates[1:])


def meta_report(preset: Preset, micro_batch: int, modes: list[str]) -> list[dict]:
    """No GPU: what a GPU run would compute, from the meta device (shapes and FLOPs only)."""
    rows = []
    for mode in modes:
        flops = student_flops(preset, micro_batch, mode, "meta")
        rows.append({"preset": preset.name, "mode": mode, "micro_batch": micro_batch, "device": "meta", **flops,
                     "seconds_at_40pct_mfu_h100": flops["student_fwd_bwd_flops"] / (0.4 * PEAK_BF16_TFLOPS["H100"] * 1e12)})
    return rows


def print_result(r: dict) -> None:
    print(f"\n== {r['preset']} {r['mode']} {r['objective']} micro-batch {r['micro_batch']} on {r['device']} "
          f"({r['torch_threads']} threads; attention {', '.join(r['attention'])}; trainable {r['trainable_params']:,})")
    for name, seconds in r["parts_s"].items():
        print(f"  {name:<16} {seconds * 1e3:9.1f} ms  {seconds / r['sum_parts_s']:6.1%}")
    print(f"  {'sum of parts':<16} {r['sum_parts_s'] * 1e3:9.1f} ms")
    print(f"  {'whole step':<16} {r['whole_s'] * 1e3:9.1f} ms   whole / sum(parts) = {r['whole_over_parts']:.3f}"
          f"   (target <= 1.05)   {r['samples_per_s']:.1f} samples/s")
    if "d_stacked_over_separate" in r:
        print(f"  D step, real+fake in one call {r['d_step_stacked_s'] * 1e3:.1f} ms vs two calls "
              f"{r['d_step_separate_s'] * 1e3:.1f} ms: ratio {r['d_stacked_over_separate']:.3f}")
    if "loop_s" in r:
        print(f"  {'trainer loop':<16} {r['loop_s'] * 1e3:9.1f} ms   loop / sum(parts)  = {r['loop_over_parts']:.3f}")
    if "mfu" in r:
        print(f"  student fwd+bwd {r['student_fwd_bwd_flops'] / 1e12:.1f} TFLOP: {r['student_tflops']:.0f} TFLOP/s, "
              f"MFU {r['mfu']:.1%} (target >= 40%); peak memory {r['peak_gib']:.1f} GiB")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--mode", default="full", help="full, lora or both (comma-separated)")
    parser.add_argument("--objective", choices=("adv", "mse"), default="adv",
                        help="adv: an adversarial stage's step; mse: the first stage's (teacher with CFG)")
    parser.add_argument("--micro-batch", type=int, default=0, help="default: 16 tiny, 4 sdxl lora, 1 sdxl full")
    parser.add_argument("--student-steps", type=int, default=4, help="the stage's student steps (teacher: 2x)")
    parser.add_argument("--cfg", type=float, default=3.0, help="CFG scale of the mse objective's teacher")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="loader workers")
    parser.add_argument("--offload", action="store_true", help="DeepSpeed optimizer offload to CPU (GPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the student (DeepSpeed engine.compile)")
    parser.add_argument("--loop", action="store_true", help="also time trainer.runtime.loop.train in steady state")
    parser.add_argument("--meta", action="store_true", help="FLOPs on the meta device only (no GPU needed)")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="the card's dense bf16 peak, for MFU")
    parser.add_argument("--json", type=Path, help="append the results to this JSON list")
    args = parser.parse_args(argv)

    preset = PRESETS[args.preset]
    modes = [m.strip() for m in args.mode.split(",")]
    if any(m not in ("full", "lora") for m in modes):
        parser.error(f"--mode: {args.mode!r}: each mode is full or lora")
    if args.preset == "sdxl" and not is_cuda() and not args.meta:
        parser.error("--preset sdxl needs a GPU; without one, --meta reports its FLOPs from the meta device")
    rows = []
    if args.meta:
        for mode in modes:
            micro = args.micro_batch or {"tiny": 16, "sdxl": 4 if mode == "lora" else 1}[args.preset]
            rows += meta_report(preset, micro, [mode])
        for r in rows:
            print(f"{r['preset']} {r['mode']} micro-batch {r['micro_batch']}: student forward "
                  f"{r['student_fwd_flops'] / 1e12:.2f} TFLOP, forward+backward {r['student_fwd_bwd_flops'] / 1e12:.2f} TFLOP "
                  f"= {r['seconds_at_40pct_mfu_h100'] * 1e3:.0f} ms at 40% MFU of an H100")
    else:
        for mode in modes:
            micro = args.micro_batch or {"tiny": 16, "sdxl": 4 if mode == "lora" else 1}[args.preset]
            result = run_preset(preset, mode, args.objective, micro, args.iters, args.warmup, args.offload,
                                args.student_steps, args.cfg, args.workers, args.loop, args.compile, args.peak_tflops)
            print_result(result)
            rows.append(result)
    if args.json:
        existing = json.loads(args.json.read_text()) if args.json.is_file() else []
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(existing + rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
