"""Shared LightningDataModule plumbing: loader settings and the sample-stack contract."""

from __future__ import annotations

import os
from functools import partial

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.training_order import DeferredLoader, EpochSampler, batches_done


class FusionDataModule(L.LightningDataModule):
    """Subclasses build ``self.train_set`` / ``self.val_set`` (and optionally ``self.test_set``) in
    ``setup``; each item is a float tensor ``[k_max + 1, C, H, W]`` in [0, 1], target last.

    Training batches come from an ``EpochSampler``: their order and every random draw of the
    training data are functions of (``seed``, epoch, sample index), so a resumed run sees the same
    batches as an uninterrupted one (``datamodules.training_order``); ``seed`` is the run's ``seed``.

    ``channels``, ``image_size`` and ``k_max`` are checked against the first item of each split
    when its loader is made (``check_items``); ``crop`` (border pixels left out
    of reported likelihoods, e.g. 2 for MNIST padded 28 -> 32) and ``bits_per_dim`` (report in
    bits/dim rather than nats) are dataset facts the model config reads via interpolation.
    """

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        k_max: int = 3,
        val_batch_size: int | None = None,
        channels: int = 1,
        image_size: int = 32,
        crop: int = 0,
        bits_per_dim: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"dataset.batch_size must be >= 1, got {batch_size}")
        if k_max < 0:
            raise ValueError(f"dataset.k_max must be >= 0, got {k_max}")
        if num_workers < 0:
            raise ValueError(f"dataset.num_workers must be >= 0, got {num_workers}")
        if channels not in (1, 3):
            raise ValueError(f"dataset.channels must be 1 (grey) or 3 (RGB), got {channels}")
        if image_size < 1:  # the network checks that its down-sampling divides the size
            raise ValueError(f"dataset.image_size must be >= 1, got {image_size}")
        if not 0 <= 2 * crop < image_size:
            raise ValueError(f"dataset.crop={crop} leaves no pixels of a {image_size}px image")
        self.channels = channels
        self.image_size = image_size
        self.crop = crop
        self.bits_per_dim = bits_per_dim
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.k_max = k_max
        self.seed = seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self._checked: set[int] = set()  # datasets whose items passed check_items
        self._readers: list = []  # LMDB readers opened by setup(); closed in teardown()

    def track(self, reader):
        """Register an LMDB reader so that ``teardown`` closes this process's environment."""
        self._readers.append(reader)
        return reader

    def teardown(self, stage: str | None = None) -> None:
        for reader in self._readers:
            reader.close()

    def check_items(self, dataset: Dataset, split: str) -> None:
        """Raise one clear error when the items of ``dataset`` are not ``[k_max + 1, C, H, W]`` with
        the configured channels and image size (checks the first item, once per split)."""
        if id(dataset) in self._checked or len(dataset) == 0:
            return
        shape = tuple(dataset[0].shape)
        expected = (self.k_max + 1, self.channels, self.image_size, self.image_size)
        if shape != expected:
            raise ValueError(
                f"{type(self).__name__} {split} items are {list(shape)} ([views + target, C, H, W]) but the config "
                f"expects {list(expected)}: fix dataset.k_max / dataset.channels / dataset.image_size or "
                f"regenerate the data"
            )
        self._checked.add(id(dataset))

    def _loader(self, dataset: Dataset | None, batch_size: int, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not built this split; call setup() first")
        self.check_items(dataset, "training" if shuffle else "validation / test")
        sampler = None
        if shuffle:
            trainer = self.trainer  # None outside a Trainer: one process
            ranks = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
            sampler = EpochSampler(dataset, batch_size, self.seed, *ranks, done=partial(batches_done, trainer))
        return (DeferredLoader if shuffle else DataLoader)(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=shuffle,
            num_workers=self.loader_workers(),
            pin_memory=self.pin_memory and torch.cuda.is_available(),  # page-locking helps only a GPU copy
            persistent_workers=self.persistent_workers and self.loader_workers() > 0,
        )

    def loader_workers(self) -> int:
        """``num_workers``, at most the CPU cores this process may use: more only compete for them
        (and make PyTorch warn)."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return min(self.num_workers, cores)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.val_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(
            self.test_set if self.test_set is not None else self.val_set, self.val_batch_size, shuffle=False
        )
