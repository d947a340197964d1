"""Your own images (``dataset=image_folder``; docs/design.md §2): any folder of images, corrupted
like the built-in datasets.

Every image below ``path`` is made square (centre crop) and area-resized to ``image_size``, split
into train / validation / test (``datamodules.folder_scan``: by train/ val/ test/ sub-folders, or a
seeded rule) and stored once as LMDBs (``datamodules.make_image_folder``) in ``lmdb_dir`` (default
``<data_dir>/fusion_image_folder_lmdb/<folder name>-<hash of its path>``). Training draws fresh views
of the ``corruption`` style (``conf/dataset/corruption/``) per fetch from (seed, epoch, index), with a
random horizontal flip if ``flip``; validation / test read views stored once from ``val_seed``.
``prepare_data`` builds what is missing and refuses LMDBs of a changed folder or other settings
(``rebuild=True`` replaces them).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from datamodules.base import FusionDataModule
from datamodules.errors import DataError
from datamodules.folder_scan import FolderScan, scan_folder
from datamodules.images import to_tensor
from datamodules.lmdb_env import resolve
from datamodules.lmdb_store import LMDBReader, StoredStacks, is_complete, remove_stale_temps
from datamodules.make_image_folder import FolderSpec, build_image_folder, rebuild_hint

log = logging.getLogger(__name__)


def read_clean(reader: LMDBReader, indices: list[int]) -> torch.Tensor:
    """Clean images ``[B, C, S, S]`` in [0, 1] (the training images are the first records)."""
    return to_tensor(reader.get_many(indices)[:, 0])


def folder_lmdb_dir(given: str | None, data_dir: str, root: Callable[[], Path], base: str) -> Path:
    """``given``, else ``<data_dir>/<base>/<folder name>-<8 hex of its path>``."""
    if given:
        return Path(given).expanduser().absolute()
    folder = root()
    tag = hashlib.sha256(str(folder).encode()).hexdigest()[:8]
    return Path(data_dir).expanduser().absolute() / base / f"{folder.name}-{tag}"


def scan_unless_gone(root: Path, out: Path, first: str) -> FolderScan | None:
    """The folder's scan, or None when it is gone but its LMDBs (``out / first``) exist; removes
    unfinished LMDBs of killed builds in ``out`` first."""
    remove_stale_temps(out)
    if root.exists() or not is_complete(out / first):
        return scan_folder(root)
    log.warning("image folder %s not found: using its LMDBs in %s unchecked", root, out)
    return None


class ImageFolderDataModule(FusionDataModule):
    """Images below ``path`` (any sizes, grey or colour; stored with ``channels`` channels) through
    LMDBs in ``lmdb_dir``. ``corruption``: a view style (``datamodules.view_styles``).
    ``val_fraction`` / ``test_fraction`` / ``split_seed``: the seeded split (unused with train/
    val/ test/ sub-folders). ``workers`` processes decode the images (None: all cores). Other
    keyword arguments go to ``FusionDataModule``."""

    def __init__(
        self,
        corruption,
        data_dir: str,
        path: str | None = None,
        lmdb_dir: str | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        val_seed: int = 0,
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
        self.style = corruption
        self.path = path
        self.data_dir = data_dir
        self.given_lmdb_dir = lmdb_dir
        self.flip = flip
        self.rebuild = rebuild
        self.build_workers = workers
        self.spec = FolderSpec(
            self.image_size, self.channels, self.k_max, val_fraction, test_fraction, split_seed, val_seed
        )

    def root(self) -> Path:
        if not self.path:
            raise DataError("dataset=image_folder needs the folder of images: add dataset.path=<folder>")
        return resolve(self.path)

    @property
    def lmdb_dir(self) -> Path:
        return folder_lmdb_dir(self.given_lmdb_dir, self.data_dir, self.root, "fusion_image_folder_lmdb")

    def prepare_data(self) -> None:
        """Build the missing LMDBs (rank zero only; atomic) and refuse stale ones; a folder that is
        gone while its LMDBs exist (e.g. only the LMDBs were copied) leaves them unchecked."""
        scan = scan_unless_gone(self.root(), self.lmdb_dir, "images")
        build_image_folder(
            scan, self.lmdb_dir, self.spec, self.style, self.batch_size, self.build_workers, self.rebuild
        )

    def _reader(self, name: str, expected: dict[str, Any]) -> LMDBReader:
        return self.track(LMDBReader(self.lmdb_dir / name, expected, rebuild_hint(self.lmdb_dir)))

    def setup(self, stage: str | None = None) -> None:
        images = self._reader("images", self.spec.expected_images())
        counts, fingerprint = images.meta["splits"], images.meta["source"]["fingerprint"]

        def views(split: str) -> StoredStacks:
            expected = {**self.spec.expected_views(split, self.style.params(), fingerprint), "count": counts[split]}
            return StoredStacks(self._reader(split, expected))

        if stage in (None, "fit") and self.train_set is None:
            fetch = partial(read_clean, images)
            self.train_set = self.style.train_set(fetch, counts["train"], self.k_max, self.flip)
        if stage in (None, "test") and self.test_set is None and counts["test"]:
            self.test_set = views("test")
        needs_val = stage in (None, "fit", "validate") or not counts["test"]  # no test images: test on val
        if needs_val and self.val_set is None:
            self.val_set = views("valid")
