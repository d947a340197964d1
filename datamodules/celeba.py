"""FusionCelebA (docs/design.md §2): 64x64 RGB faces seen through ellipse windows.

Train: clean faces from ``<lmdb_dir>/train``, a random horizontal flip and a fresh corruption per
fetch, drawn per item from (seed, epoch, index) (``datamodules.training_order``), so runs and resumed
runs are reproducible. Validation / test: the stacks stored in ``<lmdb_dir>/valid`` and
``.../test`` (corruption drawn once from ``val_seed``). ``prepare_data`` builds missing LMDBs
(``datamodules.make_celeba``).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch

from datamodules.base import FusionDataModule
from datamodules.batched import CorruptedImages
from datamodules.corruption import check_corruption
from datamodules.images import to_tensor
from datamodules.lmdb_store import LMDBReader, StoredStacks, remove_stale_temps
from datamodules.make_celeba import CelebASpec, build_celeba, regenerate_hint


def read_faces(reader: LMDBReader, indices: list[int]) -> torch.Tensor:
    """Clean faces ``[B, 3, H, W]`` in [0, 1] from the train LMDB."""
    return to_tensor(reader.get_many(indices)[:, 0])


class FusionCelebADataModule(FusionDataModule):
    """FusionCelebA from ``<data_dir>/celeba`` (torchvision layout) via LMDBs in ``lmdb_dir``
    (default ``<data_dir>/fusion_celeba_lmdb``).

    Each view shows ``n_ellipses`` windows with radius in [r_low, r_high), then Gaussian noise of std
    ``noise_std`` on every pixel; ``val_seed`` seeds the stored validation / test corruption; ``flip`` enables the
    random horizontal flip in training; ``workers`` processes build the LMDBs (None: all cores).
    Other keyword arguments go to ``FusionDataModule``.
    """

    def __init__(
        self,
        data_dir: str,
        lmdb_dir: str | None = None,
        n_ellipses: int = 4,
        r_low: int = 0,
        r_high: int = 15,
        noise_std: float = 0.0,
        val_seed: int = 0,
        flip: bool = True,
        workers: int | None = None,
        channels: int = 3,
        image_size: int = 64,
        bits_per_dim: bool = True,
        **kwargs: Any,
    ):
        kwargs.update(channels=channels, image_size=image_size, bits_per_dim=bits_per_dim)
        super().__init__(**kwargs)
        if self.channels != 3:
            raise ValueError(f"FusionCelebA is RGB: set dataset.channels=3 (got {self.channels})")
        check_corruption(n_ellipses, r_low, r_high, noise_std)
        self.data_dir = data_dir
        self.lmdb_dir = Path(lmdb_dir if lmdb_dir else Path(data_dir) / "fusion_celeba_lmdb").expanduser().absolute()
        self.flip = flip
        self.workers = workers
        self.spec = CelebASpec(self.image_size, self.k_max, n_ellipses, r_low, r_high, noise_std, val_seed)

    def prepare_data(self) -> None:
        """Build the missing LMDBs (rank zero only; idempotent, atomic), after deleting unfinished
        ones left by killed runs."""
        remove_stale_temps(self.lmdb_dir)
        build_celeba(self.data_dir, self.lmdb_dir, self.spec, self.workers)

    def _reader(self, split: str) -> LMDBReader:
        hint = regenerate_hint(self.data_dir, self.lmdb_dir)
        reader = LMDBReader(self.lmdb_dir / split, self.spec.expected(split), hint)
        return self.track(reader)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            reader = self._reader("train")
            self.train_set = CorruptedImages(
                partial(read_faces, reader), len(reader), self.k_max, self.spec.corruption(), self.flip
            )
        if stage in (None, "fit", "validate") and self.val_set is None:
            self.val_set = StoredStacks(self._reader("valid"))
        if stage in (None, "test") and self.test_set is None:
            self.test_set = StoredStacks(self._reader("test"))
