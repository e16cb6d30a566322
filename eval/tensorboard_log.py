"""Evaluation results into a TensorBoard event file: per evaluated model (stage) its scalars against
the sampling steps, and the comparison grid. `tensorboard --logdir <out>/tb`."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np

SCALARS = ("fid_whole", "fid_patch", "alignment", "sec_per_image")


def _tag(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", label)


def write_eval_tensorboard(log_dir: str | Path, rows: list[dict], grid: Optional[np.ndarray] = None,
                           table_markdown: Optional[str] = None) -> Path:
    """Scalars `eval/<metric>/<label>` at global step = sampling steps (one curve per stage/model, so
    FID vs steps reads straight off TensorBoard), the grid as image `eval/comparison_grid`, the table as
    text `eval/table`."""
    from torch.utils.tensorboard import SummaryWriter

    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(str(log_dir))
    try:
        for row in rows:
            for key in SCALARS:
                value = row.get(key)
                if value is not None:
                    writer.add_scalar(f"eval/{key}/{_tag(row['label'])}", float(value), int(row["steps"]))
        if grid is not None:
            writer.add_image("eval/comparison_grid", grid, 0, dataformats="HWC")
        if table_markdown:
            writer.add_text("eval/table", table_markdown, 0)
    finally:
        writer.close()
    return log_dir
