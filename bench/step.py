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

--profile: where the whole step's time goes. One more whole step under torch.profiler: its wall time, how long
the GPU was busy in it (the union of its kernels' intervals) and so the GPU-idle share, the top CUDA kernels
and the top CPU ops by self time (on a CPU only the CPU ops); and the bare teacher UNet forward (no grad,
bf16, at the micro-batch) in TFLOP/s, as is and in channels_last: a slow bare forward is the kernels' doing,
a fast one puts the step's missing time in the trainer around it.

cuDNN's autotuner is on as in the trainer (run.deterministic: false); --no-cudnn-benchmark turns it off.
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
        from trainer.runtime.engines import build_ds_config, compute_dtype, device, init_distributed, make_engine
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

        optim = OptimConfig(lr=1e-6, betas=[0.0, 0.99])
        ds = build_ds_config(ds_config_path(offload), micro_batch, 1, info.world_size, optim, "bench")
        base = build_unet(preset, device=self.dev)
        self.teacher = freeze(copy.deepcopy(base), compute_dtype(ds)).to(self.dev)  # the engines' dtype, no grads
        student = add_lora(copy.deepcopy(base), rank=preset.lora_rank) if mode == "lora" else copy.deepcopy(base)
        student.enable_gradient_checkpointing()
        self.attention = sorted({type(p).__name__ for p in student.attn_processors.values()})
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


def unet_inputs(preset: Preset, batch: int, device, dtype=torch.bfloat16):
    """Random UNet inputs of the preset's shapes: latents, timesteps, conditioning."""
    c, h, w = preset.latent
    make = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)
    cond = Conditioning(make(batch, preset.text_tokens, preset.text_dim), make(batch, preset.pooled_dim),
                        make(batch, preset.time_ids))
    return make(batch, c, h, w), torch.full((batch,), 500, device=device), cond


def student_flops(preset: Preset, micro_batch: int, mode: str, device: str) -> dict[str, float]:
    """Model FLOPs of the student's forward and backward at `micro_batch`, and of one teacher forward,
    counted by torch's FLOP counter (no checkpointing recomputation; on the meta device where asked)."""
    from torch.utils.flop_counter import FlopCounterMode

    from trainer.method.lora import add_lora

    unet = build_unet(preset, device=device).to(torch.bfloat16)
    if mode == "lora":
        unet = add_lora(unet, rank=preset.lora_rank)
    # the student's input needs no gradient: weight (or LoRA) gradients only
    x, t, cond = unet_inputs(preset, micro_batch, device)
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


# -- --profile: where a whole step's time goes ------------------------------------------------------

TOP_KERNELS, TOP_CPU_OPS, NAME_CHARS = 15, 10, 80


def profile_whole_step(step: Step, batches, rand: SampleRandom, unprofiled_s: float) -> dict:
    """One more whole step under torch.profiler. On a GPU: its wall time against the time the GPU was busy
    (the union of its kernels' and copies' intervals: streams may overlap, so the plain sum of kernel times
    is kept beside it), hence the GPU-idle share; the top kernels by total time and the top CPU ops by self
    time. The profiler's own bookkeeping lengthens the CPU side, so the idle share is also given against
    the unprofiled whole step (`unprofiled_s`, the kernels being the same). On a CPU only the wall time and
    the CPU ops (no device timeline)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if is_cuda() else [])
    with profile(activities=activities) as prof:
        wall_s = step.whole_once(batches, rand)
    averages = prof.key_averages()
    result = {"wall_s": wall_s, "cpu_ops": top_cpu_ops(averages)}
    if is_cuda():
        device_events = [e for e in prof.events() if is_device_work(e)]
        busy_s = union_seconds([(e.time_range.start, e.time_range.end) for e in device_events])
        result.update({
            "gpu_busy_s": busy_s,
            "gpu_kernel_sum_s": sum(e.time_range.elapsed_us() for e in device_events) / 1e6,
            "gpu_idle_share": max(0.0, 1 - busy_s / wall_s),
            "gpu_idle_share_unprofiled": max(0.0, 1 - busy_s / unprofiled_s),
            "device_events": len(device_events),
            "cuda_kernels": top_cuda_kernels(averages),
        })
    return result


def union_seconds(intervals_us: list[tuple[float, float]]) -> float:
    """Seconds covered by at least one interval (microseconds in)."""
    covered, reach = 0.0, -math.inf
    for start, end in sorted(intervals_us):
        if end > reach:
            covered += end - max(start, reach)
            reach = end
    return covered / 1e6


def is_device_work(event) -> bool:
    """A kernel, copy or memset on the GPU; not a user annotation's device-side span (an optimizer step's
    record_function range, gaps included), which torch's own tables also leave out of device time."""
    return event.device_type == torch.autograd.DeviceType.CUDA and not getattr(event, "is_user_annotation", False)


