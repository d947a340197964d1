"""FusionT-LESS: BOP -> LMDB pools, fixed validation set, occluder pasting and the datamodule."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from standins import make_tless

from datamodules.lmdb_store import LMDBMetadataError, LMDBReader, read_meta
from datamodules.make_tless import main
from datamodules.paste import PasteParams, compose_views, draw_placements, object_targets
from datamodules.tless import FusionTLessDataModule

OBJECTS, OCCLUDERS, PER_OBJECT, N_VAL = (1, 2, 3, 4, 5), (6, 7, 8), 6, 6


def _dm(data_dir: Path, **kwargs) -> FusionTLessDataModule:
    defaults = dict(
        occluder_ids=OCCLUDERS, n_val=N_VAL, batch_size=4, val_batch_size=4, num_workers=0, pin_memory=False, workers=2
    )
    return FusionTLessDataModule(data_dir=str(data_dir), **{**defaults, **kwargs})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_tless(root / "tless", OBJECTS, OCCLUDERS, PER_OBJECT)  # default bop_root: <data_dir>/tless
    _dm(root).prepare_data()
    return root


def _lmdb(data_dir: Path, name: str) -> LMDBReader:
    return LMDBReader(data_dir / "fusion_tless_lmdb" / name)


# ----------------------------------------------------------------------------- generation


def test_pools(data_dir: Path) -> None:
    counts = {
        "objects_train": len(OBJECTS) * PER_OBJECT - N_VAL,
        "objects_val": N_VAL,
        "occluders": len(OCCLUDERS) * PER_OBJECT,
    }
    for name, count in counts.items():
        meta = read_meta(data_dir / "fusion_tless_lmdb" / name)
        size = 100 if name == "occluders" else 128
        assert meta["count"] == count and meta["shape"] == [1, size, size, 4] and meta["channels"] == 4
        assert meta["params"]["ids"] == list(OCCLUDERS if name == "occluders" else OBJECTS)
        rgba = _lmdb(data_dir, name).get_many(range(count))[:, 0].astype(int)
        colour, alpha = rgba[..., :3], rgba[..., 3:]
        assert (colour <= alpha).all() and (alpha == 0).any() and (alpha == 255).any()  # premultiplied
        # Square crop around the tight bbox: the object touches two opposite borders of its crop.
        rows, cols = alpha[..., 0].any(2), alpha[..., 0].any(1)
        assert ((rows[:, 0] & rows[:, -1]) | (cols[:, 0] & cols[:, -1])).all()
    train = _lmdb(data_dir, "objects_train").get_many(range(counts["objects_train"]))
    held = _lmdb(data_dir, "objects_val").get_many(range(N_VAL))
    assert not any(np.array_equal(h, t) for h in held for t in train)  # disjoint split


def test_validation_set(data_dir: Path) -> None:
    meta = read_meta(data_dir / "fusion_tless_lmdb" / "val")
    assert meta["count"] == N_VAL and meta["shape"] == [4, 64, 64, 3] and meta["seed"] == 0
    assert meta["params"]["paste"]["n_occluders_low"] == 5 and meta["params"]["paste"]["n_occluders_high"] == 8
    stacks = torch.from_numpy(_lmdb(data_dir, "val").get_many(range(N_VAL))).permute(0, 1, 4, 2, 3).float() / 255
    objects = _lmdb(data_dir, "objects_val").get_many(range(N_VAL))[:, 0]
    assert torch.allclose(stacks[:, -1], object_targets(objects, 64, 3), atol=1e-6)
    changed = (stacks[:, :-1] != stacks[:, -1:]).any(2)
    assert changed.flatten(2).any(2).all()  # every view is occluded somewhere


def test_regeneration_skipped_or_refused(data_dir: Path) -> None:
    files = [data_dir / "fusion_tless_lmdb" / n / "data.mdb" for n in ("objects_train", "occluders", "val")]
    before = [(f.stat().st_ino, f.stat().st_mtime_ns) for f in files]
    _dm(data_dir).prepare_data()
    assert before == [(f.stat().st_ino, f.stat().st_mtime_ns) for f in files]
    with pytest.raises(LMDBMetadataError, match=r"paste\.n_occluders_high: stored 8, config expects 7.*make_tless"):
        _dm(data_dir, n_occluders_high=7).prepare_data()
    ids = r"params\.ids: stored \[1, 2, 3, 4, 5\], config expects \[1, 2, 3, 4\]"
    with pytest.raises(LMDBMetadataError, match=ids):
        _dm(data_dir, object_ids=[1, 2, 3, 4]).prepare_data()
    with pytest.raises(LMDBMetadataError, match=r"seed: stored 0, config expects 1"):
        _dm(data_dir, val_seed=1).setup("validate")


def test_missing_bop_tree(tmp_path: Path, data_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"train_primesense/000001/scene_gt_info\.json.*dataset\.bop_root"):
        _dm(tmp_path).prepare_data()
    shutil.copytree(data_dir / "fusion_tless_lmdb", tmp_path / "lmdb")  # LMDBs alone suffice
    dm = _dm(tmp_path, lmdb_dir=str(tmp_path / "lmdb"))
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.val_set) == N_VAL


def test_cli_matches_datamodule(data_dir: Path, tmp_path: Path) -> None:
    main(
        [
            "--bop-root",
            str(data_dir / "tless"),
            "--out",
            str(tmp_path),
            "--occluder-ids",
            *map(str, OCCLUDERS),
            "--n-val",
            str(N_VAL),
            "--workers",
            "0",
            "--no-progress",
        ]
    )
    ours, theirs = LMDBReader(tmp_path / "val"), _lmdb(data_dir, "val")
    assert np.array_equal(ours.get_many(range(N_VAL)), theirs.get_many(range(N_VAL)))  # workers 0 vs 2
    shutil.rmtree(tmp_path / "val")
    main(
        [
            "--out",
            str(tmp_path),
            "--val-only",
            "--occluder-ids",
            *map(str, OCCLUDERS),
            "--n-val",
            str(N_VAL),
            "--val-seed",
            "1",
            "--no-progress",
        ]
    )
    assert read_meta(tmp_path / "val")["seed"] == 1


# ----------------------------------------------------------------------------- pasting


def _bank(n: int, channels: int, size: int = 50, opaque: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    alpha = torch.full((n, 1, size, size), 255, dtype=torch.uint8)
    if not opaque:
        alpha = (torch.rand((n, 1, size, size), generator=g) > 0.3).to(torch.uint8) * 255
    colour = (torch.rand((n, channels, size, size), generator=g) * alpha).to(torch.uint8)
    return torch.cat([colour, alpha], 1)


@pytest.mark.parametrize("channels", [1, 3])
def test_views_change_only_where_pasted(channels: int) -> None:
    targets = torch.randint(0, 256, (6, channels, 64, 64)).float() / 255
    params = PasteParams(n_occluders_low=2, n_occluders_high=4)
    views, coverage = compose_views(targets, _bank(10, channels), 3, params, torch.Generator().manual_seed(1))
    assert views.shape == (6, 3, channels, 64, 64) and coverage.shape == (6, 3, 1, 64, 64)
    free = (coverage == 0).expand_as(views)
    assert torch.equal(views[free], targets.unsqueeze(1).expand_as(views)[free])
    assert (coverage > 0).any(-1).any(-1).all()  # each view got occluders
    assert torch.equal(views, (views * 255).round() / 255) and 0 <= views.min() and views.max() <= 1
    again, _ = compose_views(targets, _bank(10, channels), 3, params, torch.Generator().manual_seed(1))
    assert torch.equal(views, again)  # seeded: reproducible


def test_occluder_counts_and_geometry() -> None:
    params = PasteParams(n_occluders_low=5, n_occluders_high=8)
    counts = draw_placements(2000, 7, 64, params, torch.Generator().manual_seed(0)).valid.sum(1)
    assert counts.min() == 5 and counts.max() == 8
    # One opaque square, no rotation / scale / shift: exactly the central 50x50 pixels.
    exact = PasteParams(n_occluders_low=1, n_occluders_high=1, scale_low=1, scale_high=1, max_shift=0, max_rotation=0)
    views, coverage = compose_views(torch.zeros(1, 3, 64, 64), _bank(1, 3, opaque=True), 1, exact)
    expected = torch.zeros(64, 64, dtype=torch.bool)
    expected[7:57, 7:57] = True
    assert torch.equal(coverage[0, 0, 0] > 0.5, expected)
    # Random rotations keep the area (50 * 50 px) and stay within the circumscribed circle.
    turned = PasteParams(n_occluders_low=1, n_occluders_high=1, scale_low=1, scale_high=1, max_shift=0)
    _, coverage = compose_views(
        torch.zeros(1, 3, 64, 64), _bank(1, 3, opaque=True), 40, turned, torch.Generator().manual_seed(0)
    )
    coverage = coverage[0, :, 0]  # [40 views, 64, 64]
    assert ((coverage.flatten(1).sum(1) - 2500).abs() < 60).all()
    i, j = torch.meshgrid(torch.arange(64) + 0.5, torch.arange(64) + 0.5, indexing="ij")
    radius = ((i - 32) ** 2 + (j - 32) ** 2).sqrt()
    assert (radius[(coverage > 0).any(0)] <= 25 * 2**0.5 + 1).all()
    assert (coverage[:, :, :7] > 0.5).any()  # some squares turned past the axis-aligned box


def test_grey_and_rgb_targets() -> None:
    rgba = np.zeros((2, 128, 128, 4), dtype=np.uint8)
    rgba[:, 32:96, 32:96] = (200, 100, 50, 255)
    rgb, grey = object_targets(rgba, 64, 3), object_targets(rgba, 64, 1)
    assert rgb.shape == (2, 3, 64, 64) and grey.shape == (2, 1, 64, 64)
    assert torch.allclose(rgb[0, :, 32, 32] * 255, torch.tensor([200.0, 100, 50]))
    assert grey[0, 0, 32, 32] * 255 == round(0.299 * 200 + 0.587 * 100 + 0.114 * 50) and grey[0, 0, 0, 0] == 0


# ----------------------------------------------------------------------------- datamodule


@pytest.mark.parametrize("channels", [3, 1])
def test_train_items(data_dir: Path, channels: int) -> None:
    dm = _dm(data_dir, channels=channels)
    dm.setup("fit")
    n = len(dm.train_set)
    items = torch.stack(dm.train_set.__getitems__(list(range(n))))
    assert items.shape == (n, 4, channels, 64, 64) and items.dtype == torch.float32
    objects = _lmdb(data_dir, "objects_train").get_many(range(n))[:, 0]
    assert torch.equal(items[:, -1], object_targets(objects, 64, channels))
    assert (items[:, :-1] != items[:, -1:]).flatten(2).any(2).all()
    val = next(iter(dm.val_dataloader()))
    assert val.shape == (4, 4, channels, 64, 64)


def test_validation_identical_across_instances_and_workers(data_dir: Path) -> None:
    batches = []
    for workers in (0, 2):
        dm = _dm(data_dir, num_workers=workers)
        dm.setup("validate")
        batches.append(torch.cat(list(dm.val_dataloader())))
        dm.teardown("validate")
    assert batches[0].shape == (N_VAL, 4, 3, 64, 64) and torch.equal(batches[0], batches[1])
    dm = _dm(data_dir)
    dm.setup("test")
    assert torch.equal(torch.cat(list(dm.test_dataloader())), batches[0])


def test_train_loader_with_workers(data_dir: Path) -> None:
    dm = _dm(data_dir, num_workers=2)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == (len(OBJECTS) * PER_OBJECT - N_VAL) // 4
    assert all(b.shape == (4, 4, 3, 64, 64) for b in batches)
