"""Streaming, deterministic, resumable batches from the shards, the same on any number of ranks.

Lanes. The data is read through K lanes (`data.lanes`, a property of the run, never of the world size;
default: the largest power of two up to 64 that divides the number of shards, so that every lane holds
as many shards per epoch). Epoch e permutes the shard list
with rng(seed, e); lane l takes shards l, l + K, ... of that permutation, each shard's samples permuted
with rng(seed, e, shard), epoch after epoch. A lane is a sequence of slots, one per sample that index.json
counts, so positions never depend on what was decodable.

Positions. A job's samples are numbered in the order it sees them (its samples seen): position p is
slot p // K of lane p % K. A step of global batch G takes positions [s G, (s + 1) G); rank r of R takes
those with p % R == r, in order, micro-batch after micro-batch. Lane l feeds rank l % R only (R must
divide K): a rank reads its own lanes' shards, and the same positions hold the same samples on any number
of ranks, so a job resumed on another world size continues the same sequence. Every batch carries its
positions: a sample's randomness is keyed by its position (trainer/runtime/randomness.py).

Workers. A rank's lanes are split over its DataLoader workers (lane l to worker (l // R) % W). For each of
the rank's micro-batches in turn, every worker yields its own lanes' part (possibly none); DataLoader hands
these out round-robin, so W consecutive items are one micro-batch, merged in position order here.

Resume. Starting at position P0, each lane skips the slots of the positions below P0 by index.json's
counts: whole shards are skipped unread.

Bad data. An undecodable sample, or the unread tail of a truncated shard, is a bad slot: dropped, and its
micro-batch refilled by repeating its good samples; a micro-batch with no good sample at all is stood in
for by the next one that has one. Reported once per shard and field, counted, and too many stop the run.

Memory: each worker holds one shard per lane it reads (K / (R x W) shards).
"""

from __future__ import annotations

import logging
import tarfile
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from trainer.runtime.preemption import ignore_in_worker as ignore_stop_signals
from trainer.data.shards import BadSample, decode_sample, list_shards, read_index
from trainer.data.tarscan import read_plain_shard

logger = logging.getLogger(__name__)

# Below this many samples a bad fraction says little (one bad sample in three is 33%).
MIN_SAMPLES_FOR_BAD_FRACTION = 100
ARRAY_KEYS = ("latent", "prompt_embeds", "pooled", "time_ids")
# What a truncated or corrupt tar raises while being read.
READ_ERRORS = (OSError, EOFError, tarfile.TarError, ValueError)


MAX_AUTO_LANES = 64  # enough for 64 ranks x 1 worker; each worker keeps one shard per lane in memory


def auto_lanes(num_shards: int) -> int:
    """The default lane count: the largest power of two up to MAX_AUTO_LANES that divides the number of
    shards, so that every lane gets as many shards per epoch (a lane with fewer would repeat its samples
    more often)."""
    lanes = 1
    while lanes * 2 <= MAX_AUTO_LANES and num_shards % (lanes * 2) == 0:
        lanes *= 2
    return lanes


def data_lanes(shard_dir: Union[str, Path], lanes: int = 0) -> int:
    """The lanes a run reads `shard_dir` through: `lanes`, or the default for its number of shards."""
    return lanes or auto_lanes(len(read_index(shard_dir)["shards"]))


def slots_before(position: int, lane: int, lanes: int) -> int:
    """How many of positions 0 .. position - 1 lane `lane` holds."""
    return max(0, (position - lane + lanes - 1) // lanes)


def rank_positions(start: int, rank: int, world_size: int, count: int) -> list[int]:
    """Positions `start`, `start` + 1, ... that rank `rank` takes, the first `count` of them (start at a
    step boundary, so a multiple of the world size)."""
    return [start + rank + world_size * i for i in range(count)]


def epoch_shard_order(num_shards: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_shards)


def shard_sample_order(count: int, seed: int, epoch: int, shard_index: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, shard_index]).permutation(count)