def top_cuda_kernels(averages) -> list[dict]:
    kernels = [a for a in averages if is_device_work(a)]
    kernels.sort(key=lambda a: a.self_device_time_total, reverse=True)
    return [{"name": a.key[:NAME_CHARS], "total_ms": a.self_device_time_total / 1e3, "calls": a.count}
            for a in kernels[:TOP_KERNELS]]


def top_cpu_ops(averages) -> list[dict]:
    ops = [a for a in averages if a.device_type == torch.autograd.DeviceType.CPU]
    ops.sort(key=lambda a: a.self_cpu_time_total, reverse=True)
    return [{"name": a.key[:NAME_CHARS], "self_ms": a.self_cpu_time_total / 1e3, "calls": a.count}
            for a in ops[:TOP_CPU_OPS]]


def timed_forwards(unet, x, t, cond, repeats: int) -> float:
    """Median seconds of `repeats` synchronised forwards."""
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        unet_forward(unet, x, t, cond)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def unet_forward_tflops(step: Step, batch: int, peak_override: float, repeats: int = 3) -> dict:
    """The frozen teacher's bare forward (no grad, bf16) at the micro-batch, after one warm-up, in TFLOP/s by
    the FLOP counter: as is, then with weights and input in channels_last (convolutions often run faster
    so on GPUs). The teacher is put back in the default format afterwards."""
    from torch.utils.flop_counter import FlopCounterMode

    unet, device_name = step.teacher, torch.cuda.get_device_name() if is_cuda() else "cpu"
    x, t, cond = unet_inputs(step.preset, batch, step.dev)
    peak = peak_tflops(device_name, peak_override)
    result = {"batch": batch, "repeats": repeats}
    with torch.no_grad():
        counter = FlopCounterMode(display=False)
        with counter:  # the count's forward is also the warm-up of the default format
            unet_forward(unet, x, t, cond)
        result["forward_flops"] = flops = float(counter.get_total_flops())
        formats = {"contiguous": (torch.contiguous_format, False), "channels_last": (torch.channels_last, True)}
        try:
            for name, (memory_format, warm_up) in formats.items():
                unet.to(memory_format=memory_format)
                x_in = x.contiguous(memory_format=memory_format)
                if warm_up:  # a new layout: other kernels (and cuDNN's autotuner) to warm
                    unet_forward(unet, x_in, t, cond)
                seconds = timed_forwards(unet, x_in, t, cond, repeats)
                tflops = flops / seconds / 1e12
                result[name] = {"seconds": seconds, "tflops": tflops,
                                "of_peak": None if math.isnan(tflops / peak) else tflops / peak}
        finally:
            unet.to(memory_format=torch.contiguous_format)
    return result


# -- running -------------------------------------------------------------------------------------


