"""Datasets fetched one batch at a time."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset

from datamodules.corruption import make_stack
from datamodules.training_order import split_keys


class BatchedDataset(Dataset):
    """The DataLoader calls ``__getitems__(indices)`` with a whole batch, so reads, flips and
    corruption run once per batch, vectorised; single items take the same path."""

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        raise NotImplementedError


class CorruptedImages(BatchedDataset):
    """``length`` clean images read by ``fetch(indices) -> float [B, C, H, W]`` in [0, 1]; every
    fetch flips them horizontally (p = 0.5) if ``flip`` and draws new corrupted views
    (``make_stack`` with ``corruption``): items ``[k_max + 1, C, H, W]``.

    Keys from ``EpochSampler`` (``SampleKey``) draw each item's flip and views from its own
    generator, a function of (seed, epoch, index); plain indices draw from torch's global RNG."""

    def __init__(
        self,
        fetch: Callable[[list[int]], torch.Tensor],
        length: int,
        k_max: int,
        corruption: dict[str, Any],
        flip: bool = False,
    ):
        self.fetch = fetch
        self.length = length
        self.k_max = k_max
        self.corruption = corruption
        self.flip = flip

    def __len__(self) -> int:
        return self.length

    def __getitems__(self, keys: list) -> list[torch.Tensor]:
        indices, generators = split_keys(keys)
        clean = self.fetch(indices)
        if generators is not None:
            return [self._item(image, g) for image, g in zip(clean, generators)]
        if self.flip:
            flip = (torch.rand(len(clean)) < 0.5).view(-1, 1, 1, 1)
            clean = torch.where(flip, clean.flip(-1), clean)
        return list(make_stack(clean, self.k_max, **self.corruption).unbind(0))

    def _item(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One item from its own generator: flip draw first, then the views."""
        if self.flip and bool(torch.rand((), generator=generator) < 0.5):
            image = image.flip(-1)
        return make_stack(image.unsqueeze(0), self.k_max, generator=generator, **self.corruption)[0]
