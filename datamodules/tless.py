"""FusionT-LESS (docs/design.md §2): 64x64 views of T-LESS objects occluded by pasted objects.

Train: an object image from ``<lmdb_dir>/objects_train`` area-resized to ``image_size`` is the
target; each of the k_max views pastes fresh occluders (``datamodules.paste``, vectorised over
the batch, drawn per item from (seed, epoch, index): ``datamodules.training_order``). The occluder pool
is decoded into memory once in ``setup`` (before the DataLoader workers start, so forked workers
share it). Validation / test: the fixed stacks of ``<lmdb_dir>/val``. ``prepare_data`` builds
missing LMDBs (``datamodules.make_tless``).
``channels: 1`` converts everything to grey (BT.601 luminance).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from datamodules.base import FusionDataModule
from datamodules.batched import BatchedDataset
from datamodules.lmdb_store import LMDBReader, StoredStacks, remove_stale_temps
from datamodules.make_tless import OBJECT_IDS, OCCLUDER_IDS, PoolSpec, ValSpec, build_pools, build_val, regenerate_hint
from datamodules.paste import PasteParams, compose_views, load_occluder_bank, object_targets
from datamodules.training_order import split_keys


class OccludedObjects(BatchedDataset):
    """Object targets with ``k_max`` freshly occluded copies: ``[k_max + 1, C, S, S]`` per item."""

    def __init__(self, objects: LMDBReader, bank: torch.Tensor, k_max: int, image_size: int, paste: PasteParams):
        self.objects = objects
        self.bank = bank  # uint8 [P, C + 1, s, s]
        self.k_max = k_max
        self.image_size = image_size
        self.paste = paste

    def __len__(self) -> int:
        return len(self.objects)

    def __getitems__(self, keys: list) -> list[torch.Tensor]:
        # Called by the DataLoader with a whole batch: one read, one paste of all occluders. Keys
        # from EpochSampler draw each item's placements from its own generator (seed, epoch,
        # index); plain indices use torch's global RNG.
        indices, generators = split_keys(keys)
        channels = self.bank.shape[1] - 1
        target = object_targets(self.objects.get_many(indices)[:, 0], self.image_size, channels)
        views, _ = compose_views(target, self.bank, self.k_max, self.paste, generators)
        return list(torch.cat([views, target.unsqueeze(1)], dim=1).unbind(0))


class FusionTLessDataModule(FusionDataModule):
    """FusionT-LESS via LMDBs in ``lmdb_dir`` (default ``<data_dir>/fusion_tless_lmdb``), built from the
    BOP T-LESS tree at ``bop_root`` (default ``<data_dir>/tless``) when missing.

    Pools: ``object_ids`` (the paper's 5 socket classes; configurable) cropped around ``bbox``
    ('visib' or 'obj') at ``object_size``, ``occluder_ids`` at ``occluder_source_size``; ``n_val``
    object images held out with ``split_seed``; validation composed once from ``val_seed``.
    Pasting: ``n_occluders_low..n_occluders_high`` occluders of ``occluder_size`` px per view with
    scale in [scale_low, scale_high], +-``max_shift`` px and +-``max_rotation`` degrees.
    ``workers`` processes build the LMDBs and decode the occluder pool (None: all cores).
    Other keyword arguments go to ``FusionDataModule``.
    """

    def __init__(
        self,
        data_dir: str,
        lmdb_dir: str | None = None,
        bop_root: str | None = None,
        object_ids: Sequence[int] = OBJECT_IDS,
        occluder_ids: Sequence[int] = OCCLUDER_IDS,
        bbox: str = "visib",
        object_size: int = 128,
        occluder_source_size: int = 100,
        n_val: int = 644,
        split_seed: int = 0,
        val_seed: int = 0,
        n_occluders_low: int = 5,
        n_occluders_high: int = 8,
        occluder_size: int = 50,
        scale_low: float = 0.9,
        scale_high: float = 1.1,
        max_shift: float = 4.0,
        max_rotation: float = 180.0,
        workers: int | None = None,
        channels: int = 3,
        image_size: int = 64,
        bits_per_dim: bool = True,
        **kwargs: Any,
    ):
        kwargs.update(channels=channels, image_size=image_size, bits_per_dim=bits_per_dim)
        super().__init__(**kwargs)
        self.data_dir = data_dir
        self.lmdb_dir = Path(lmdb_dir if lmdb_dir else Path(data_dir) / "fusion_tless_lmdb").expanduser().absolute()
        self.bop_root = bop_root if bop_root else str(Path(data_dir) / "tless")
        self.workers = workers
        self.pools = PoolSpec(
            tuple(int(i) for i in object_ids),
            tuple(int(i) for i in occluder_ids),
            bbox,
            object_size,
            occluder_source_size,
            n_val,
            split_seed,
        )
        self.paste = PasteParams(
            n_occluders_low, n_occluders_high, occluder_size, scale_low, scale_high, max_shift, max_rotation
        )
        self.val_spec = ValSpec(self.image_size, self.k_max, val_seed, self.paste)

    def prepare_data(self) -> None:
        """Build the missing LMDBs (rank zero only; idempotent, atomic), after deleting unfinished
        ones left by killed runs."""
        remove_stale_temps(self.lmdb_dir)
        build_pools(self.bop_root, self.lmdb_dir, self.pools, self.workers)
        build_val(self.lmdb_dir, self.pools, self.val_spec, self.workers)

    def _reader(self, name: str, expected: dict[str, Any]) -> LMDBReader:
        reader = LMDBReader(self.lmdb_dir / name, expected, regenerate_hint(self.lmdb_dir))
        return self.track(reader)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            objects = self._reader("objects_train", self.pools.expected("objects_train"))
            occluders = self._reader("occluders", self.pools.expected("occluders"))
            bank = load_occluder_bank(occluders, self.paste.occluder_size, self.channels, self.workers)
            self.train_set = OccludedObjects(objects, bank, self.k_max, self.image_size, self.paste)
        if self.val_set is None:  # validation and test use the fixed set
            self.val_set = StoredStacks(self._reader("val", self.val_spec.expected(self.pools)), self.channels)