def run_preset(preset: Preset, mode: str, objective: str, micro_batch: int, iters: int, warmup: int,
               offload: bool, student_steps: int, cfg_scale: float, workers: int, loop: bool,
               compile_student: bool, peak_override: float, profile: bool = False,
               cudnn_benchmark: bool = True) -> dict:
    from trainer.data.loader import make_loader

    torch.backends.cudnn.benchmark = cudnn_benchmark

    with tempfile.TemporaryDirectory() as tmp:
        shards = write_shards(preset, micro_batch * 8, Path(tmp) / "shards")
        start = time.perf_counter()
        step = Step(preset, mode, objective, micro_batch, offload, student_steps, cfg_scale, compile_student)
        progress(f"networks and engines built: {time.perf_counter() - start:.1f} s")
        loader = make_loader(shards, micro_batch, seed=0, num_workers=workers)
        batches = _forever(loader)
        rand = SampleRandom(0, range(micro_batch))
        if is_cuda():
            torch.cuda.reset_peak_memory_stats()
        for i in range(warmup):
            start = time.perf_counter()
            step.parts_once(batches, rand)
            progress(f"warm-up step {i + 1}/{warmup}: {time.perf_counter() - start:.2f} s")
        # Interleaved, so that drift on a noisy machine hits both measurements alike.
        parts, wholes = [], []
        for i in range(iters):
            parts.append(step.parts_once(batches, rand))
            wholes.append(step.whole_once(batches, rand))
            progress(f"step {i + 1}/{iters}: parts {sum(parts[-1].values()):.2f} s, whole {wholes[-1]:.2f} s")
        median = {name: statistics.median(p[name] for p in parts) for name in step.part_names}
        whole = statistics.median(wholes)
        result = {
            "preset": preset.name, "mode": mode, "objective": objective, "micro_batch": micro_batch,
            "world_size": 1, "offload": offload, "student_steps": student_steps, "cfg_scale": step.cfg_scale,
            "device": torch.cuda.get_device_name() if is_cuda() else "cpu",
            "torch_threads": torch.get_num_threads(), "attention": step.attention,
            "trainable_params": step.trainable, "iters": iters, "cudnn_benchmark": cudnn_benchmark,
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
        if is_cuda():  # before --profile, whose channels_last copies of the teacher are no part of the step
            result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if profile:
            result["profile"] = error_instead("profile", lambda: profile_whole_step(step, batches, rand, whole))
            repeats = 3 if is_cuda() else 1  # a CPU's bf16 forward is slow, and its rate no question here
            result["unet_forward_tflops"] = error_instead(
                "unet_forward_tflops", lambda: unet_forward_tflops(step, micro_batch, peak_override, repeats))
        if is_cuda():
            result.update(gpu_rates(preset, micro_batch, mode, objective, median, result["device"], peak_override))
        return result


def gpu_rates(preset: Preset, micro_batch: int, mode: str, objective: str, median: dict, device_name: str,
              peak_override: float) -> dict:
    """The student's model FLOPs and the TFLOP/s and MFU they imply."""
    flops = student_flops(preset, micro_batch, mode, "cuda")
    # the student's forward, and its backward inside the G step (which also runs D's forward on the
    # fake and the optimizer step: the TFLOP/s and MFU below are lower bounds)
    fwd_bwd_s = median["student forward"] + median["G step" if objective == "adv" else "student step"]
    tflops = flops["student_fwd_bwd_flops"] / fwd_bwd_s / 1e12
    return {**flops, "student_tflops": tflops, "mfu": tflops / peak_tflops(device_name, peak_override)}


def progress(message: str) -> None:
    """A line as the run goes ("-- " lines, outside the tables): a run cut by a time limit shows how far it got."""
    print(f"-- {message}", flush=True)


def error_instead(name: str, measure) -> dict:
    """--profile's extras must not cost the step's own numbers: an error is recorded in their place."""
    start = time.perf_counter()
    try:
        result = measure()
    except Exception as error:  # noqa: BLE001 (whatever it is, the step's numbers are kept)
        result = {"error": f"{type(error).__name__}: {error}"[:500]}
    progress(f"{name}: {time.perf_counter() - start:.1f} s")
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
    for key, show in (("profile", print_profile), ("unet_forward_tflops", print_unet_forward)):
        if key in r and "error" in r[key]:
            print(f"  {key}: FAILED ({r[key]['error']})")
        elif key in r:
            show(r[key])


def print_profile(prof: dict) -> None:
    line = f"  profiled whole step (torch.profiler): wall {prof['wall_s'] * 1e3:.1f} ms"
    if "gpu_busy_s" in prof:
        line += (f", GPU busy {prof['gpu_busy_s'] * 1e3:.1f} ms (kernels summed {prof['gpu_kernel_sum_s'] * 1e3:.1f} ms,"
                 f" {prof['device_events']:,} device events): GPU idle {prof['gpu_idle_share']:.1%} of the step,"
                 f" {prof['gpu_idle_share_unprofiled']:.1%} of the unprofiled one")
    print(line)
    if prof.get("cuda_kernels"):
        print(f"    {'top CUDA kernels by total time':<{NAME_CHARS}} {'ms':>9} {'calls':>7}")
        for k in prof["cuda_kernels"]:
            print(f"    {k['name']:<{NAME_CHARS}} {k['total_ms']:9.1f} {k['calls']:7d}")
    print(f"    {'top CPU ops by self time':<{NAME_CHARS}} {'ms':>9} {'calls':>7}")
    for op in prof["cpu_ops"]:
        print(f"    {op['name']:<{NAME_CHARS}} {op['self_ms']:9.1f} {op['calls']:7d}")


def print_unet_forward(u: dict) -> None:
    for name in ("contiguous", "channels_last"):
        row = u[name]
        of_peak = f" = {row['of_peak']:.1%} of peak" if row["of_peak"] is not None else ""
        print(f"  bare teacher forward, no grad, bf16, batch {u['batch']}, {name:<13} {row['seconds'] * 1e3:8.1f} ms: "
              f"{u['forward_flops'] / 1e12:.3g} TFLOP at {row['tflops']:.3g} TFLOP/s{of_peak}")


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
    parser.add_argument("--profile", action="store_true",
                        help="one more whole step under torch.profiler (GPU idle share, top kernels and CPU ops) "
                             "and the bare teacher forward's TFLOP/s, as is and channels_last")
    parser.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True,
                        help="cuDNN's autotuner, on as in the trainer (run.deterministic: false)")
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
                                args.student_steps, args.cfg, args.workers, args.loop, args.compile, args.peak_tflops,
                                args.profile, args.cudnn_benchmark)
            print_result(result)
            rows.append(result)
    if args.json:
        existing = json.loads(args.json.read_text()) if args.json.is_file() else []
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(existing + rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
