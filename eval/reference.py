"""Reference image sets and the prompts that go with them.

- "shapes": ShapesDataset(count, seed=REFERENCE_SEED) at the toy resolution: its images are the reference
  and its captions are the prompts (as the paper uses COCO prompts and the COCO images of those prompts);
  drawn with the data's `options` (trainer.data.shapes.ShapesOptions: position-free captions, stripes, dots).
  The seed is held out from the trainer's data (seed 0 by default) and the classifier's (1000, 2000+).
- a folder: image files (png, jpg, jpeg, webp, bmp), sorted by name; a same-named .txt next to an image is
  its caption. `--prompts FILE` (one prompt a line) gives the prompts instead, e.g. the first 10K COCO
  validation captions with a folder of COCO validation images.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

REFERENCE_SEED = 10_000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ReferenceSet:
    def __init__(self, source: str, count: int, resolution: int = 32, prompts_file: Optional[Path] = None,
                 seed: int = REFERENCE_SEED, options=None):
        self.source = source
        if source == "shapes":
            from trainer.data.shapes import PLAIN, ShapesDataset

            self._data = ShapesDataset(count, seed=seed, resolution=resolution, options=options or PLAIN)
            self._files = None
            self.captions = [self._data[i].caption for i in range(count)]
        else:
            folder = Path(source)
            if not folder.is_dir():
                raise FileNotFoundError(f"reference {source!r} is neither 'shapes' nor a folder of images")
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if len(files) < count:
                raise ValueError(f"reference folder {folder} has {len(files)} images, --count asks for {count}")
            self._files = files[:count]
            self.captions = [p.with_suffix(".txt").read_text().strip() if p.with_suffix(".txt").is_file() else None
                             for p in self._files]
        if prompts_file is not None:
            prompts = [line.strip() for line in Path(prompts_file).read_text().splitlines() if line.strip()]
            if len(prompts) < count:
                raise ValueError(f"{prompts_file} has {len(prompts)} prompts, --count asks for {count}")
            self.prompts = prompts[:count]
        else:
            if any(c is None for c in self.captions):
                raise ValueError(f"reference folder {source} lacks captions (name.txt next to name.png) for some "
                                 "images: pass --prompts FILE")
            self.prompts = list(self.captions)
        self.count = count

    def same_prompts(self, seed: int) -> "ReferenceSet":
        """Shapes only: new real images of the same captions (new size and jitter from `seed`). Scored
        against this set they give the FID floor that a perfect model reaches with this many images:
        generated sets share the reference's captions, so the floor must too (an independent set adds
        the spread of its caption mix, which generated sets do not have)."""
        if self._files is not None:
            raise ValueError("same_prompts needs the shapes reference")
        other = copy.copy(self)
        other._data = _Rerendered(self._data, seed)
        return other

    def batches(self, batch_size: int) -> Iterator[tuple[list[np.ndarray], list[Optional[str]]]]:
        """(images uint8 HxWx3, their captions or None) in order."""
        from PIL import Image

        for start in range(0, self.count, batch_size):
            idx = range(start, min(start + batch_size, self.count))
            if self._files is None:
                images = [self._data[i].image for i in idx]
            else:
                images = [np.asarray(Image.open(self._files[i]).convert("RGB")) for i in idx]
            yield images, [self.captions[i] for i in idx]


class _Rerendered:
    """ShapesDataset items with their captions kept and the rest drawn again from (seed, index)."""

    def __init__(self, data, seed: int):
        self.data, self.seed = data, seed

    def __getitem__(self, index: int):
        return self.data.redrawn(index, self.seed)
