"""Datasets fetched one batch at a time."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset


class BatchedDataset(Dataset):
    """The DataLoader calls ``__getitems__(indices)`` with a whole batch, so reads, flips and
    corruption run once per batch, vectorised; single items take the same path."""

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        raise NotImplementedError
