"""Metrics out of the training process: TensorBoard event files (scalars, sample grids) and a JSON-lines
copy of every scalar (easy to diff between runs, read by the tests). Only rank 0 writes.

A job that resumes from a checkpoint at `resume_at` samples logs again what it logged after that point
before it stopped (the steps between the last checkpoint and a kill). So a tracker opened at `resume_at`
drops those rows from metrics.jsonl and has TensorBoard purge the events at later steps from the older
event files (SummaryWriter's purge_step): every step appears once."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np


class Tracker:
    def __init__(self, log_dir: Path, enabled: bool = True, resume_at: int = 0):
        self.enabled = enabled
        self.log_dir = Path(log_dir)
        self._tb = None
        self._jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.log_dir.mkdir(parents=True, exist_ok=True)
            _drop_rows_after(self.log_dir / "metrics.jsonl", resume_at)
            self._tb = SummaryWriter(str(self.log_dir), purge_step=resume_at + 1)
            self._jsonl = open(self.log_dir / "metrics.jsonl", "a")

    def scalars(self, values: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        for key, value in values.items():
            self._tb.add_scalar(key, value, step)
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        if self.enabled:
            self._tb.add_image(tag, image, step, dataformats="HWC")
            self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()


def _drop_rows_after(path: Path, step: int) -> None:
    """Keeps the rows logged at or before `step` (atomically: a crash here leaves the old file)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


def read_metrics(log_dir: Path, key: Optional[str] = None) -> list[dict]:
    rows = [json.loads(line) for line in (Path(log_dir) / "metrics.jsonl").read_text().splitlines() if line]
    return [r for r in rows if key is None or key in r]
