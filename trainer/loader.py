"""Streaming, deterministic, resumable batches from the shards.

Order. Epoch e permutes the shard list with rng(seed, e). The R ranks x W workers are R*W
"streams"; stream s = rank * W + worker takes shards s, s + R*W, ... of that permutation, so no
sample is read twice in an epoch. Inside a shard the samples are permuted with
rng(seed, e, shard_index). Each stream runs epoch after epoch, forever.

Slots. A stream's sequence is a sequence of slots, one per sample that index.json counts.
Batch j of a stream is built from slots [j*B, (j+1)*B). Because a batch's position depends only
on the counts in index.json and never on what was decodable, a resume can skip whole shards by
their counts without reading them and still land on exactly the same batches, bad samples
included. A bad slot (undecodable sample, or the unread tail of a truncated shard) is dropped
and the batch is refilled by repeating its good samples, so every batch has B samples; a window
with no good sample at all is stood in for by the next window that has one.

Workers. DataLoader hands out worker batches round-robin: batch b of a rank came from worker
b % W, and a fresh DataLoader starts again at worker 0. So a rank resuming after `start_batch`
batches gives worker w the role r = (start_batch + w) % W of the uninterrupted run: stream
rank * W + r, skipping count_for_worker(start_batch, r, W) batches of that stream.
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

from .preemption import ignore_in_worker as ignore_stop_signals
from .shards import BadSample, decode_sample, read_index
from .tarscan import read_plain_shard

logger = logging.getLogger(__name__)

# Below this many samples a bad fraction says little (one bad sample in three is 33%).
MIN_SAMPLES_FOR_BAD_FRACTION = 100
ARRAY_KEYS = ("latent", "prompt_embeds", "pooled", "time_ids")
# What a truncated or corrupt tar raises while being read.
READ_ERRORS = (OSError, EOFError, tarfile.TarError, ValueError)


def count_for_worker(start_batch: int, worker: int, num_workers: int) -> int:
    """How many of a rank's first `start_batch` batches came from `worker` (round-robin)."""
    num_workers = max(1, num_workers)
    return max(0, (start_batch - worker + num_workers - 1) // num_workers)


def epoch_shard_order(num_shards: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_shards)


def shard_sample_order(count: int, seed: int, epoch: int, shard_index: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, shard_index]).permutation(count)


