"""The randomness of a micro-step, keyed by sample rather than by batch.

Every random draw a sample needs (its noise, its timestep, its t*, its caption dropout) comes from a
generator of its own, seeded by (seed, the sample's position in the job: the loader's `positions`,
trainer/data/loader.py). How samples are grouped into micro-batches, accumulation steps and ranks therefore
changes nothing: a step of 4 micro-batches of 8 draws exactly what one micro-batch of 32 draws, and a run
on 2 ranks what a run on 1 rank draws for the same global batch. That is what makes gradient accumulation
equal to a larger micro-batch, and a resume (on any world size) continue the same run.

Draws are made on the CPU, where every device and rank count reproduces them; the objectives copy
them to the device without blocking.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def sample_seed(seed: int, position: int) -> int:
    words = np.random.SeedSequence([seed, position]).generate_state(2)
    return int(words[0]) << 32 | int(words[1])


class SampleRandom:
    """One generator per sample of a micro-batch, seeded by (seed, the sample's position in the job)."""

    def __init__(self, seed: int, positions: Sequence[int]):
        self.positions = [int(p) for p in positions]
        self.generators = [torch.Generator().manual_seed(sample_seed(seed, p)) for p in self.positions]

    def __len__(self) -> int:
        return len(self.positions)

    def randn(self, shape: Sequence[int]) -> torch.Tensor:
        """[count, *shape] standard normal; `shape` is one sample's."""
        return torch.stack([torch.randn(tuple(shape), generator=g) for g in self.generators])

    def randint(self, high: int) -> torch.Tensor:
        """[count] integers in [0, high)."""
        return torch.cat([torch.randint(0, high, (1,), generator=g) for g in self.generators])

    def rand(self) -> torch.Tensor:
        """[count] uniform in [0, 1)."""
        return torch.cat([torch.rand(1, generator=g) for g in self.generators])

    def choice(self, weights: torch.Tensor) -> torch.Tensor:
        """[count] indices drawn with the given (unnormalised) weights."""
        return torch.cat([torch.multinomial(weights, 1, generator=g) for g in self.generators])
