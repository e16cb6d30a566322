"""Where a toy model's background grain comes from: its denoiser, or its own sampling trajectory.

The shapes dataset's background is flat, and eval/pixel_scores.py's background grain (std of the unsaturated
pixels, /255) of real images is only their anti-aliased edges. For each timestep t this measures the grain of
the model's x0 prediction two ways, on the same captions:

- **from real x_t**: a real image noised to t, one model call. This is the denoiser's own error at t: if it is
  near the real images' grain, the network removes noise of that level from a flat background.
- **along its trajectory**: the x0 prediction at each step of the model's own deterministic sampling (trailing
  timesteps, the export's guidance), from seeded noise. Where this rises above the first curve, the model is
  committing grain from its own earlier predictions, which the later low-noise steps keep as signal.

    python bench/grain_origin.py [--model assets/shapes_teacher] [--steps 32] [--count 128] [--out DIR]

Prints a table; with --out also writes grain_origin.{md,json,png}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/grain_origin.py` from a clone
    sys.path.insert(0, str(ROOT))

from eval.pixel_scores import score_images  # noqa: E402
from eval.plot import line_panel, save_png  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.data.encoders import load_encoders  # noqa: E402
from trainer.data.shapes import ShapesDataset  # noqa: E402
from trainer.export import prediction_type_of, read_manifest  # noqa: E402
from trainer.method.models import Conditioning, guided_denoiser, load_unet  # noqa: E402
from trainer.method.sampling import to_uint8  # noqa: E402
from trainer.method.schedule import NoiseSchedule, trailing_timesteps  # noqa: E402

IMAGE_SEED = 20_261_206  # captions and images apart from the training set's seed 0
NOISE_SEED = 1234


def grain(latents: torch.Tensor, codec, captions: list[str]) -> float:
    return score_images(to_uint8(codec.decode(latents.float())), captions)["background_grain"]


@torch.no_grad()
def measure(model: Path, schedule: NoiseSchedule, steps: int, count: int, guidance: float | None = None) -> dict:
    """{"real": grain of the real images, "guidance", "from_real": {t: grain}, "trajectory": {t: grain}, "final"}."""
    encoders = load_encoders(model, torch.device("cpu"))
    unet = load_unet(model).eval().requires_grad_(False)
    pred = prediction_type_of(model, "epsilon")
    if guidance is None:
        manifest = model / "export.json"
        guidance = float(read_manifest(model).get("guidance", 1.0)) if manifest.is_file() else 1.0
    res = encoders.resolution
    data = ShapesDataset(count, seed=IMAGE_SEED, resolution=res)
    samples = [data[i] for i in range(count)]
    captions = [s.caption for s in samples]
    images = np.stack([np.asarray(s.image) for s in samples])
    x0 = encoders.codec.encode(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)
    denoise = guided_denoiser(unet, Conditioning.for_captions(encoders, captions), guidance)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(NOISE_SEED))

    def x0_eps(x_t: torch.Tensor, t: int):
        ts = torch.full((count,), t, dtype=torch.long)
        return schedule.to_x0_eps(denoise(x_t, ts), x_t, ts, pred)

    grid = trailing_timesteps(steps, schedule.num_train_timesteps)
    from_real = {}
    for t in grid:
        x_t = schedule.add_noise(x0, eps, torch.full((count,), t, dtype=torch.long))
        from_real[t] = grain(x0_eps(x_t, t)[0], encoders.codec, captions)
    predictions, final = sample_with_predictions(x0_eps, schedule, eps, grid)
    trajectory = {t: grain(x0_hat, encoders.codec, captions) for t, x0_hat in predictions.items()}
    shown = model.resolve().relative_to(ROOT) if model.resolve().is_relative_to(ROOT) else model
    return {"model": str(shown), "steps": steps, "count": count, "guidance": guidance,
            "real": score_images(images, captions)["background_grain"], "from_real": from_real,
            "trajectory": trajectory, "final": grain(final, encoders.codec, captions)}


def sample_with_predictions(x0_eps, schedule: NoiseSchedule, noise: torch.Tensor, grid: list[int]):
    """Deterministic sampling on `grid` from unit `noise` (the DDIM move, which is the exported Euler scheduler's
    step on trailing timesteps): ({t: the x0 prediction at t}, the final sample)."""
    predictions = {}
    # diffusers' Euler (trailing) starts from noise x sigma_max, which reaches the network as sigma_T x noise
    x_t = schedule.alpha_sigma(torch.tensor([grid[0]]))[1] * noise
    for t, t_next in zip(grid, grid[1:] + [-1]):
        x0_hat, eps_hat = x0_eps(x_t, t)
        predictions[t] = x0_hat
        x_t = schedule.renoise(x0_hat, eps_hat, torch.full((len(noise),), t_next, dtype=torch.long))
    return predictions, x_t


def render(result: dict) -> str:
    lines = [f"# Background grain by timestep: {result['model']}", "",
             f"{result['count']} images, {result['steps']} trailing steps, guidance {result['guidance']:g}; "
             f"real images: {result['real']:.2f}/255 (their anti-aliased edges); the sampled images: "
             f"{result['final']:.2f}/255.", "",
             "| t | x0 from real x_t | x0 along the model's trajectory |", "|---|---|---|"]
    for t, g in result["from_real"].items():
        lines.append(f"| {t} | {g:.2f} | {result['trajectory'][t]:.2f} |")
    return "\n".join(lines) + "\n"


def chart(result: dict):
    series = {"x0 from real x_t": [(float(t), g) for t, g in result["from_real"].items()],
              "x0 along its own trajectory": [(float(t), g) for t, g in result["trajectory"].items()],
              "real images": [(float(t), result["real"]) for t in result["from_real"]]}
    return line_panel(series, "background grain of the x0 prediction", "timestep t", "grain /255",
                      size=(560, 360), log2_x=False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "assets" / "shapes_teacher")
    p.add_argument("--config", default=str(ROOT / "configs" / "shapes.yaml"), help="for the noise schedule")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--count", type=int, default=128)
    p.add_argument("--guidance", type=float, default=None, help="default: the export's")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    schedule = NoiseSchedule.from_config(load_config(args.config).schedule)
    result = measure(args.model, schedule, args.steps, args.count, args.guidance)
    text = render(result)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "grain_origin.md").write_text(text)
        (args.out / "grain_origin.json").write_text(json.dumps(result, indent=1))
        save_png(chart(result), args.out / "grain_origin.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
