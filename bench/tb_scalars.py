"""A run's per-phase TensorBoard scalars, as the benchmarks read them back (bench/phase_speeds.py,
bench/probe_curves.py)."""
from __future__ import annotations

from pathlib import Path


def phase_scalars(run_dir: Path, tag_suffix: str, stage: str = "*") -> dict[str, list[tuple[int, float]]]:
    """{"<stage>.<phase>": [(step, value), ...] in logged order} of the scalar whose tag ends with
    `tag_suffix`, for every phase of `stage` (a glob) in `run_dir` that logged it. Every event is kept (no
    reservoir sampling: a long run logs more than TensorBoard's default 10,000)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = {}
    for tb in sorted(Path(run_dir).glob(f"jobs/{stage}/*/tb")):
        acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
        acc.Reload()
        tag = next((t for t in acc.Tags()["scalars"] if t.endswith(tag_suffix)), None)
        if tag:
            found[tb.parent.name] = [(e.step, e.value) for e in acc.Scalars(tag)]
    return found
