"""Gradient checkpointing on and off for the toy's adversarial stage, alternated in one run (this machine's
speed drifts), and whether the two end bit-identical.

  python bench/checkpointing_ab.py [--work /tmp/checkpointing_ab] [--repeats 2] [--samples 640]

Once: stage1_32 for `--samples` samples from the committed teacher (its export is stage2_8's teacher). Then,
`--repeats` times each, alternating: stage2_8 (LoRA adv_cond, LoRA adv_uncond, full adv_uncond; `--samples`
each) from a copy of that, with `model.gradient_checkpointing` (D follows it) on or off. Prints each run's
wall time and per-phase median samples/s (bench/phase_speeds.py), the ratio of the mean wall times, and
whether every run's stage2_8 export has the same weights.
"""
import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/checkpointing_ab.py` from a clone
    sys.path.insert(0, str(ROOT))

from bench.phase_speeds import phase_speeds  # noqa: E402


def trainer_run(out: Path, log: Path, *overrides: str) -> float:
    cmd = [sys.executable, "-m", "trainer.run", "--config", "configs/shapes.yaml", "--set", f"run.out_dir={out}"]
    for item in overrides:
        cmd += ["--set", item] if "=" in item else [item]
    start = time.perf_counter()
    with open(log, "w") as handle:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"trainer.run exited {rc}: see {log}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/checkpointing_ab"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--samples", type=int, default=640)
    args = parser.parse_args()
    base = args.work / "base"
    if not (base / "exports" / "stage1_32" / "export.json").is_file():
        base.mkdir(parents=True, exist_ok=True)
        trainer_run(base, args.work / "base.log", "--jobs", "stage1_32", f"stages.0.samples={args.samples}")

    walls: dict[bool, list[float]] = {True: [], False: []}
    exports = []
    for repeat in range(args.repeats):
        for on in (True, False):
            out = args.work / f"checkpointing_{'on' if on else 'off'}_{repeat}"
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(base, out, ignore=shutil.ignore_patterns("tb", "grids"))
            flag = str(on).lower()
            wall = trainer_run(out, args.work / f"{out.name}.log", "--jobs", "stage2_8",
                               f"stages.1.samples={args.samples}", f"stages.1.full_samples={args.samples}",
                               f"model.gradient_checkpointing={flag}")  # D follows the student's setting
            walls[on].append(wall)
            exports.append(out / "exports" / "stage2_8" / "unet" / "diffusion_pytorch_model.safetensors")
            speeds = "  ".join(f"{name} {value:.1f}" for name, value in phase_speeds(out, "stage2_8").items())
            print(f"checkpointing {'on ' if on else 'off'} run {repeat}: {wall:6.1f} s   samples/s: {speeds}", flush=True)

    on, off = statistics.mean(walls[True]), statistics.mean(walls[False])
    print(f"mean wall: on {on:.1f} s, off {off:.1f} s; off is {on / off:.3f}x as fast")
    first = load_file(str(exports[0]))
    same = all(all(torch.equal(first[k], t) for k, t in load_file(str(path)).items()) for path in exports[1:])
    print(f"stage2_8 exports bit-identical across all {len(exports)} runs: {same}")


if __name__ == "__main__":
    main()
