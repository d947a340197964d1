"""FusionMNIST (docs/design.md §2): MNIST zero-padded 28 -> 32, 1 channel, ellipse-window views.

Train: the 60k training digits with a fresh corruption on every fetch, drawn per item from
(seed, epoch, index) (``datamodules.training_order``), so runs and resumed runs are reproducible.
Validation / test: the 10k t10k digits with one fixed corruption drawn from ``val_seed`` in
``setup`` and stored as uint8.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datamodules.base import FusionDataModule
from datamodules.batched import BatchedDataset, CorruptedImages
from datamodules.corruption import check_corruption, corrupt
from datamodules.idx import read_idx

MNIST_SIZE = 28
IMAGE_FILES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
LABEL_FILES = {"train": "train-labels-idx1-ubyte", "test": "t10k-labels-idx1-ubyte"}
# The fixed corruption is drawn in chunks of this many images (bounds memory); changing it
# changes the stored validation set.
_FIXED_CHUNK = 1000


def find_mnist_file(data_dir: str | Path, split: str, files: dict[str, str] = IMAGE_FILES) -> Path:
    """Path of the ``split`` ("train" / "test") file of ``files`` (images, or ``LABEL_FILES``) under
    ``<data_dir>/MNIST/raw`` (raw or ``.gz``)."""
    expected = Path(data_dir).expanduser().absolute() / "MNIST" / "raw" / files[split]
    for path in (expected, expected.with_name(expected.name + ".gz")):
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"MNIST file not found: {expected} (nor {expected.name}.gz). Point the env var FUSIONVAE_DATA_DIR "
        f"(config key paths.data_dir, now {str(data_dir)!r}) at the directory that holds MNIST/raw/, "
        f"or set dataset.download=true to fetch it with torchvision, or copy torchvision's raw MNIST "
        f"files ({', '.join(files.values())}) into {expected.parent}"
    )


def load_mnist_images(data_dir: str | Path, split: str, pad: int) -> torch.Tensor:
    """uint8 images ``[N, 1, 28 + 2 pad, 28 + 2 pad]``, zero-padded by ``pad`` pixels on each side."""
    path = find_mnist_file(data_dir, split)
    images = read_idx(path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (MNIST_SIZE, MNIST_SIZE):
        raise ValueError(f"{path}: expected uint8 images [N, 28, 28], got {images.dtype} {images.shape}")
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad)))  # a writable copy
    return torch.from_numpy(padded).unsqueeze(1)


def load_mnist_labels(data_dir: str | Path, split: str) -> torch.Tensor:
    """int64 digit labels ``[N]`` of the ``split`` ("train" / "test")."""
    return torch.from_numpy(read_idx(find_mnist_file(data_dir, split, LABEL_FILES)).astype(np.int64))


def scale_to_unit(images: torch.Tensor, indices: list[int]) -> torch.Tensor:
    """uint8 ``images[indices]`` as float in [0, 1]."""
    return images[indices].float().div_(255)


class FixedCorruptedImages(BatchedDataset):
    """Clean uint8 images with corrupted views drawn once from ``seed`` and stored as uint8."""

    def __init__(self, images: torch.Tensor, k_max: int, corruption: dict[str, Any], seed: int):
        generator = torch.Generator().manual_seed(seed)
        noisy = torch.empty((len(images), k_max, *images.shape[1:]), dtype=torch.uint8)
        for start in range(0, len(images), _FIXED_CHUNK):
            clean = images[start : start + _FIXED_CHUNK].float().div_(255)
            views = corrupt(clean, k_max, generator=generator, **corruption)
            noisy[start : start + _FIXED_CHUNK] = views.mul_(255).round_().to(torch.uint8)
        self.images = images
        self.noisy = noisy

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        stack = torch.cat([self.noisy[indices], self.images[indices].unsqueeze(1)], dim=1)
        return list(stack.float().div_(255).unbind(0))


class FusionMNISTDataModule(FusionDataModule):
    """FusionMNIST from ``<data_dir>/MNIST/raw`` (torchvision's raw layout, ``.gz`` accepted).

    ``pad`` zero pixels are added on each side (``image_size`` must be 28 + 2 pad, ``channels`` 1);
    each view shows ``n_ellipses`` windows with radius in [r_low, r_high), then Gaussian noise of
    std ``noise_std`` on every pixel (``datamodules.corruption``). ``crop`` (2) leaves the padding
    out of reported likelihoods. Other keyword arguments go to ``FusionDataModule``.
    """

    def __init__(
        self,
        data_dir: str,
        download: bool = False,
        n_ellipses: int = 2,
        r_low: int = 5,
        r_high: int = 10,
        noise_std: float = 0.25,
        val_seed: int = 0,
        pad: int = 2,
        crop: int = 2,
        **kwargs: Any,
    ):
        super().__init__(crop=crop, **kwargs)
        if self.channels != 1:
            raise ValueError(f"FusionMNIST is grey-level: set dataset.channels=1 (got {self.channels})")
        if pad < 0 or self.image_size != MNIST_SIZE + 2 * pad:
            raise ValueError(
                f"FusionMNIST images are 28 + 2 * dataset.pad pixels: dataset.image_size={self.image_size} "
                f"does not match dataset.pad={pad}; set dataset.image_size={MNIST_SIZE + 2 * max(pad, 0)} "
                f"or change dataset.pad"
            )
        self.data_dir = data_dir
        self.download = download
        self.pad = pad
        self.val_seed = val_seed
        self.corruption = check_corruption(n_ellipses, r_low, r_high, noise_std)

    def prepare_data(self) -> None:
        """Check that the image files exist; fetch them with torchvision first if ``download``."""
        try:
            for split in IMAGE_FILES:
                find_mnist_file(self.data_dir, split)
        except FileNotFoundError as missing:
            if not self.download:
                raise
            try:
                from torchvision.datasets import MNIST

                MNIST(root=self.data_dir, download=True)
            except Exception as exc:  # network, checksum or disk errors
                raise FileNotFoundError(f"torchvision download of MNIST failed ({exc!r}). {missing}") from exc
            for split in IMAGE_FILES:
                find_mnist_file(self.data_dir, split)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            images = load_mnist_images(self.data_dir, "train", self.pad)
            self.train_set = CorruptedImages(partial(scale_to_unit, images), len(images), self.k_max, self.corruption)
        if self.val_set is None:  # every stage evaluates on t10k
            images = load_mnist_images(self.data_dir, "test", self.pad)
            self.val_set = FixedCorruptedImages(images, self.k_max, self.corruption, self.val_seed)
            self.test_set = self.val_set
