"""Loader throughput: the project's shard loader (trainer/data/loader.py) against a raw sequential read of
the same shard bytes, the most that any loader can deliver on this machine and disk.

    python bench/loader.py                              # SDXL-size samples: 2000 (~0.9 GB), read from disk
    python bench/loader.py --preset tiny                # the toy's shapes
    python bench/loader.py --cache warm                 # against the page cache (memory speed) instead
    python bench/loader.py --json bench/results/loader.json

Steps: write --samples random float16 samples with trainer.data.shards.ShardWriter into --dir (reused when
it already holds the same data), then per repeat: read every shard's bytes sequentially (the limit),
parse + np.load them without the loader ("decode-only"), and run one epoch of make_loader() batches
with 0 and --workers DataLoader workers. Every measurement starts from the same page-cache state: the
shards evicted from it (cold, the default: the disk is the limit, as in a real run whose shards do not
fit in memory) or all read once just before it (--cache warm).
Prints samples/s for each, the ratio loader / raw per repeat, their medians, and
`loader/raw = R (target >= 0.9)` for --workers workers.

Reading the numbers: cold, the ratio is the loader against the disk; with a warm cache the raw read
is a copy out of the page cache (memory speed), so the ratio is the loader's whole CPU cost against
one memcpy of the stored bytes. The per-stage breakdown at the end (in this process, without
DataLoader) shows where the loader's time goes; what workers add on top is the shared-memory
hand-over of each batch.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/loader.py` from a clone, and `import bench.loader` in tests
    sys.path.insert(0, str(ROOT))

from bench.common import PRESETS, Preset  # noqa: E402
from trainer.data.loader import collate, make_loader, read_raw_samples  # noqa: E402
from trainer.data.shards import (ARRAY_FIELDS, ShardWriter, decode_npy, decode_sample,  # noqa: E402
                            list_shards, read_index)

TARGET_RATIO = 0.9
SHARD_PREFIX = "bench"
# What the data in --dir were written with; a rerun with the same parameters reuses them.
PARAMS_NAME = "bench_loader.json"
READ_CHUNK = 16 << 20  # large sequential reads: the raw limit should not pay per-call overhead
PAGE_BYTES = 4096
MB = 1e6
# Per preset: (samples, batch size) defaults. 2000 SDXL samples are ~0.9 GB, big enough that a
# measurement lasts seconds; the toy's samples are 100x smaller, so more of them.
DEFAULTS = {"sdxl": (2000, 8), "tiny": (16384, 32)}
SDXL_TIME_IDS = np.array([1024, 1024, 0, 0, 1024, 1024], dtype=np.float32)


# -- the data -------------------------------------------------------------------------------------


def data_params(preset: Preset, samples: int, shards: int, seed: int) -> dict:
    return {"preset": preset.name, "shapes": {k: list(v) for k, v in preset.sample_shapes().items()},
            "samples": samples, "shards": shards, "seed": seed, "dtype": "float16"}


def holds_data(shard_dir: Path, params: dict) -> bool:
    """Whether shard_dir already holds complete shards written with these parameters."""
    marker = shard_dir / PARAMS_NAME
    if not marker.is_file() or json.loads(marker.read_text()) != params:
        return False
    try:
        paths = list_shards(shard_dir)
    except (FileNotFoundError, ValueError):
        return False
    return len(paths) == params["shards"] and all(Path(path).is_file() for path in paths)


def random_sample(rng: np.random.Generator, preset: Preset) -> dict[str, np.ndarray]:
    """One sample's arrays: float16 noise (what a cached latent or embedding costs to store and
    decode does not depend on its values) and SDXL's usual micro-conditioning ids."""
    shapes = preset.sample_shapes()
    arrays = {name: rng.standard_normal(shapes[name], dtype=np.float32).astype(np.float16)
              for name in ("latent", "prompt_embeds", "pooled")}
    arrays["time_ids"] = SDXL_TIME_IDS[:shapes["time_ids"][0]].copy()
    return arrays


def remove_old_shards(shard_dir: Path) -> None:
    # Only this benchmark's own files: --dir may be a folder the user also keeps other things in.
    for path in [shard_dir / PARAMS_NAME, *shard_dir.glob(f"{SHARD_PREFIX}-*.tar*")]:
        path.unlink(missing_ok=True)


