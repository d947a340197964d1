"""The OFFICIAL FusionVAE LMDBs (github.com/ALRhub/FusionVAE) as ``dataset=celeba_official`` and
``dataset=tless_official``, so users can train on the authors' data instead of regenerating it.

Official format (differs from ``lmdb_store``): an LMDB folder (``data.mdb``) whose keys are
``str(i).encode()`` for i = 0..n-1 (no zero padding, no metadata record); each value is one PNG.
Validation records hold 4 square tiles side by side, ``[view 1, view 2, view 3, target]`` (a 64x256
PNG). The count is read from the data (``env.stat()["entries"]``); keys "0" and "<n-1>" are checked
when a reader opens, and ``prepare_data`` checks every key (a cursor over the keys only) and decodes
every validation record before training.

- FusionCelebA (``create_fusion_celeba_lmdb.py``): ``train.lmdb`` (one 64x64 face per record; a
  record of several tiles yields its LAST tile, the target) and ``valid.lmdb``. The PNGs were
  written by ``cv2.imencode`` from RGB arrays, so the PNG holds the channels reversed: we decode
  with PIL and reverse them (``reverse_channels``).
- FusionT-LESS (the official download): ``train128x128cropped5socketClasses.lmdb`` (objects),
  ``train100x100_overlay_imgs_12classes.lmdb`` (occluders), ``valid64x64_augOcc_5socketClasses.lmdb``.
  ASSUMPTIONS (the pixel format is not documented): the PNGs were also written by cv2, so 3/4
  channel images are BGR(A) and reversed to RGB(A) (``dataset.reverse_channels=false`` turns this
  off); the format is detected per record from the PNG mode: RGBA / LA -> the alpha channel is the
  object mask (straight alpha, as PNG defines; colour is premultiplied here), L / RGB without alpha
  -> the object is on black and alpha = 255 where any channel > 0 (object pixels of value 0 count
  as background). Objects and occluders become premultiplied RGBA, the format ``datamodules.paste``
  and ``datamodules.tless`` use; grey data needs ``dataset.channels=1`` (the official setting).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from datamodules.base import FusionDataModule
from datamodules.batched import BatchedDataset, CorruptedImages
from datamodules.corruption import check_corruption
from datamodules.images import to_tensor
from datamodules.lmdb_env import resolve
from datamodules.official_lmdb import GREY_MODES, OfficialLMDB, decode_png, premultiplied_rgba  # noqa: F401 (public here too)
from datamodules.paste import PasteParams, load_occluder_bank
from datamodules.tless import OccludedObjects

CELEBA_LMDBS = {"train": "train.lmdb", "valid": "valid.lmdb"}
TLESS_LMDBS = {
    "objects": "train128x128cropped5socketClasses.lmdb",
    "occluders": "train100x100_overlay_imgs_12classes.lmdb",
    "valid": "valid64x64_augOcc_5socketClasses.lmdb",
}
STORED_VIEWS = 3  # views per official validation record (plus the target)


class OfficialStacks(BatchedDataset):
    """Stored ``[view 1, view 2, view 3, target]`` records as float ``[k_max + 1, C, H, W]`` in [0, 1]:
    the LAST ``k_max`` views and the target, as ``objective.split_views`` takes the last K views."""

    def __init__(self, reader: OfficialLMDB, k_max: int, channels: int):
        self.reader, self.k_max, self.channels = reader, k_max, channels

    def __len__(self) -> int:
        return len(self.reader)

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        stacks = self.reader.get_many(indices)
        return list(to_tensor(stacks[:, STORED_VIEWS - self.k_max :], self.channels).unbind(0))


def read_faces(reader: OfficialLMDB, indices: list[int]) -> torch.Tensor:
    """Clean faces ``[B, 3, H, W]`` in [0, 1] (the last tile of each train record)."""
    return to_tensor(reader.get_many(indices)[:, -1])


class _OfficialDataModule(FusionDataModule):
    """Opens the official LMDBs in ``prepare_data`` / ``setup`` (cheap: counts, keys, record 0) so a
    wrong folder or format fails before any heavy work, then ``prepare_data`` scans every key and
    decodes the validation records; ``lmdbs`` maps role -> (folder, reader kwargs)."""

    dataset_name = ""
    source = ""  # where users get the LMDBs
    lmdbs: dict[str, tuple[str, dict[str, Any]]] = {}

    def __init__(self, official_dir: str, reverse_channels: bool = True, **kwargs: Any):
        super().__init__(**kwargs)
        if self.k_max > STORED_VIEWS:
            raise ValueError(
                f"the official validation records hold {STORED_VIEWS} views: dataset.k_max must be "
                f"<= {STORED_VIEWS}, got {self.k_max}"
            )
        self.official_dir = resolve(official_dir)
        self.reverse_channels = reverse_channels
        self._official: dict[str, OfficialLMDB] = {}
        self._scanned = False  # every key and validation record checked (prepare_data, once)

    def _hint(self) -> str:
        names = ", ".join(f"{folder}/" for folder, _ in self.lmdbs.values())
        return (
            f". dataset.official_dir ({self.official_dir}) must be the folder holding the official "
            f"{self.dataset_name} LMDBs {names} ({self.source}); set it in the config or on the command line "
            f"(dataset.official_dir=<dir>)"
        )

    def readers(self) -> dict[str, OfficialLMDB]:
        """The checked readers, opened once (cheap: counts, first / last key, record '0')."""
        if not self._official:
            readers = {
                role: OfficialLMDB(
                    self.official_dir / folder, reverse_channels=self.reverse_channels, hint=self._hint(), **kw
                )
                for role, (folder, kw) in self.lmdbs.items()
            }
            self.check(readers)
            self._official = {role: self.track(reader) for role, reader in readers.items()}
        return self._official

    def check(self, readers: dict[str, OfficialLMDB]) -> None:
        """Compare the data with the config; raise ValueError naming the LMDB and the config key."""
        valid = readers["valid"]
        size = valid.shape[1]
        if size != self.image_size:
            raise ValueError(
                f"{valid.path}: tiles are {size}x{size} px but dataset.image_size={self.image_size}; "
                f"set dataset.image_size={size}"
            )
        for reader in readers.values():
            if self.channels == 3 and reader.mode in GREY_MODES:
                raise ValueError(f"{reader.path} stores grey images (PNG mode {reader.mode}): set dataset.channels=1")

    def prepare_data(self) -> None:
        """Nothing to build: check folders, counts and formats, every key of every LMDB and every
        validation record (rank zero, before training; a gap or a damaged record would otherwise
        stop the run mid-epoch or at the first full validation)."""
        readers = self.readers()
        if not self._scanned:
            for reader in readers.values():
                reader.check_keys()
            readers["valid"].check_records()
            self._scanned = True


class FusionCelebAOfficialDataModule(_OfficialDataModule):
    """FusionCelebA from the official ``train.lmdb`` / ``valid.lmdb`` in ``official_dir``. Training:
    clean faces, random horizontal flip and fresh ellipse corruption (as ``dataset=celeba``);
    validation and test: the stored valid records (the official code has no test split)."""

    dataset_name = "FusionCelebA"
    source = "written by the official create_fusion_celeba_lmdb.py --output_dir"
    lmdbs = {"train": (CELEBA_LMDBS["train"], {}), "valid": (CELEBA_LMDBS["valid"], {"tiles": STORED_VIEWS + 1})}

    def __init__(
        self,
        official_dir: str,
        n_ellipses: int = 4,
        r_low: int = 0,
        r_high: int = 15,
        noise_std: float = 0.0,
        flip: bool = True,
        channels: int = 3,
        image_size: int = 64,
        bits_per_dim: bool = True,
        **kwargs: Any,
    ):
        kwargs.update(channels=channels, image_size=image_size, bits_per_dim=bits_per_dim)
        super().__init__(official_dir, **kwargs)
        if self.channels != 3:
            raise ValueError(f"FusionCelebA is RGB: set dataset.channels=3 (got {self.channels})")
        self.corruption = check_corruption(n_ellipses, r_low, r_high, noise_std)
        self.flip = flip

    def check(self, readers: dict[str, OfficialLMDB]) -> None:
        super().check(readers)
        train = readers["train"]
        if train.shape[1] != self.image_size:
            raise ValueError(
                f"{train.path}: faces are {train.shape[1]}x{train.shape[2]} px but dataset.image_size={self.image_size}"
            )

    def setup(self, stage: str | None = None) -> None:
        readers = self.readers()
        if stage in (None, "fit") and self.train_set is None:
            train = readers["train"]
            self.train_set = CorruptedImages(
                partial(read_faces, train), len(train), self.k_max, self.corruption, self.flip
            )
        if self.val_set is None:
            self.val_set = OfficialStacks(readers["valid"], self.k_max, self.channels)


class FusionTLessOfficialDataModule(_OfficialDataModule):
    """FusionT-LESS from the official LMDBs in ``official_dir``. Training: object images area-resized
    to ``image_size`` with freshly pasted occluders from the official occluder LMDB (as ``dataset=tless``,
    same paste settings); validation and test: the 644 stored records. ``workers`` processes decode the
    occluder bank (None: all cores)."""

    dataset_name = "FusionT-LESS"
    source = "the official download, github.com/ALRhub/FusionVAE datasets/"
    lmdbs = {
        "objects": (TLESS_LMDBS["objects"], {"rgba": True}),
        "occluders": (TLESS_LMDBS["occluders"], {"rgba": True}),
        "valid": (TLESS_LMDBS["valid"], {"tiles": STORED_VIEWS + 1}),
    }

    def __init__(
        self,
        official_dir: str,
        n_occluders_low: int = 5,
        n_occluders_high: int = 8,
        occluder_size: int = 50,
        scale_low: float = 0.9,
        scale_high: float = 1.1,
        max_shift: float = 4.0,
        max_rotation: float = 180.0,
        workers: int | None = None,
        channels: int = 1,
        image_size: int = 64,
        bits_per_dim: bool = True,
        **kwargs: Any,
    ):
        kwargs.update(channels=channels, image_size=image_size, bits_per_dim=bits_per_dim)
        super().__init__(official_dir, **kwargs)
        self.paste = PasteParams(
            n_occluders_low, n_occluders_high, occluder_size, scale_low, scale_high, max_shift, max_rotation
        )
        self.workers = workers

    def setup(self, stage: str | None = None) -> None:
        readers = self.readers()
        if stage in (None, "fit") and self.train_set is None:
            bank = load_occluder_bank(readers["occluders"], self.paste.occluder_size, self.channels, self.workers)
            self.train_set = OccludedObjects(readers["objects"], bank, self.k_max, self.image_size, self.paste)
        if self.val_set is None:  # validation and test use the fixed set
            self.val_set = OfficialStacks(readers["valid"], self.k_max, self.channels)
