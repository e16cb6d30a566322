"""The shapes backend's feature extractor: a small CNN trained on the shapes dataset with three heads
(shape, colour, position). Its penultimate layer (128-d) gives the features for FID; its heads give the
attribute accuracy that serves as the text-alignment score (the caption says shape, colour, position).

Input: 16 x 16 RGB in [0,1] (INPUT_SIZE). The dataset and the toy models make 32 px images, so a whole
image is shrunk 2x for FID-Whole and FID-Patch sees the 16 x 16 centre crop at full resolution: a real
patch (a quarter of the image, the inner corners of the quadrant shapes and the centre shape), like the
paper's 299 px crops of 1024 px images.

Trustworthy on generated images: it is trained on whole views of 32 px images degraded at random with
background tint, blur and noise (eval.images.random_augment), so that its accuracy does not collapse on
imperfect samples; eval/classifier_check.py shows that accuracy stays high under degradation while FID
rises with it.

The committed weights (assets/shapes_classifier.safetensors) were made by

    OMP_NUM_THREADS=1 python eval/shapes_classifier.py --out assets/shapes_classifier.safetensors

(defaults: 24000 images of ShapesDataset seed 1000, 8 epochs, batch 128, Adam 2e-3 with cosine decay,
seed 0; its training time and held-out accuracy: bench/README.md#measurements-behind-defaults).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.images import random_augment, to_tensor, whole_view  # noqa: E402
from trainer.data.shapes import COLOURS, POSITIONS, SHAPES, ShapesDataset  # noqa: E402

INPUT_SIZE = 16
FEATURE_DIM = 128
HEADS = {"shape": list(SHAPES), "colour": list(COLOURS), "position": list(POSITIONS)}
TRAIN_SEED = 1000  # dataset seeds: training 1000, held-out checks 2000+, the FID reference 10000
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "assets" / "shapes_classifier.safetensors"


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ShapesClassifier(nn.Module):
    """16x16 -> conv 32 (16x16) -> conv 64 (8x8) -> conv 128 (4x4) -> flatten -> 128 features -> 3 heads.
    Flattening (not global pooling) keeps where things are, which the position head needs."""

    def __init__(self, width: int = 32, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.config = {"width": width, "feature_dim": feature_dim, "input_size": INPUT_SIZE}
        w = width
        self.body = nn.Sequential(_block(3, w), _block(w, w), _block(w, 2 * w, 2), _block(2 * w, 2 * w),
                                  _block(2 * w, 4 * w, 2))
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * (INPUT_SIZE // 4) ** 2, feature_dim), nn.ReLU())
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, len(classes)) for name, classes in HEADS.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N,3,16,16] in [0,1] -> penultimate features [N,feature_dim]."""
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"the classifier takes {INPUT_SIZE}x{INPUT_SIZE} inputs, got {tuple(x.shape[-2:])}")
        return self.embed(self.body(x * 2 - 1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {name: head(f) for name, head in self.heads.items()}


ANY_POSITION = -1  # label of a caption without a position: every predicted position matches it


def labels_of(samples) -> torch.Tensor:
    """[N,3] class indices (shape, colour, position) for objects with .shape/.colour/.position or
    (shape, colour, position) tuples; a position of None (a caption that names none) is ANY_POSITION."""
    rows = []
    for s in samples:
        shape, colour, position = (s.shape, s.colour, s.position) if hasattr(s, "colour") else s
        rows.append([HEADS["shape"].index(shape), HEADS["colour"].index(colour),
                     ANY_POSITION if position is None else HEADS["position"].index(position)])
    return torch.tensor(rows, dtype=torch.long)


def render(count: int, seed: int, resolution: int = 32) -> tuple[np.ndarray, torch.Tensor]:
    """(uint8 images [N,H,W,3], labels [N,3]) of ShapesDataset(count, seed)."""
    data = ShapesDataset(count, seed=seed, resolution=resolution)
    items = [data[i] for i in range(count)]
    return np.stack([it.image for it in items]), labels_of(items)


@torch.no_grad()
def predict(model: ShapesClassifier, views: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N,D], predicted labels [N,3]) of ready views [N,3,16,16]."""
    model.eval()
    feats, preds = [], []
    for i in range(0, len(views), batch_size):
        f = model.features(views[i:i + batch_size])
        feats.append(f)
        preds.append(torch.stack([model.heads[name](f).argmax(1) for name in HEADS], 1))
    return torch.cat(feats), torch.cat(preds)


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Per-head accuracy, their mean ("attribute accuracy", the alignment score) and all-three-right."""
    hits = (pred == labels).float()
    out = {name: float(hits[:, i].mean()) for i, name in enumerate(HEADS)}
    out["attribute_acc"] = float(hits.mean())
    out["all_acc"] = float(hits.all(1).float().mean())
    return out


def train(count: int = 24000, epochs: int = 8, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
          data_seed: int = TRAIN_SEED, log_every: int = 50, progress: bool = True) -> ShapesClassifier:
    """Trains from scratch on ShapesDataset(count, data_seed), fresh random degradations every batch."""
    images, labels = render(count, data_seed)
    x_all = to_tensor(images)  # [N,3,32,32]: augmented at full resolution, then shrunk like a whole view
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = ShapesClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * math.ceil(count / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    step, start = 0, time.time()
    for epoch in range(epochs):
        order = torch.randperm(count, generator=gen)
        for i in range(0, count, batch_size):
            idx = order[i:i + batch_size]
            x = F.interpolate(random_augment(x_all[idx], gen), size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear",
                              align_corners=False, antialias=True)
            out = model(x)
            loss = sum(F.cross_entropy(out[name], labels[idx, j]) for j, name in enumerate(HEADS))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if progress and (step % log_every == 0 or step == steps):
                print(f"epoch {epoch} step {step}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f} s)", flush=True)
    return model.eval()


def save(model: ShapesClassifier, path: Path, info: dict | None = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"config": json.dumps(model.config), "heads": json.dumps(HEADS), **{k: str(v) for k, v in (info or {}).items()}}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)
    return path


def load(path: Path | str = DEFAULT_WEIGHTS) -> ShapesClassifier:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no shapes classifier at {path}: train one with "
                                f"`python eval/shapes_classifier.py --out {path}`")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if json.loads(meta.get("heads", "null")) != HEADS:
        raise ValueError(f"{path}: classifier heads {meta.get('heads')} do not match this code's {HEADS}")
    config = json.loads(meta["config"])
    model = ShapesClassifier(width=config["width"], feature_dim=config["feature_dim"])
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Train the shapes classifier (the shapes backend's feature extractor).")
    p.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS)
    p.add_argument("--count", type=int, default=24000)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    start = time.time()
    model = train(args.count, args.epochs, args.batch_size, args.lr, args.seed)
    held_images, held_labels = render(2000, seed=2000)
    _, pred = predict(model, whole_view(held_images, INPUT_SIZE))
    acc = accuracy(pred, held_labels)
    command = "python eval/shapes_classifier.py " + " ".join(argv if argv is not None else sys.argv[1:])
    save(model, args.out, {"command": command, "heldout_clean": json.dumps(acc)})
    print(json.dumps({"out": str(args.out), "seconds": round(time.time() - start), "heldout_clean": acc}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
