"""Checkpoints that a crash cannot corrupt.

Layout under a job's `ckpt/` folder:
    samples-000000004096/        one complete checkpoint (the job's last one: samples-...-final/)
        student/state/...        DeepSpeed checkpoint of each engine (all ranks write their partitions)
        ema.safetensors          extra fp32 tensors (e.g. the EMA weights), rank 0
        trainer_state.json       samples seen, optimizer steps, loader position, job name
    LATEST                       the name of the newest complete checkpoint

A checkpoint is written under `<name>.tmp/` and renamed to `<name>/` only when every rank finished;
`LATEST` is then replaced atomically, and only after that are old checkpoints pruned (keep_last).
A crash at any point leaves LATEST naming a complete checkpoint.

Another world size. ZeRO partitions the fp32 weights and Adam moments by rank, and DeepSpeed refuses a
checkpoint written at another data-parallel size. `load` then converts each engine's checkpoint once into
DeepSpeed's universal checkpoint (`<engine>/state_universal/`: every parameter and optimizer state whole;
rank 0 runs `deepspeed.checkpoint.ds_to_universal`, the other ranks wait) and loads that, re-partitioned
for the ranks at hand.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from trainer.runtime.collectives import any_rank, barrier, is_main, world_size

ENGINE_TAG = "state"
UNIVERSAL_TAG = "state_universal"


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (e.g. disk full); the previous one is untouched."""


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CheckpointManager:
    def __init__(self, root: Path, keep_last: int = 2):
        self.root = Path(root)
        self.keep_last = keep_last

    def latest(self) -> Optional[Path]:
        marker = self.root / "LATEST"
        if not marker.is_file():
            return None
        path = self.root / marker.read_text().strip()
        if not (path / "trainer_state.json").is_file():
            raise RuntimeError(f"{marker} names '{path.name}', which is not a complete checkpoint")
        return path

    def save(self, engines: dict, state: dict, tensors: Optional[dict[str, dict[str, torch.Tensor]]] = None) -> Path:
        """Collective: every rank calls it. `state` must be JSON-serialisable and identical on all ranks."""
        # The job's last checkpoint gets its own name, so it never replaces a periodic one of the same count
        # (deleting the folder LATEST names, even for a moment, is what this module exists to avoid).
        name = f"samples-{state['samples_seen']:012d}" + ("-final" if state.get("done") else "")
        final, tmp = self.root / name, self.root / f"{name}.tmp"
        if is_main():
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("*.tmp"):  # left by a crash mid-write
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink()
            tmp.mkdir()
        barrier()
        failure = None
        try:
            for engine_name, engine in engines.items():
                engine.save_checkpoint(str(tmp / engine_name), tag=ENGINE_TAG, save_latest=False)
            if is_main():
                for file_name, tensor_dict in (tensors or {}).items():
                    save_file({k: v.detach().contiguous().cpu() for k, v in tensor_dict.items()}, str(tmp / file_name))
                _write_atomic(tmp / "trainer_state.json", json.dumps(state, indent=1))
        except OSError as err:  # disk full, quota, a vanished mount: say so, keep the last good one
            failure = err
        if any_rank(failure is not None):  # every rank stops, not only the one whose write failed
            if is_main():
                shutil.rmtree(tmp, ignore_errors=True)
            last = self.root / "LATEST"
            kept = f"the last complete checkpoint ({last.read_text().strip()}) is intact" if last.is_file() else "no earlier checkpoint exists"
            raise CheckpointWriteError(f"writing checkpoint {tmp} failed: {failure or 'on another rank'}; {kept}")
        if is_main():
            if final.exists():  # a stale copy from an earlier attempt that never became LATEST
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_atomic(self.root / "LATEST", name)
            self._prune(keep=name)
        barrier()
        return final

    def _prune(self, keep: str) -> None:
        complete = sorted(p for p in self.root.glob("samples-*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in complete[:-self.keep_last]:
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def read_state(path: Path) -> dict:
        return json.loads((Path(path) / "trainer_state.json").read_text())

    def load(self, path: Path, engines: dict, saved_world_size: int) -> dict:
        """Restores every engine (weights, optimizer moments, DeepSpeed counters), re-partitioned through the
        universal checkpoint when `saved_world_size` is not this run's, and returns the trainer state.
        Collective. Extra tensors are read with `load_tensors`."""
        from trainer.runtime.preemption import solo

        other_size = saved_world_size != world_size()
        for engine_name, engine in engines.items():
            folder = path / engine_name
            if other_size:
                solo(f"converting {folder} for {world_size()} ranks (written by {saved_world_size})",
                     lambda: to_universal(folder))
            engine._config.load_universal_checkpoint = other_size  # DeepSpeed reads it at load time
            try:
                load_path, _ = engine.load_checkpoint(str(folder), tag=UNIVERSAL_TAG if other_size else ENGINE_TAG)
            finally:
                engine._config.load_universal_checkpoint = False
            if load_path is None:
                raise RuntimeError(f"DeepSpeed could not load '{folder}'")
        return self.read_state(path)

    @staticmethod
    def load_tensors(path: Path, file_name: str, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Extra tensors of a checkpoint, placed on `device` (the module's, e.g. for the EMA)."""
        return load_file(str(path / file_name), device=str(device))


def fp32_weights(checkpoint: Path, engine_name: str = "student") -> dict[str, torch.Tensor]:
    """The fp32 master weights of a ZeRO checkpoint, consolidated across ranks' partitions."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint / engine_name), tag=ENGINE_TAG)
    return {k: v.float() for k, v in state.items()}


def to_universal(engine_dir: Path) -> Path:
    """DeepSpeed's universal checkpoint of a ZeRO checkpoint, beside it (written once, atomically)."""
    out = Path(engine_dir) / UNIVERSAL_TAG
    if out.is_dir():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # A process of its own: the converter forks workers, which a process holding a GPU context must not do.
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                           str(Path(engine_dir) / ENGINE_TAG), "--output_folder", str(tmp), "--num_extract_workers", "1",
                           "--num_merge_workers", "1", "--inject_missing_state"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"converting {engine_dir} to a universal checkpoint failed: {proc.stderr.strip()[-2000:]}")
    (Path(engine_dir) / "latest_universal").unlink(missing_ok=True)  # the converter's pointer; tags are explicit here
    os.replace(tmp, out)
    return out