def read_raw_samples(path: str) -> tuple[list[dict], Optional[str]]:
    """All samples of one tar as dicts of bytes (or memoryviews), in tar order, plus the read error if any.

    Samples read before an error are kept: a truncated shard loses only its tail.
    """
    try:
        fast = read_plain_shard(path)  # the project's own shards: one read, no copies (trainer/tarscan.py)
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
    intra-op threads, which on a loaded CPU made a batch 300x slower (bench/loader.py). (Building the
    batch directly in shared memory for the worker hand-over measured no faster: 1250-1310 vs
    1100-1310 samples/s with 2 workers, SDXL-size samples; not kept.)"""
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


class ShardStream(IterableDataset):
    """Endless batches (dicts of stacked tensors in the shards' float dtype, `caption` and `keys` lists) from a
    shard directory, split over ranks and DataLoader workers, resumable at `start_batch`.

    `num_workers` only checks early that there are enough shards; the worker count in effect
    is DataLoader's. `samples_ok` / `samples_bad` count in the process that iterates.
    """

    def __init__(self, shard_dir: Union[str, Path], batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, start_batch: int = 0, num_workers: int = 0,
                 max_bad_fraction: float = 0.01):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        if not 0 <= max_bad_fraction < 1:
            raise ValueError(f"max_bad_fraction must be in [0, 1), got {max_bad_fraction}")
        index = read_index(shard_dir)
        self.shard_dir = str(shard_dir)
        self.shard_names = [shard["name"] for shard in index["shards"]]
        self.shard_counts = [int(shard["count"]) for shard in index["shards"]]
        if any(count < 1 for count in self.shard_counts):
            raise ValueError(f"{shard_dir}/index.json lists an empty shard")
        self.shapes = index["shapes"]
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_batch = start_batch
        self.max_bad_fraction = max_bad_fraction
        self.samples_ok = 0
        self.samples_bad = 0
        self._reported: set[tuple[str, str]] = set()
        self.check_enough_shards(max(1, num_workers))

    def check_enough_shards(self, num_workers: int) -> None:
        streams = self.world_size * num_workers
        if len(self.shard_names) < streams:
            raise ValueError(
                f"{len(self.shard_names)} shards in {self.shard_dir} cannot feed {streams} "
                f"streams (world_size {self.world_size} x {num_workers} loader workers): each "
                f"stream needs its own shards. Write more, smaller shards (lower the encoder's "
                f"samples_per_shard) or use fewer workers.")

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

    # -- the slot sequence ---------------------------------------------------------------

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

    def _slots(self, stream: int, num_streams: int, skip: int) -> Iterator[Optional[dict]]:
        """This stream's decoded samples, one per slot (None if bad), from slot `skip` on."""
        epoch = 0
        while True:
            order = epoch_shard_order(len(self.shard_names), self.seed, epoch)
            for shard_index in order[stream::num_streams]:
                shard_index = int(shard_index)
                count = self.shard_counts[shard_index]
                if skip >= count:  # resume: skip the whole shard by its count, unread
                    skip -= count
                    continue
                raw = self._read_shard(shard_index)
                sample_order = shard_sample_order(count, self.seed, epoch, shard_index)
                for position in sample_order[skip:]:
                    yield self._decode(shard_index, raw[position])
                raw = None  # let the shard go before the next one is read: one shard in memory, not two
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

    # -- batches -------------------------------------------------------------------------

    def _batches(self, slots: Iterator[Optional[dict]], stream: int) -> Iterator[dict[str, Any]]:
        empty_windows = 0
        while True:
            window = [next(slots) for _ in range(self.batch_size)]
            good = [sample for sample in window if sample is not None]
            if not good:  # stood in for by the next window with data, to keep positions
                empty_windows += 1
                continue
            batch = collate([good[i % len(good)] for i in range(self.batch_size)])
            # The counters live in the worker process; they travel with the batch so that the
            # training process can log them (cumulative per stream).
            batch["data_stats"] = {"stream": stream, "ok": self.samples_ok, "bad": self.samples_bad}
            for _ in range(empty_windows + 1):
                yield dict(batch)  # stand-ins are separate dicts, sharing the tensors
            empty_windows = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        self.check_enough_shards(num_workers)
        # A fresh DataLoader starts its round-robin at worker 0, but batch `start_batch` came
        # from worker start_batch % W: so worker w takes over the role (stream and position)
        # of the worker that produced batch start_batch + w in the uninterrupted run.
        role = (self.start_batch + worker) % num_workers
        stream = self.rank * num_workers + role
        skip_batches = count_for_worker(self.start_batch, role, num_workers)
        slots = self._slots(stream, self.world_size * num_workers, skip_batches * self.batch_size)
        return self._batches(slots, stream)


def make_loader(shard_dir: Union[str, Path], batch_size: int, seed: int, rank: int = 0,
                world_size: int = 1, start_batch: int = 0, num_workers: int = 0,
                max_bad_fraction: float = 0.01) -> DataLoader:
    """A DataLoader over a ShardStream; num_workers=0 iterates in this process."""
    stream = ShardStream(shard_dir, batch_size, seed, rank=rank, world_size=world_size,
                         start_batch=start_batch, num_workers=num_workers,
                         max_bad_fraction=max_bad_fraction)
    # The stream batches itself; persistent workers would keep a stale resume position.
    # Pinned batches let the loop's host-to-GPU copies run asynchronously.
    # Workers ignore SLURM's stop signals (SLURM signals every process of a task): the main process
    # writes the checkpoint; a worker killed by SIGTERM would fail the run instead.
    return DataLoader(stream, batch_size=None, num_workers=num_workers, persistent_workers=False,
                      pin_memory=torch.cuda.is_available(),
                      worker_init_fn=ignore_stop_signals if num_workers else None)