def read_raw_samples(path: str) -> tuple[list[dict], Optional[str]]:
    """All samples of one tar as dicts of bytes (or memoryviews), in tar order, plus the read error if any.

    Samples read before an error are kept: a truncated shard loses only its tail.
    """
    try:
        fast = read_plain_shard(path)  # the project's own shards: one read, no copies (trainer/data/tarscan.py)
    except OSError as error:
        return [], f"{type(error).__name__}: {error}"
    if fast is not None:
        return fast, None
    # Anything else (another writer's tar, or a damaged one): webdataset's general reader, which also
    # says what is wrong.
    samples: list[dict] = []
    try:
        with open(path, "rb") as stream:
            files = ({**entry, "__url__": path}
                     for entry in wds.tariterators.tar_file_iterator(stream))
            for sample in wds.tariterators.group_by_keys(files):
                samples.append(sample)
    except READ_ERRORS as error:
        # webdataset appends " @ <file object>" to the message; the caller names the path.
        reason = str(error).split(" @ ")[0] or type(error).__name__
        return samples, f"{type(error).__name__}: {reason}"
    return samples, None


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stacks the samples' arrays into one batch, with numpy: torch.stack spreads small copies over its
    intra-op threads, which is very slow on a loaded CPU
    (measured: bench/README.md#measurements-behind-defaults)."""
    batch: dict[str, Any] = {}
    for name in ARRAY_KEYS:
        if name not in samples[0]:
            continue
        first = samples[0][name]
        out = torch.empty((len(samples), *first.shape), dtype=first.dtype)
        np.stack([sample[name].numpy() for sample in samples], out=out.numpy())
        batch[name] = out
    batch["caption"] = [sample["caption"] for sample in samples]
    batch["keys"] = [sample["key"] for sample in samples]
    return batch


def first_samples(shard_dir: Union[str, Path], count: int) -> list[dict[str, Any]]:
    """The first `count` samples of the shards in index order, decoded (fewer if the shards hold fewer): the
    fixed sample sets of the probe and the benchmarks. A shard that cannot be read is an error naming it."""
    index = read_index(shard_dir)
    rows: list[dict[str, Any]] = []
    for shard in list_shards(shard_dir):
        if len(rows) == count:
            break
        samples, error = read_raw_samples(shard)
        if error:
            raise ValueError(f"cannot read {shard}: {error}")
        rows += [decode_sample(raw, index["shapes"], shard) for raw in samples[:count - len(rows)]]
    return rows


class ShardStream(IterableDataset):
    """One rank's micro-batches from a shard directory, as parts from each DataLoader worker (see the
    module's docstring); `merge_parts` / `ShardLoader` turn W parts into one micro-batch.

    `samples_ok` / `samples_bad` count in the process that iterates."""

    def __init__(self, shard_dir: Union[str, Path], batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, start_position: int = 0, max_bad_fraction: float = 0.01, lanes: int = 0):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if start_position < 0 or start_position % world_size:
            raise ValueError(f"start_position {start_position} must be a non-negative multiple of world_size {world_size}")
        if not 0 <= max_bad_fraction < 1:
            raise ValueError(f"max_bad_fraction must be in [0, 1), got {max_bad_fraction}")
        index = read_index(shard_dir)
        self.shard_dir = str(shard_dir)
        self.shard_names = [shard["name"] for shard in index["shards"]]
        self.shard_counts = [int(shard["count"]) for shard in index["shards"]]
        if any(count < 1 for count in self.shard_counts):
            raise ValueError(f"{shard_dir}/index.json lists an empty shard")
        self.lanes = lanes or auto_lanes(len(self.shard_names))
        if self.lanes > len(self.shard_names):
            raise ValueError(f"data.lanes={self.lanes}: {shard_dir} has only {len(self.shard_names)} shards, and every "
                             f"lane needs its own; write more, smaller shards or use fewer lanes")
        if self.lanes % world_size:
            raise ValueError(f"{self.lanes} data lanes cannot be split over {world_size} ranks: the world size must "
                             f"divide data.lanes (by default the largest power of two up to {MAX_AUTO_LANES} that "
                             f"divides the {len(self.shard_names)} shards: write a multiple of {world_size} shards, "
                             f"or set data.lanes, which changes the data order)")
        if len(self.shard_names) % self.lanes:
            logger.warning(f"data.lanes={self.lanes} does not divide the {len(self.shard_names)} shards of {shard_dir}: "
                           f"lanes with fewer shards repeat their samples more often")
        self.shapes = index["shapes"]
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_position = start_position
        self.max_bad_fraction = max_bad_fraction
        self.samples_ok = 0
        self.samples_bad = 0
        self._reported: set[tuple[str, str]] = set()

    def stats(self) -> dict[str, float]:
        seen = self.samples_ok + self.samples_bad
        return {"samples_ok": self.samples_ok, "samples_bad": self.samples_bad,
                "bad_fraction": self.samples_bad / seen if seen else 0.0}

    # -- bad data ------------------------------------------------------------------------

    def _report_once(self, shard: str, what: str, message: str) -> None:
        # Every epoch meets the same bad data again; say it once.
        if (shard, what) not in self._reported:
            self._reported.add((shard, what))
            logger.warning(message)

    def _count(self, ok: bool) -> None:
        if ok:
            self.samples_ok += 1
        else:
            self.samples_bad += 1
        seen = self.samples_ok + self.samples_bad
        if seen >= MIN_SAMPLES_FOR_BAD_FRACTION and self.samples_bad > self.max_bad_fraction * seen:
            raise RuntimeError(
                f"too many bad samples: {self.samples_bad} of {seen} "
                f"({100 * self.samples_bad / seen:.1f}%) > "
                f"data.max_bad_fraction={100 * self.max_bad_fraction:g}%; "
                f"see the warnings above for which shards and why")

    # -- a lane's slots ------------------------------------------------------------------

    def _read_shard(self, shard_index: int) -> list[Optional[dict]]:
        """The shard's raw samples in tar order, None for each counted sample that is missing."""
        name = self.shard_names[shard_index]
        path = str(Path(self.shard_dir) / name)
        count = self.shard_counts[shard_index]
        raw, error = read_raw_samples(path)
        if error is not None or len(raw) < count:
            cause = error or "the tar ends early"
            self._report_once(name, "", f"shard {path}: read {len(raw)} of {count} samples "
                                        f"({cause}); the rest are counted as bad")
        elif len(raw) > count:
            self._report_once(name, "", f"shard {path}: holds {len(raw)} samples but index.json "
                                        f"counts {count}; the extra ones are ignored")
        return (raw[:count] + [None] * count)[:count]

    def _slots(self, lane: int, skip: int) -> Iterator[Optional[dict]]:
        """The lane's decoded samples, one per slot (None if bad), from slot `skip` on."""
        epoch = 0
        while True:
            order = epoch_shard_order(len(self.shard_names), self.seed, epoch)
            for shard_index in order[lane::self.lanes]:
                shard_index = int(shard_index)
                count = self.shard_counts[shard_index]
                if skip >= count:  # resume: skip the whole shard by its count, unread
                    skip -= count
                    continue
                raw = self._read_shard(shard_index)
                sample_order = shard_sample_order(count, self.seed, epoch, shard_index)
                for position in sample_order[skip:]:
                    yield self._decode(shard_index, raw[position])
                raw = None  # let the shard go before the next one is read: one shard per lane in memory
                skip = 0
            epoch += 1

    def _decode(self, shard_index: int, raw: Optional[dict]) -> Optional[dict]:
        if raw is None:  # lost with a truncated shard, already reported with the shard
            self._count(ok=False)
            return None
        name = self.shard_names[shard_index]
        try:
            sample = decode_sample(raw, self.shapes, name)
        except BadSample as bad:
            self._report_once(name, bad.key, f"skipping bad sample: {bad}")
            self._count(ok=False)
            return None
        self._count(ok=True)
        return sample

    # -- this worker's parts of the rank's micro-batches ---------------------------------

    def parts(self, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        lanes = [lane for lane in range(self.lanes)
                 if lane % self.world_size == self.rank and (lane // self.world_size) % num_workers == worker]
        slots = {lane: self._slots(lane, slots_before(self.start_position, lane, self.lanes)) for lane in lanes}
        stream = self.rank * num_workers + worker
        start, step = self.start_position + self.rank, self.world_size * self.batch_size
        while True:
            positions = [p for p in range(start, start + step, self.world_size) if p % self.lanes in slots]
            samples = [next(slots[p % self.lanes]) for p in positions]
            good = [sample for sample in samples if sample is not None]
            part = collate(good) if good else {}
            part["positions"] = torch.tensor([p for p, x in zip(positions, samples) if x is not None], dtype=torch.long)
            part["bad_positions"] = torch.tensor([p for p, x in zip(positions, samples) if x is None], dtype=torch.long)
            # The counters live in the worker process; they travel with the part so that the training
            # process can log them (cumulative per stream).
            part["data_stats"] = [{"stream": stream, "ok": self.samples_ok, "bad": self.samples_bad}]
            yield part
            start += step

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.parts(worker, num_workers)


def merge_parts(parts: list[dict[str, Any]], batch_size: int) -> Optional[dict[str, Any]]:
    """One micro-batch from its workers' parts, rows in position order; the bad slots' rows are refilled by
    repeating the good samples. None when no part holds a good sample."""
    good = [part for part in parts if len(part["positions"])]
    positions = torch.cat([part["positions"] for part in parts] + [part["bad_positions"] for part in parts])
    stats = [s for part in parts for s in part["data_stats"]]
    if not good:
        return None
    joined = {name: torch.cat([part[name] for part in good]) for name in ARRAY_KEYS if name in good[0]}
    joined["caption"] = [c for part in good for c in part["caption"]]
    joined["keys"] = [k for part in good for k in part["keys"]]
    order = torch.argsort(torch.cat([part["positions"] for part in good]))
    rows = [int(order[i % len(order)]) for i in range(batch_size)]
    batch = {name: value[rows] for name, value in joined.items() if torch.is_tensor(value)}
    batch["caption"] = [joined["caption"][i] for i in rows]
    batch["keys"] = [joined["keys"][i] for i in rows]
    batch["positions"] = torch.sort(positions).values
    batch["data_stats"] = stats
    return batch


class ShardLoader:
    """Iterates a rank's micro-batches: W worker parts merged into each (see the module's docstring). A
    micro-batch without any good sample is stood in for by the next one that has one (with its own
    positions), so every position keeps its place."""

    def __init__(self, stream: ShardStream, num_workers: int):
        self.stream, self.num_workers = stream, num_workers
        # Workers ignore SLURM's stop signals (SLURM signals every process of a task): the main process
        # writes the checkpoint; a worker killed by SIGTERM would fail the run instead. Pinned batches let
        # the loop's host-to-GPU copies run asynchronously.
        self.loader = DataLoader(stream, batch_size=None, num_workers=num_workers, persistent_workers=False,
                                 pin_memory=torch.cuda.is_available(),
                                 worker_init_fn=ignore_stop_signals if num_workers else None)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        parts = iter(self.loader)
        width = max(1, self.num_workers)
        waiting: list[torch.Tensor] = []  # positions of micro-batches without a good sample
        while True:
            group = [next(parts) for _ in range(width)]
            batch = merge_parts(group, self.stream.batch_size)
            if batch is None:
                waiting.append(torch.sort(torch.cat([p["bad_positions"] for p in group])).values)
                continue
            for positions in waiting:  # stand-ins: the next good batch's data at their own positions
                yield {**batch, "positions": positions}
            waiting = []
            yield batch


def make_loader(shard_dir: Union[str, Path], batch_size: int, seed: int, rank: int = 0,
                world_size: int = 1, start_position: int = 0, num_workers: int = 0,
                max_bad_fraction: float = 0.01, lanes: int = 0) -> ShardLoader:
    """A rank's endless micro-batches from `start_position` on; num_workers=0 reads in this process."""
    stream = ShardStream(shard_dir, batch_size, seed, rank=rank, world_size=world_size,
                         start_position=start_position, max_bad_fraction=max_bad_fraction, lanes=lanes)
    return ShardLoader(stream, num_workers)
