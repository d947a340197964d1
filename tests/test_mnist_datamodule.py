"""FusionMNIST datamodule (datamodules/mnist.py) on the real MNIST files."""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.idx import read_idx
from datamodules.mnist import CorruptedImages, FixedCorruptedImages, FusionMNISTDataModule, load_mnist_images

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("FUSIONVAE_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
RAW = DATA_DIR / "MNIST" / "raw"
T10K = RAW / "t10k-images-idx3-ubyte"

pytestmark = pytest.mark.skipif(
    not (T10K.is_file() and (RAW / "train-images-idx3-ubyte").is_file()),
    reason=f"raw MNIST not found under {RAW} (set FUSIONVAE_DATA_DIR to the directory holding MNIST/raw)",
)


def make_dm(data_dir: Path | str = DATA_DIR, **kwargs) -> FusionMNISTDataModule:
    kwargs = dict(batch_size=16, val_batch_size=32, num_workers=0, pin_memory=False) | kwargs
    return FusionMNISTDataModule(data_dir=str(data_dir), **kwargs)


@pytest.fixture(scope="module")
def other_process() -> Iterator[subprocess.Popen]:
    """A second interpreter that builds the validation set and prints its sha256; started first so
    that it runs alongside the other tests."""
    code = (
        "import sys, hashlib; from datamodules.mnist import FusionMNISTDataModule as D; "
        "d = D(sys.argv[1], num_workers=0); d.setup('validate'); "
        "print(hashlib.sha256(d.val_set.noisy.numpy().tobytes()).hexdigest())"
    )
    command = [sys.executable, "-c", code, str(DATA_DIR)]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield proc
    proc.kill()
    proc.communicate()


@pytest.fixture(scope="module")
def dm(other_process: subprocess.Popen) -> FusionMNISTDataModule:
    dm = make_dm()
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _check_batch(batch: torch.Tensor, size: int) -> None:
    assert batch.shape == (size, 4, 1, 32, 32)
    assert batch.dtype == torch.float32
    assert batch.min() >= 0 and batch.max() <= 1
    assert batch[:, :3].count_nonzero() > 0


def test_train_and_val_batches(dm: FusionMNISTDataModule) -> None:
    assert len(dm.train_set) == 60000 and len(dm.val_set) == 10000
    assert dm.test_set is dm.val_set
    _check_batch(next(iter(dm.train_dataloader())), 16)
    _check_batch(next(iter(dm.val_dataloader())), 32)
    _check_batch(next(iter(dm.test_dataloader())), 32)


def test_target_is_padded_clean_digit(dm: FusionMNISTDataModule) -> None:
    for split, dataset in (("train", dm.train_set), ("t10k", dm.val_set)):
        digits = read_idx(RAW / f"{split}-images-idx3-ubyte")
        for i in (0, 123, len(digits) - 1):
            expected = torch.from_numpy(np.pad(digits[i], 2).astype(np.float32) / 255)
            item = dataset[i]
            assert item.shape == (4, 1, 32, 32)
            assert torch.equal(item[-1, 0], expected)


def test_val_views_are_fixed_and_quantised(dm: FusionMNISTDataModule) -> None:
    assert dm.val_set.noisy.dtype == torch.uint8
    assert torch.equal(dm.val_set[5], dm.val_set[5])
    assert torch.equal(torch.stack(dm.val_set.__getitems__([5, 9])), torch.stack([dm.val_set[5], dm.val_set[9]]))
    assert torch.equal((dm.val_set[5] * 255).round() / 255, dm.val_set[5])


def test_val_views_have_noise_everywhere(dm: FusionMNISTDataModule) -> None:
    """Official formula: the 2-px padding (never a digit pixel) is max(0, 0.25 N(0, 1)), quantised:
    mean 0.25 / sqrt(2 pi) ~ 0.0997 and about half of its pixels non-zero."""
    views = dm.val_set.noisy.float().div(255)  # [10000, 3, 1, 32, 32]
    pad = torch.ones(32, 32, dtype=torch.bool)
    pad[2:-2, 2:-2] = False
    padding = views[..., pad]
    assert abs(padding.mean().item() - 0.25 / math.sqrt(2 * math.pi)) < 0.001
    assert 0.48 < (padding > 0).float().mean().item() < 0.51


def test_val_depends_on_val_seed_only(dm: FusionMNISTDataModule) -> None:
    images, corruption = dm.val_set.images[:50], dm.corruption
    torch.manual_seed(1)
    seed0 = FixedCorruptedImages(images, 3, corruption, 0).noisy
    torch.manual_seed(2)  # the global RNG must not matter
    assert torch.equal(seed0, FixedCorruptedImages(images, 3, corruption, 0).noisy)
    assert not torch.equal(seed0, FixedCorruptedImages(images, 3, corruption, 1).noisy)


def test_val_identical_in_another_process(dm: FusionMNISTDataModule, other_process: subprocess.Popen) -> None:
    # A fresh datamodule in a fresh interpreter: same stored views, byte for byte.
    out, err = other_process.communicate(timeout=120)
    assert other_process.returncode == 0, err
    assert out.strip() == hashlib.sha256(dm.val_set.noisy.numpy().tobytes()).hexdigest()


def test_val_loader_same_with_workers(dm: FusionMNISTDataModule) -> None:
    parallel = make_dm(num_workers=2, persistent_workers=False)
    parallel.val_set = dm.val_set  # the stored set itself is checked above; here only the loaders
    batches = list(islice(parallel.val_dataloader(), 3))
    assert len(batches) == 3
    for a, b in zip(islice(dm.val_dataloader(), 3), batches):
        assert torch.equal(a, b)


def test_train_corruption_fresh_each_fetch(dm: FusionMNISTDataModule) -> None:
    a, b = dm.train_set[7], dm.train_set[7]
    assert torch.equal(a[-1], b[-1])
    assert not torch.equal(a[:-1], b[:-1])
    torch.manual_seed(3)
    c = dm.train_set.__getitems__([7, 8])
    torch.manual_seed(3)
    assert all(torch.equal(x, y) for x, y in zip(c, dm.train_set.__getitems__([7, 8])))


def test_train_loader_fetches_whole_batches(dm: FusionMNISTDataModule, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_single_items(self, index):
        raise AssertionError("DataLoader fell back to per-item __getitem__")

    dm.check_items(dm.train_set, "training")  # the loader's one-item shape check, done (whatever ran before)
    monkeypatch.setattr(CorruptedImages, "__getitem__", no_single_items)
    _check_batch(next(iter(dm.train_dataloader())), 16)


def test_setup_is_idempotent(dm: FusionMNISTDataModule) -> None:
    train, val = dm.train_set, dm.val_set
    dm.setup("fit")
    dm.setup("test")
    assert dm.train_set is train and dm.val_set is val and dm.test_set is val
    evaluation_only = make_dm()
    evaluation_only.val_set = val  # skip rebuilding it
    evaluation_only.setup("validate")
    assert evaluation_only.train_set is None and evaluation_only.val_set is val


def test_missing_data_dir_names_path_and_env_var(tmp_path: Path) -> None:
    missing = make_dm(tmp_path / "nowhere")
    for call in (missing.prepare_data, lambda: missing.setup("fit")):
        with pytest.raises(FileNotFoundError, match="MNIST file not found") as info:
            call()
        message = str(info.value)
        assert str(tmp_path / "nowhere" / "MNIST" / "raw" / "train-images-idx3-ubyte") in message
        assert "FUSIONVAE_DATA_DIR" in message and "paths.data_dir" in message


def test_failed_download_raises_file_not_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(FileNotFoundError, match="download of MNIST failed.*FUSIONVAE_DATA_DIR"):
        make_dm(tmp_path, download=True).prepare_data()


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(image_size=64), "dataset.image_size"),
        (dict(pad=6), "dataset.image_size"),
        (dict(channels=3), "dataset.channels"),
        (dict(r_low=5, r_high=5), "dataset.r_high"),
        (dict(noise_std=-0.1), "dataset.noise_std"),
    ],
)
def test_bad_config_raises(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        make_dm(**kwargs)


def test_gz_files_accepted(dm: FusionMNISTDataModule, tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(T10K.read_bytes(), compresslevel=1))
    assert torch.equal(load_mnist_images(tmp_path, "test", pad=2), dm.val_set.images)


@pytest.mark.parametrize(
    "name, damage",
    [
        ("t10k-images-idx3-ubyte", lambda data: data[: len(data) // 2]),
        ("t10k-images-idx3-ubyte", lambda data: b"\x12\x34" + data[2:]),
        ("t10k-images-idx3-ubyte.gz", lambda data: gzip.compress(data, compresslevel=1)[:5000]),
    ],
)
def test_corrupt_idx_file_gives_clear_error(tmp_path: Path, name: str, damage) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / name).write_bytes(damage(T10K.read_bytes()))
    with pytest.raises(ValueError, match=re.escape(str(raw / name)) + ".*(truncated|magic|gzip)"):
        make_dm(tmp_path).setup("validate")


def test_labels_are_read_like_the_images(data_dir, tmp_path):
    from datamodules.mnist import load_mnist_labels

    labels = load_mnist_labels(data_dir, "test")
    assert labels.dtype == torch.int64 and labels.shape == (10000,) and labels[:5].tolist() == [7, 2, 1, 0, 4]
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte \(nor t10k-labels-idx1-ubyte.gz\)"):
        load_mnist_labels(tmp_path, "test")
