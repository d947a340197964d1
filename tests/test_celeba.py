"""FusionCelebA: LMDB generation (datamodules/make_celeba.py) and the datamodule, on a stand-in."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from standins import make_celeba

from datamodules.celeba import FusionCelebADataModule
from datamodules.lmdb_store import LMDBMetadataError, LMDBReader, read_meta
from datamodules.make_celeba import CelebASpec, area_resize, build_celeba, main, read_partition

COUNTS = {"train": 24, "valid": 8, "test": 8}


def _dm(root: Path, **kwargs) -> FusionCelebADataModule:
    kwargs = {**dict(batch_size=4, val_batch_size=3, num_workers=0, pin_memory=False, workers=2), **kwargs}
    return FusionCelebADataModule(data_dir=str(root), **kwargs)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_celeba(tmp_path_factory.mktemp("data"), **{f"n_{k}": v for k, v in COUNTS.items()})
    _dm(root).prepare_data()
    return root


def _brute_force_area(image: np.ndarray) -> np.ndarray:
    """Exact area average 148 -> 64 (float): repeat each pixel 16x16 (148 * 16 = 64 * 37 = 2368), then
    average 37x37 blocks."""
    big = np.repeat(np.repeat(image.astype(np.float64), 16, axis=0), 16, axis=1)
    return big.reshape(64, 37, 64, 37, -1).mean(axis=(1, 3))


def _faces(root: Path, split: str) -> np.ndarray:
    """Reference preprocessing: crop rows 40:188, cols 15:163, exact area average to 64x64, rounded."""
    base = root / "celeba"
    names = read_partition(base / "list_eval_partition.txt")[split]
    out = []
    for name in names:
        with Image.open(base / "img_align_celeba" / name) as img:
            crop = np.asarray(img.convert("RGB"))[40:188, 15:163]
        out.append(np.rint(_brute_force_area(crop)).astype(np.uint8))  # k + 1/2 cannot occur: 37^2 is odd
    return np.stack(out)


def test_area_resize_matches_brute_force_on_random_input() -> None:
    image = np.random.default_rng(0).integers(0, 256, (148, 148, 3), dtype=np.uint8)
    exact = _brute_force_area(image)
    ours = area_resize(image, 64).astype(np.float64)
    assert np.abs(ours - exact).max() <= 0.5  # only the rounding differs
    assert np.abs(ours - exact).mean() < 0.3
    box = np.asarray(Image.fromarray(image).resize((64, 64), Image.BOX)).astype(np.float64)
    assert np.abs(box - exact).max() > 20  # PIL BOX is not an area average for 148 -> 64


def test_area_resize_of_a_smooth_image() -> None:
    i, j = np.mgrid[0:148, 0:148].astype(np.float64)
    image = np.stack([1.5 * i + 0.2 * j, 255 - 1.6 * j, 128 + 100 * np.sin(i / 30)], -1).round().astype(np.uint8)
    exact = _brute_force_area(image)
    assert np.abs(area_resize(image, 64) - exact).max() <= 0.5
    assert np.array_equal(area_resize(np.full((148, 148, 3), 77, np.uint8), 64), np.full((64, 64, 3), 77))


def _tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def test_generated_lmdbs(root: Path) -> None:
    lmdb_dir = root / "fusion_celeba_lmdb"
    assert sorted(p.name for p in lmdb_dir.iterdir()) == ["test", "train", "valid"]
    for split, count in COUNTS.items():
        meta = read_meta(lmdb_dir / split)
        assert meta["count"] == count and meta["channels"] == 3 and meta["kind"] == f"fusion_celeba/{split}"
        assert meta["shape"] == ([1, 64, 64, 3] if split == "train" else [4, 64, 64, 3])
        assert meta["seed"] == (None if split == "train" else 0) and meta["version"] == 2
    assert read_meta(lmdb_dir / "valid")["params"] == dict(
        crop=[15, 40, 163, 188], resize="area", image_size=64, n_ellipses=4, r_low=0, r_high=15, noise_std=0.0
    )
    train = LMDBReader(lmdb_dir / "train").get_many(range(COUNTS["train"]))[:, 0]
    assert np.array_equal(train, _faces(root, "train"))


def test_stored_validation_views(root: Path) -> None:
    stacks = LMDBReader(root / "fusion_celeba_lmdb" / "valid").get_many(range(COUNTS["valid"]))
    target, views = _tensor(stacks[:, -1]), torch.stack([_tensor(stacks[:, v]) for v in range(3)], 1)
    assert torch.equal(target, _tensor(_faces(root, "valid")))
    visible = (views == target.unsqueeze(1)).all(2, keepdim=True)  # mask shared across channels
    hidden = (views == 0).all(2, keepdim=True)
    assert (visible | hidden).all()
    assert 0.05 < visible.float().mean() < 0.95  # windows of radius < 15 in 64x64, 4 per view
    assert not torch.equal(views[:, 0], views[:, 1])  # each view has its own windows


def test_generation_independent_of_workers(root: Path, tmp_path: Path) -> None:
    build_celeba(root, tmp_path, CelebASpec(), workers=0, progress=False)
    for split in ("valid", "test"):
        ours = LMDBReader(tmp_path / split).get_many(range(COUNTS[split]))
        theirs = LMDBReader(root / "fusion_celeba_lmdb" / split).get_many(range(COUNTS[split]))
        assert np.array_equal(ours, theirs)


def test_regeneration_skipped_or_refused(root: Path) -> None:
    data = root / "fusion_celeba_lmdb" / "valid" / "data.mdb"
    before = data.stat()
    _dm(root).prepare_data()  # matching metadata: nothing rewritten
    after = data.stat()
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    with pytest.raises(LMDBMetadataError, match=r"params\.r_high: stored 15, config expects 12.*make_celeba"):
        _dm(root, r_high=12).prepare_data()
    with pytest.raises(LMDBMetadataError, match=r"seed: stored 0, config expects 5"):
        _dm(root, val_seed=5).setup("validate")
    with pytest.raises(LMDBMetadataError, match=r"shape: stored \[4, 64, 64, 3\], config expects \[3, 64, 64, 3\]"):
        _dm(root, k_max=2).setup("validate")


def test_lmdbs_of_an_older_generator_are_refused(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datamodules.make_celeba as make

    with monkeypatch.context() as m:
        m.setattr(make, "VERSION", 1)  # LMDBs of the PIL BOX era
        build_celeba(root, tmp_path, CelebASpec(), workers=0, progress=False)
    with pytest.raises(LMDBMetadataError, match=r"version: stored 1, config expects 2.*make_celeba --root"):
        _dm(root, lmdb_dir=str(tmp_path)).prepare_data()


def test_lmdbs_suffice_without_celeba(root: Path, tmp_path: Path) -> None:
    shutil.copytree(root / "fusion_celeba_lmdb", tmp_path / "lmdb")
    dm = _dm(tmp_path / "no_celeba_here", lmdb_dir=str(tmp_path / "lmdb"))
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) == COUNTS["train"] and len(dm.val_set) == COUNTS["valid"]


def test_missing_celeba_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"img_align_celeba.*paths\.data_dir.*FUSIONVAE_DATA_DIR"):
        _dm(tmp_path).prepare_data()
    with pytest.raises(FileNotFoundError, match=r"LMDB not found: .*fusion_celeba_lmdb/train.*prepare_data"):
        _dm(tmp_path).setup("fit")


def test_bad_partition_line(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("000001.jpg 0\n000002.jpg 7\n")
    with pytest.raises(ValueError, match=r"p\.txt:2: expected"):
        read_partition(tmp_path / "p.txt")


@pytest.mark.parametrize("flip", [False, True])
def test_train_items(root: Path, flip: bool) -> None:
    dm = _dm(root, flip=flip)
    dm.setup("fit")
    clean = _tensor(_faces(root, "train"))
    torch.manual_seed(0)
    items = torch.stack(dm.train_set.__getitems__(list(range(COUNTS["train"]))))
    assert items.shape == (COUNTS["train"], 4, 3, 64, 64) and items.dtype == torch.float32
    target = items[:, -1]
    same, mirrored = (target == clean).flatten(1).all(1), (target == clean.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all()
    assert mirrored.any() and same.any() if flip else same.all()
    views = items[:, :-1]
    assert ((views == target.unsqueeze(1)) | (views == 0)).all()


def test_validation_identical_across_instances_and_workers(root: Path) -> None:
    batches = []
    for workers in (0, 2):
        dm = _dm(root, num_workers=workers)
        dm.setup("validate")
        batches.append(torch.cat(list(dm.val_dataloader())))
        dm.teardown("validate")
    assert batches[0].shape == (COUNTS["valid"], 4, 3, 64, 64)
    assert torch.equal(batches[0], batches[1])
    dm = _dm(root)
    dm.setup("test")
    assert torch.cat(list(dm.test_dataloader())).shape == (COUNTS["test"], 4, 3, 64, 64)


def test_train_loader_with_workers(root: Path) -> None:
    dm = _dm(root, num_workers=2)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == COUNTS["train"] // 4
    assert all(b.shape == (4, 4, 3, 64, 64) and 0 <= b.min() and b.max() <= 1 for b in batches)


def test_cli(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    main(
        [
            "--root",
            str(root),
            "--out",
            str(tmp_path),
            "--workers",
            "0",
            "--image-size",
            "32",
            "--seed",
            "3",
            "--no-progress",
        ]
    )
    assert "valid: " in capsys.readouterr().out
    meta = read_meta(tmp_path / "valid")
    assert meta["shape"] == [4, 32, 32, 3] and meta["seed"] == 3 and meta["count"] == COUNTS["valid"]