def write_data(shard_dir: Path, params: dict, preset: Preset) -> None:
    remove_old_shards(shard_dir)
    rng = np.random.default_rng(params["seed"])
    per_shard = params["samples"] // params["shards"]
    with ShardWriter(shard_dir, prefix=SHARD_PREFIX, samples_per_shard=per_shard) as writer:
        for i in tqdm(range(params["samples"]), desc=f"writing {preset.name} shards", unit="sample"):
            writer.write(f"{i:08d}", caption=f"benchmark sample {i}", **random_sample(rng, preset))
    # Written last: an interrupted write leaves no marker, so the next run writes again.
    (shard_dir / PARAMS_NAME).write_text(json.dumps(params, indent=1))


def ensure_data(shard_dir: Path, preset: Preset, samples: int, shards: int, seed: int) -> list[str]:
    """The shard paths, writing them first unless shard_dir holds the same data already."""
    params = data_params(preset, samples, shards, seed)
    if holds_data(shard_dir, params):
        print(f"reusing {samples} {preset.name} samples in {shard_dir}")
    else:
        write_data(shard_dir, params, preset)
    return list_shards(shard_dir)


def check_epoch_plan(samples: int, shards: int, batch_size: int, worker_counts: list[int]) -> None:
    """Refuse sizes where `samples / batch_size` batches would not be exactly one epoch.

    The loader runs one endless stream per worker, each over its own shards, and DataLoader takes
    batches from the workers in turn. One epoch is therefore exactly samples / batch_size batches only
    when every stream holds the same number of samples, a multiple of the batch size.
    """
    if samples % shards:
        raise ValueError(f"--samples {samples} must be a multiple of --shards {shards}")
    for workers in worker_counts:
        streams = max(1, workers)
        if shards % streams:
            raise ValueError(f"--shards {shards} must be a multiple of every worker count ({workers})")
        per_stream = samples // streams
        if per_stream % batch_size:
            raise ValueError(f"with {workers} workers each stream holds {per_stream} samples, not a "
                             f"multiple of --batch-size {batch_size}: pick other sizes")


# -- the page cache ---------------------------------------------------------------------------------


