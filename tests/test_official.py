"""The official FusionVAE LMDBs (datamodules/official.py) on stand-ins written as the authors' code
writes them (tests/official_standins.py): exact pixels, tile order, colours, counts, errors and
one fast-dev-run training per dataset."""

from __future__ import annotations

import shutil
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from official_standins import CELEBA_NAMES, TLESS_NAMES, cv2_png, make_celeba_official, make_tless_official

from datamodules.images import luminance, quantize
from datamodules.lmdb_store import LMDBRecordError
from datamodules.official import (
    FusionCelebAOfficialDataModule,
    FusionTLessOfficialDataModule,
    OfficialLMDB,
    decode_png,
    premultiplied_rgba,
)
from datamodules.paste import object_targets
from fusionvae.jobs.train import train
from tests.conftest import TINY, compose_cfg

N_TRAIN, N_VALID, N_OBJECTS, N_OCCLUDERS = 12, 6, 10, 12
LOADER = dict(batch_size=4, val_batch_size=4, num_workers=0, pin_memory=False)


def _float(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[..., H, W, C]`` -> float ``[..., C, H, W]`` in [0, 1] (independent of the module)."""
    return torch.from_numpy(images.astype(np.float32) / 255).movedim(-1, -3)


@pytest.fixture(scope="module")
def celeba(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("celeba_official")
    return root, make_celeba_official(root, N_TRAIN, N_VALID)


@pytest.fixture(scope="module")
def tless(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("tless_official")
    return root, make_tless_official(root, "grey", N_OBJECTS, N_OCCLUDERS, N_VALID)


def _copy_lmdb(src: Path, dst: Path, edit) -> Path:
    """A copy of the LMDB ``src`` with ``edit(txn)`` applied (the original stays untouched)."""
    shutil.copytree(src, dst)
    env = lmdb.open(str(dst), map_size=1 << 30)
    with env.begin(write=True) as txn:
        edit(txn)
    env.close()
    return dst


# ----------------------------------------------------------------------------- reader


def test_celeba_records_exact(celeba, tmp_path: Path) -> None:
    root, truth = celeba
    train = OfficialLMDB(root / CELEBA_NAMES["train"])
    assert len(train) == N_TRAIN and train.shape == (1, 64, 64, 3) and train.mode == "RGB"  # count from the data
    faces = train.get_many(range(N_TRAIN))[:, 0]
    assert np.array_equal(faces, truth["train"])
    assert (faces[:, 0, 0] == (255, 0, 0)).all()  # cv2-reversed PNG decoded back to true RGB
    valid = OfficialLMDB(root / CELEBA_NAMES["valid"], tiles=4)
    assert len(valid) == N_VALID and valid.shape == (4, 64, 64, 3)
    stacks = valid.get_many(range(N_VALID))
    assert np.array_equal(stacks, truth["valid"])
    expected = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]  # view 1, view 2, view 3, target
    assert all((stacks[:, t, 0, 0] == colour).all() for t, colour in enumerate(expected))
    unreversed = OfficialLMDB(root / CELEBA_NAMES["valid"], tiles=4, reverse_channels=False).get_many([0])
    assert (unreversed[0, 0, 0, 0] == (0, 0, 255)).all()  # what cv2 stored
    wide = make_celeba_official(tmp_path, 3, 2, train_tiles=4)  # 4 tiles per train record: the last is the face
    assert np.array_equal(OfficialLMDB(tmp_path / CELEBA_NAMES["train"]).get_many(range(3))[:, 0], wide["train"])
    with pytest.raises(LMDBRecordError, match=r"train\.lmdb: record key '0' cannot be decoded.*4 tiles"):
        OfficialLMDB(tmp_path / CELEBA_NAMES["train"], tiles=1)


@pytest.mark.parametrize("fmt, mode", [("grey", "L"), ("rgb", "RGB"), ("rgba", "RGBA")])
def test_tless_format_detection(tmp_path: Path, fmt: str, mode: str) -> None:
    truth = make_tless_official(tmp_path, fmt, 3, 2, 2)
    objects = OfficialLMDB(tmp_path / TLESS_NAMES["objects"], rgba=True)
    assert objects.mode == mode and objects.shape == (1, 128, 128, 4)
    rgba = objects.get_many(range(3))[:, 0].astype(np.int64)
    src = truth["objects"].astype(np.int64)
    if fmt == "rgba":  # alpha from the alpha channel; colour premultiplied (rounded), so black off the object
        alpha = src[..., 3:]
        assert np.array_equal(rgba[..., 3:], alpha) and ((alpha > 0) & (alpha < 255)).any()
        assert np.array_equal(rgba[..., :3], np.floor(src[..., :3] * alpha / 255 + 0.5))
        assert (rgba[..., :3][alpha[..., 0] == 0] == 0).all() and (src[..., :3][alpha[..., 0] == 0] > 0).all()
    else:  # object on black: alpha = any channel > 0, colour unchanged (grey repeated)
        colour = np.repeat(src, 3, -1) if fmt == "grey" else src
        assert np.array_equal(rgba[..., :3], colour)
        assert np.array_equal(rgba[..., 3], (src.max(-1) > 0) * 255) and (rgba[..., 3] == 0).any()
    occluders = OfficialLMDB(tmp_path / TLESS_NAMES["occluders"], rgba=True)
    assert np.array_equal(occluders.get_many([1])[0, 0], premultiplied_rgba(truth["occluders"][1]))
    assert len(occluders) == 2 and occluders.shape == (1, 100, 100, 4)


def test_grey_alpha_png() -> None:
    la = np.zeros((4, 4, 2), dtype=np.uint8)
    la[..., 0], la[1, 1, 1], la[2, 2, 1] = 200, 255, 51  # grey 200; opaque, 20 % and transparent pixels
    arr, mode = decode_png(cv2_png(la), reverse_channels=True)
    assert mode == "LA" and np.array_equal(arr, la)
    rgba = premultiplied_rgba(arr)
    assert tuple(rgba[1, 1]) == (200, 200, 200, 255) and tuple(rgba[2, 2]) == (40, 40, 40, 51)
    assert tuple(rgba[0, 0]) == (0, 0, 0, 0)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError,
        match=rf"{tmp_path}/train\.lmdb.*train\.lmdb/, valid\.lmdb/.*"
        r"create_fusion_celeba_lmdb.*dataset\.official_dir",
    ):
        FusionCelebAOfficialDataModule(str(tmp_path), **LOADER).prepare_data()
    names = r".*".join(rf"{name}/" for name in TLESS_NAMES.values())
    with pytest.raises(
        FileNotFoundError,
        match=rf"{tmp_path}/train128x128cropped5socketClasses\.lmdb.*{names}"
        r".*dataset\.official_dir",
    ):
        FusionTLessOfficialDataModule(str(tmp_path), **LOADER).setup("fit")


def test_missing_key(celeba, tmp_path: Path) -> None:
    src = celeba[0] / CELEBA_NAMES["valid"]
    middle = _copy_lmdb(src, tmp_path / "middle.lmdb", lambda txn: txn.delete(b"2"))
    reader = OfficialLMDB(middle, tiles=4)  # cheap check passes: keys '0' and '4' exist, 5 entries
    assert len(reader) == N_VALID - 1
    with pytest.raises(LMDBRecordError, match=rf"{middle}: key '2' is missing; records must be .*'0'\.\.'4'"):
        reader.get_many([1, 2])
    first = _copy_lmdb(src, tmp_path / "first.lmdb", lambda txn: txn.delete(b"0"))
    with pytest.raises(LMDBRecordError, match=rf"{first}: key '0' is missing; records must be"):
        OfficialLMDB(first, tiles=4)
    padded = _copy_lmdb(src, tmp_path / "padded.lmdb", lambda txn: txn.put(b"__meta__", b"{}"))
    with pytest.raises(LMDBRecordError, match=rf"{padded}: key '6' is missing"):  # 7 entries: 0..6 expected
        OfficialLMDB(padded, tiles=4)


def test_undecodable_record(celeba, tmp_path: Path) -> None:
    src = celeba[0] / CELEBA_NAMES["valid"]
    bad = _copy_lmdb(src, tmp_path / "bad.lmdb", lambda txn: txn.put(b"3", b"not a png"))
    reader = OfficialLMDB(bad, tiles=4)
    assert reader.get_many([0, 2]).shape == (2, 4, 64, 64, 3)
    with pytest.raises(LMDBRecordError, match=rf"{bad}: record key '3' cannot be decoded"):
        reader.get_many([3])
    bad0 = _copy_lmdb(src, tmp_path / "bad0.lmdb", lambda txn: txn.put(b"0", b"\x89PNG junk"))
    with pytest.raises(LMDBRecordError, match=rf"{bad0}: record key '0' cannot be decoded"):
        OfficialLMDB(bad0, tiles=4)


def _edited_root(root: Path, dst: Path, name: str, edit) -> Path:
    """A copy of the official folder ``root`` with ``edit(txn)`` applied to its LMDB ``name``."""
    shutil.copytree(root, dst, ignore=shutil.ignore_patterns(name))
    _copy_lmdb(root / name, dst / name, edit)
    return dst


@pytest.mark.parametrize(
    "dataset, name, edit, problem",
    [
        ("celeba", CELEBA_NAMES["train"], lambda txn: txn.delete(b"5"), "key '5' is missing; records must be"),
        ("celeba", CELEBA_NAMES["valid"], lambda txn: txn.put(b"3", b"not a png"), "record key '3' cannot be decoded"),
        ("tless", TLESS_NAMES["objects"], lambda txn: txn.delete(b"4"), "key '4' is missing; records must be"),
        ("tless", TLESS_NAMES["valid"], lambda txn: txn.put(b"2", b"\x89PNG junk"), "record key '2' cannot be decoded"),
    ],
)
def test_prepare_data_finds_a_middle_gap_or_a_damaged_validation_record(
    celeba, tless, tmp_path: Path, dataset: str, name: str, edit, problem: str
) -> None:
    """Opening checks keys '0' and '<n-1>' only: a middle key or a damaged validation record would
    stop the run mid-epoch or at the first full validation; prepare_data finds them before training."""
    root = _edited_root((celeba if dataset == "celeba" else tless)[0], tmp_path / "official", name, edit)
    dm = (FusionCelebAOfficialDataModule if dataset == "celeba" else FusionTLessOfficialDataModule)(str(root), **LOADER)
    with pytest.raises(LMDBRecordError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert message.startswith(f"official LMDB {root / name}: {problem}") and "\n" not in message
    assert message.endswith("; copy it again from the official download (or re-create it) into dataset.official_dir")


# ----------------------------------------------------------------------------- datamodules


@pytest.mark.parametrize("k_max", [3, 2, 0])
def test_celeba_validation_stacks(celeba, k_max: int) -> None:
    root, truth = celeba
    dm = FusionCelebAOfficialDataModule(str(root), k_max=k_max, **LOADER)
    dm.setup("validate")
    batch = torch.cat(list(dm.val_dataloader()))
    assert batch.shape == (N_VALID, k_max + 1, 3, 64, 64) and batch.dtype == torch.float32
    assert torch.equal(batch, _float(truth["valid"][:, 3 - k_max :]))  # the LAST k_max views, then the target
    dm.setup("test")
    assert torch.equal(torch.cat(list(dm.test_dataloader())), batch)


def test_celeba_train_items(celeba) -> None:
    root, truth = celeba
    dm = FusionCelebAOfficialDataModule(str(root), **LOADER)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) == N_TRAIN
    torch.manual_seed(0)
    items = torch.stack(dm.train_set.__getitems__(list(range(N_TRAIN))))
    assert items.shape == (N_TRAIN, 4, 3, 64, 64)
    clean, target = _float(truth["train"]), items[:, -1]
    same, mirrored = (target == clean).flatten(1).all(1), (target == clean.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all() and same.any() and mirrored.any()  # flip p = 0.5
    views = items[:, :-1]
    visible = (views == target.unsqueeze(1)).all(2)
    assert ((views == 0).all(2) | visible).all() and 0.02 < visible.float().mean() < 0.98  # ellipse windows


def test_config_mismatches(celeba, tless) -> None:
    with pytest.raises(ValueError, match=r"valid\.lmdb: tiles are 64x64 px but dataset\.image_size=32"):
        FusionCelebAOfficialDataModule(str(celeba[0]), image_size=32, **LOADER).prepare_data()
    with pytest.raises(ValueError, match=r"dataset\.k_max must be <= 3"):
        FusionCelebAOfficialDataModule(str(celeba[0]), k_max=4, **LOADER)
    with pytest.raises(ValueError, match=r"FusionCelebA is RGB: set dataset\.channels=3"):
        FusionCelebAOfficialDataModule(str(celeba[0]), channels=1, **LOADER)
    with pytest.raises(ValueError, match=r"5socketClasses\.lmdb stores grey images \(PNG mode L\): .*channels=1"):
        FusionTLessOfficialDataModule(str(tless[0]), channels=3, **LOADER).prepare_data()


def test_tless_datamodule(tless) -> None:
    root, truth = tless
    dm = FusionTLessOfficialDataModule(str(root), workers=0, **LOADER)
    assert dm.channels == 1  # the official setting
    dm.setup("fit")
    bank = dm.train_set.bank
    assert bank.shape == (N_OCCLUDERS, 2, 50, 50) and bank.dtype == torch.uint8  # from the occluder LMDB
    assert len(dm.train_set) == N_OBJECTS
    items = torch.stack(dm.train_set.__getitems__(list(range(N_OBJECTS))))
    assert items.shape == (N_OBJECTS, 4, 1, 64, 64)
    grey = truth["objects"]
    expected = object_targets(premultiplied_rgba(grey), 64, 1)
    assert torch.equal(items[:, -1], expected)
    independent = torch.nn.functional.interpolate(_float(grey), size=64, mode="area")  # grey area-resized
    assert torch.allclose(expected, independent, atol=0.5 / 255 + 1e-6)
    assert (items[:, :-1] != items[:, -1:]).flatten(2).any(2).all()  # every view got occluders
    val = torch.cat(list(dm.val_dataloader()))
    assert torch.equal(val, _float(truth["valid"]))  # grey records, exact, [view 1..3, target]


def test_tless_rgb_validation(tmp_path: Path) -> None:
    truth = make_tless_official(tmp_path, "rgb", 2, 2, 3)
    for channels in (3, 1):
        dm = FusionTLessOfficialDataModule(str(tmp_path), channels=channels, k_max=1, **LOADER)
        dm.setup("validate")
        stacks = _float(truth["valid"][:, 2:])
        expected = stacks if channels == 3 else quantize(luminance(stacks))
        assert torch.equal(torch.cat(list(dm.val_dataloader())), expected)


def test_eval_config_defaults() -> None:
    for dataset in ("celeba_official", "tless_official"):
        assert compose_cfg("evaluate", ["ckpt_path=x", f"dataset={dataset}"]).eval.iw_samples == 100


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("dataset, channels", [("celeba_official", 3), ("tless_official", 1)])
def test_fast_dev_run(celeba, tless, tmp_path: Path, dataset: str, channels: int) -> None:
    root = celeba[0] if dataset == "celeba_official" else tless[0]
    extra = ["dataset.workers=0"] if dataset == "tless_official" else []
    cfg = compose_cfg(
        "train",
        [
            f"dataset={dataset}",
            *TINY,
            "dataset.batch_size=4",
            "dataset.val_batch_size=4",
            "debug=fdr",
            f"dataset.official_dir={root}",
            *extra,
            f"paths.output_dir={tmp_path / 'out'}",
        ],
    )
    assert cfg.model.channels == channels and cfg.model.bits_per_dim
    metrics = train(cfg)
    for k in range(4):
        bpd = metrics[f"val/nelbo_k{k}"]
        assert torch.isfinite(torch.tensor(bpd)) and 0 < bpd < 20
