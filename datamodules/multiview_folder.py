"""Real multi-view captures (``dataset=multiview_folder``; docs/design.md §2): one sub-folder per
scene with 1..k_max views and a ``target`` image.

The views are the scene's own images, not corrupted further. Scenes are stored as LMDBs
(``datamodules.make_multiview``) in ``lmdb_dir`` (default
``<data_dir>/fusion_multiview_lmdb/<folder name>-<hash of its path>``). Training fills the k_max
view slots of each item from the scene's n views: the n in a random order, then (if n < k_max) views
drawn again at random, so the K views the model takes are distinct as far as the scene has views;
drawn per item from (seed, epoch, index), with a horizontal flip of the whole scene if ``flip``.
Validation / test: the stored order (views by name, repeated in turn).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from datamodules.base import FusionDataModule
from datamodules.batched import BatchedDataset
from datamodules.errors import DataError
from datamodules.image_folder import folder_lmdb_dir, scan_unless_gone
from datamodules.images import to_tensor
from datamodules.lmdb_env import resolve
from datamodules.lmdb_store import LMDBReader, StoredStacks
from datamodules.make_image_folder import rebuild_hint
from datamodules.make_multiview import MultiviewSpec, build_multiview
from datamodules.training_order import split_keys


class SceneStacks(BatchedDataset):
    """Training items ``[k_max + 1, C, S, S]`` from stored scenes with ``views[i]`` distinct views each."""

    def __init__(self, reader: LMDBReader, views: list[int], k_max: int, flip: bool):
        self.reader, self.views, self.k_max, self.flip = reader, views, k_max, flip

    def __len__(self) -> int:
        return len(self.reader)

    def __getitems__(self, keys: list) -> list[torch.Tensor]:
        indices, generators = split_keys(keys)
        stacks = to_tensor(self.reader.get_many(indices))  # [B, k_max + 1, C, S, S]
        gens = generators or [None] * len(indices)
        return [self._item(stack, self.views[i], g) for stack, i, g in zip(stacks, indices, gens)]

    def _item(self, stack: torch.Tensor, n: int, generator: torch.Generator | None) -> torch.Tensor:
        order = torch.randperm(n, generator=generator)[: self.k_max]
        again = torch.randint(0, n, (self.k_max - len(order),), generator=generator)
        slots = torch.cat([order, again, torch.tensor([self.k_max])])  # the target stays last
        if self.flip and bool(torch.rand((), generator=generator) < 0.5):
            stack = stack.flip(-1)
        return stack[slots]


class MultiviewFolderDataModule(FusionDataModule):
    """Scenes below ``path`` (views of any one size per scene, grey or colour; stored with
    ``channels`` channels) through LMDBs in ``lmdb_dir``. ``val_fraction`` / ``test_fraction`` /
    ``split_seed``: the seeded split of the scenes (unused with train/ val/ test/ sub-folders);
    ``workers`` processes decode the images (None: all cores). Other keyword arguments go to
    ``FusionDataModule``."""

    def __init__(
        self,
        data_dir: str,
        path: str | None = None,
        lmdb_dir: str | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        flip: bool = False,
        rebuild: bool = False,
        workers: int | None = None,
        channels: int = 3,
        image_size: int = 64,
        bits_per_dim: bool = True,
        **kwargs: Any,
    ):
        kwargs.update(channels=channels, image_size=image_size, bits_per_dim=bits_per_dim)
        super().__init__(**kwargs)
        if self.k_max < 1:
            raise ValueError(f"multiview_folder needs dataset.k_max >= 1, got {self.k_max}")
        self.path, self.data_dir, self.given_lmdb_dir = path, data_dir, lmdb_dir
        self.flip, self.rebuild, self.build_workers = flip, rebuild, workers
        self.spec = MultiviewSpec(self.image_size, self.channels, self.k_max, val_fraction, test_fraction, split_seed)

    def root(self) -> Path:
        if not self.path:
            raise DataError("dataset=multiview_folder needs the folder of scenes: add dataset.path=<folder>")
        return resolve(self.path)

    @property
    def lmdb_dir(self) -> Path:
        return folder_lmdb_dir(self.given_lmdb_dir, self.data_dir, self.root, "fusion_multiview_lmdb")

    def prepare_data(self) -> None:
        """Build the missing LMDBs (rank zero only; atomic) and refuse stale ones."""
        scan = scan_unless_gone(self.root(), self.lmdb_dir, "train")
        build_multiview(scan, self.lmdb_dir, self.spec, self.batch_size, self.build_workers, self.rebuild)

    def _reader(self, split: str, count: int | None = None) -> LMDBReader:
        expected = {**self.spec.expected(split), **({"count": count} if count is not None else {})}
        return self.track(LMDBReader(self.lmdb_dir / split, expected, rebuild_hint(self.lmdb_dir)))

    def setup(self, stage: str | None = None) -> None:
        train = self._reader("train")
        counts = train.meta["splits"]
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = SceneStacks(train, train.meta["views"], self.k_max, self.flip)
        if stage in (None, "test") and self.test_set is None and counts["test"]:
            self.test_set = StoredStacks(self._reader("test", counts["test"]))
        needs_val = stage in (None, "fit", "validate") or not counts["test"]  # no test scenes: test on val
        if needs_val and self.val_set is None:
            self.val_set = StoredStacks(self._reader("valid", counts["valid"]))