def evict_from_page_cache(paths: list[str]) -> None:
    """Drop these files' pages from the page cache (no root needed, unlike /proc/sys/vm/drop_caches):
    the next read of them comes from the disk, as a week-long run's reads of terabytes of shards do."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_all(paths: list[str]) -> int:
    """Read every file from start to end in large chunks; returns the bytes read.

    Into one reused buffer: a fresh 16 MB bytes object per read would measure the allocator's
    page faults (which vary with its state from run to run) more than the read itself.
    """
    buffer = bytearray(READ_CHUNK)
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as stream:
            while count := stream.readinto(buffer):
                total += count
    return total


def settle_cache(paths: list[str], cold: bool) -> None:
    """Put the page cache in the same state before each measurement: all shards cached, or none."""
    if cold:
        evict_from_page_cache(paths)
    else:
        read_all(paths)


# -- the measurements -------------------------------------------------------------------------------


def timed(work: Callable, *args) -> tuple[float, object]:
    """Seconds that work(*args) takes, and its result."""
    start = time.perf_counter()
    result = work(*args)
    return time.perf_counter() - start, result


def decode_arrays(sample: dict, names) -> list[np.ndarray]:
    return [decode_npy(sample[f"{name}.npy"]) for name in names]


def decode_only(paths: list[str]) -> int:
    """Parse each tar and np.load each array, as the loader does, but nothing else: no float32
    conversion, no checks, no batching, no workers. Returns the number of samples."""
    count = 0
    for path in paths:
        raw, error = read_raw_samples(path)
        if error is not None:
            raise RuntimeError(f"{path}: {error}")
        for sample in raw:
            decode_arrays(sample, ARRAY_FIELDS)
        count += len(raw)
    return count


def touch_pages(batch: dict) -> None:
    """Read one value per memory page of every tensor of a batch, as the copy to the GPU in
    trainer/runtime/loop.py reads them all: from workers, a batch arrives as shared memory that is only
    mapped in on first touch, a cost the training process pays. (numpy: no torch thread pool.)"""
    for value in batch.values():
        if torch.is_tensor(value):
            flat = value.numpy().reshape(-1)
            flat[::max(1, PAGE_BYTES // flat.itemsize)].sum()


def loader_epoch(shard_dir: Path, batch_size: int, workers: int, samples: int,
                 seed: int) -> dict[str, float]:
    """One epoch of make_loader() batches, as trainer/runtime/loop.py receives them (float32 tensors).

    Timed from creating the DataLoader (so worker start-up and each worker's first whole-shard
    read count, as they do once per training job) to the last batch of the epoch. The keys must
    cover every written sample exactly once, so that the bytes read are the raw read's bytes.
    """
    start = time.perf_counter()
    loader = make_loader(shard_dir, batch_size, seed, num_workers=workers)
    batches = iter(loader)
    first_batch_s = None
    keys: list[str] = []
    for _ in range(samples // batch_size):
        batch = next(batches)
        first_batch_s = first_batch_s or time.perf_counter() - start
        touch_pages(batch)
        keys += batch["keys"]
    seconds = time.perf_counter() - start
    del batches  # stops the workers, which are already reading the next epoch
    if len(keys) != samples or len(set(keys)) != samples:
        raise RuntimeError(f"the loader yielded {len(set(keys))} distinct of {len(keys)} samples, "
                           f"expected each of the {samples} written samples once")
    return {"seconds": seconds, "first_batch_s": first_batch_s, "samples": len(keys)}


def measure_stages(paths: list[str], shapes: dict, batch_size: int) -> dict[str, float]:
    """Seconds per stage of the loader's work, in this process and without DataLoader, to show
    where time goes: tar parsing, np.load, the rest of decode_sample (float32 + NaN/Inf checks),
    and collate (stacking into batches)."""
    stages = dict.fromkeys(("tar_parse", "npy_load", "float32_and_checks", "collate"), 0.0)
    for path in paths:
        seconds, (raw, _) = timed(read_raw_samples, path)
        stages["tar_parse"] += seconds
        decoded = []
        for sample in raw:
            npy_seconds, _ = timed(decode_arrays, sample, shapes)
            sample_seconds, result = timed(decode_sample, sample, shapes, Path(path).name)
            stages["npy_load"] += npy_seconds
            # decode_sample repeats the np.load: what it costs beyond that is conversion + checks
            stages["float32_and_checks"] += max(0.0, sample_seconds - npy_seconds)
            decoded.append(result)
        for first in range(0, len(decoded), batch_size):
            seconds, _ = timed(collate, decoded[first:first + batch_size])
            stages["collate"] += seconds
    return stages


def measure_repeat(paths: list[str], shard_dir: Path, samples: int, batch_size: int,
                   worker_counts: list[int], cold: bool, seed: int) -> dict:
    """One repeat: raw read, decode-only and a loader epoch per worker count, each from the same
    page-cache state, and the loader / raw ratios."""
    settle_cache(paths, cold)
    raw_s, raw_bytes = timed(read_all, paths)
    settle_cache(paths, cold)
    decode_s, decoded = timed(decode_only, paths)
    if decoded != samples:
        raise RuntimeError(f"decode-only read {decoded} samples, expected {samples}")
    result = {"raw_s": raw_s, "raw_mb_per_s": raw_bytes / MB / raw_s, "raw_samples_per_s": samples / raw_s,
              "decode_only_samples_per_s": samples / decode_s}
    for workers in worker_counts:
        settle_cache(paths, cold)
        epoch = loader_epoch(shard_dir, batch_size, workers, samples, seed)
        result[f"loader_w{workers}_samples_per_s"] = samples / epoch["seconds"]
        result[f"loader_w{workers}_first_batch_s"] = epoch["first_batch_s"]
        result[f"ratio_w{workers}"] = result[f"loader_w{workers}_samples_per_s"] / result["raw_samples_per_s"]
    return result


def medians(repeats: list[dict]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in repeats) for key in repeats[0]}


# -- reporting ------------------------------------------------------------------------------------


def repeat_line(index: int, result: dict, worker_counts: list[int]) -> str:
    parts = [f"raw {result['raw_mb_per_s']:.0f} MB/s = {result['raw_samples_per_s']:.0f} samples/s",
             f"decode-only {result['decode_only_samples_per_s']:.0f}"]
    parts += [f"loader w{w} {result[f'loader_w{w}_samples_per_s']:.0f} (ratio {result[f'ratio_w{w}']:.2f})"
              for w in worker_counts]
    return f"repeat {index}: " + ", ".join(parts)


def stages_line(stages: dict[str, float], samples: int) -> str:
    total = sum(stages.values())
    parts = [f"{name} {1e3 * s / samples:.3f} ms ({100 * s / total:.0f}%)" for name, s in stages.items()]
    return f"in-process loader work per sample: {', '.join(parts)}; all {samples / total:.0f} samples/s"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="sdxl")
    p.add_argument("--samples", type=int, default=None, help="default: 2000 for sdxl, 16384 for tiny")
    p.add_argument("--shards", type=int, default=8, help="shards to write (a multiple of --workers)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 8 for sdxl, 32 for tiny")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers; 0 is always measured too")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", type=Path, default=None,
                   help="where the shards go (default: <tmp>/bench_loader_<preset>, reused by reruns)")
    p.add_argument("--cache", choices=("cold", "warm"), default="cold",
                   help="cold (default): the shards evicted from the page cache before each measurement, so "
                        "the raw read is the disk's speed, a training run's limit; warm: all cached (memory speed)")
    p.add_argument("--no-stages", action="store_true", help="skip the per-stage breakdown")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch.set_num_threads in this process (default: torch's own, as the trainer): "
                        "collate's torch.stack runs here when --workers is 0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    default_samples, default_batch = DEFAULTS[args.preset]
    args.samples = args.samples or default_samples
    args.batch_size = args.batch_size or default_batch
    args.dir = args.dir or Path(tempfile.gettempdir()) / f"bench_loader_{args.preset}"
    args.cold = args.cache == "cold"
    return args


def run_benchmark(args: argparse.Namespace) -> dict:
    """Everything but the printing of the summary: returns the results that --json writes."""
    started = time.perf_counter()
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    preset = PRESETS[args.preset]
    worker_counts = sorted({0, args.workers})
    check_epoch_plan(args.samples, args.shards, args.batch_size, worker_counts)
    paths = ensure_data(args.dir, preset, args.samples, args.shards, args.seed)
    total_bytes = sum(os.path.getsize(path) for path in paths)
    cache = ("cold (shards evicted before each measurement)" if args.cold
             else "warm (all shards read once before each measurement)")
    print(f"{args.samples} {preset.name} samples, {total_bytes / MB:.0f} MB in {len(paths)} shards, "
          f"batch {args.batch_size}, {torch.get_num_threads()} torch threads here, page cache {cache}")
    repeats = []
    for index in range(args.repeats):
        repeats.append(measure_repeat(paths, args.dir, args.samples, args.batch_size, worker_counts,
                                      args.cold, args.seed))
        print(repeat_line(index, repeats[-1], worker_counts), flush=True)
    results = {"preset": preset.name, "samples": args.samples, "shards": len(paths),
               "bytes": total_bytes, "bytes_per_sample": total_bytes / args.samples,
               "batch_size": args.batch_size, "worker_counts": worker_counts, "workers": args.workers,
               "cache": args.cache, "cpu_count": os.cpu_count(),
               "torch_threads": torch.get_num_threads(),
               "repeats": repeats, "median": medians(repeats), "target_ratio": TARGET_RATIO}
    if not args.no_stages:
        settle_cache(paths, args.cold)
        stages = measure_stages(paths, read_index(args.dir)["shapes"], args.batch_size)
        results["stages_s"] = stages
        print(stages_line(stages, args.samples))
    results["runtime_s"] = time.perf_counter() - started
    return results


def summary_lines(results: dict) -> list[str]:
    median = results["median"]
    lines = [(f"median of {len(results['repeats'])}: raw {median['raw_mb_per_s']:.0f} MB/s = "
              f"{median['raw_samples_per_s']:.0f} samples/s, decode-only "
              f"{median['decode_only_samples_per_s']:.0f} samples/s")]
    lines += [f"  loader, {w} workers: {median[f'loader_w{w}_samples_per_s']:.0f} samples/s "
              f"(first batch after {median[f'loader_w{w}_first_batch_s']:.2f} s), "
              f"loader/raw {median[f'ratio_w{w}']:.3f}" for w in results["worker_counts"]]
    lines.append(f"runtime {results['runtime_s']:.0f} s")
    ratio = median[f"ratio_w{results['workers']}"]
    lines.append(f"loader/raw = {ratio:.2f} (target >= {TARGET_RATIO})")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run_benchmark(args)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    print("\n".join(summary_lines(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
