"""dataset/corruption=paste: FusionT-LESS-style pasted occluders from a folder, for image_folder.

The bank respects alpha masks (and "on black" occluders), views differ from the target only where
an occluder lies, stored views are fixed and tied to the occluder folder (a changed folder is a
one-line refusal), bad occluder folders are one line, and train.py runs end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.demo_images import write_demo
from datamodules.errors import DataError
from datamodules.folder_scan import scan_folder
from datamodules.image_folder import ImageFolderDataModule
from datamodules.lmdb_store import LMDBMetadataError
from datamodules.paste import compose_views
from datamodules.paste_style import PastedOccluders, load_bank
from datamodules.training_order import SampleKey
from tests.conftest import ROOT


def write_occluders(folder: Path, count: int = 5) -> Path:
    """``count`` RGBA discs (alpha = the disc) and one RGB bar on black."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        h, w = (int(v) for v in rng.integers(20, 40, 2))
        yy, xx = np.mgrid[:h, :w]
        rgba = np.zeros((h, w, 4), np.uint8)
        rgba[..., :3] = rng.integers(50, 255, 3)
        rgba[..., 3] = 255 * (((yy - h / 2) / (h / 2)) ** 2 + ((xx - w / 2) / (w / 2)) ** 2 < 1)
        Image.fromarray(rgba).save(folder / f"disc{i}.png")
    bar = np.zeros((30, 30, 3), np.uint8)
    bar[5:25, 10:20] = 200
    Image.fromarray(bar).save(folder / "bar_on_black.png")
    return folder


def style(occluders: Path | None, **overrides) -> PastedOccluders:
    settings = dict(n_occluders_low=2, n_occluders_high=3, occluder_size=16, scale_low=0.9, scale_high=1.1)
    settings.update(max_shift=4.0, max_rotation=180.0, **overrides)
    return PastedOccluders(occluders and str(occluders), **settings)


def prepared(images: Path, occluders: Path, tmp_path: Path, **overrides) -> ImageFolderDataModule:
    dm = ImageFolderDataModule(
        style(occluders),
        data_dir=str(tmp_path / "data"),
        path=str(images),
        image_size=32,
        batch_size=8,
        num_workers=0,
        workers=0,
        **overrides,
    )
    dm.prepare_data()
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    write_demo(folder, 40)
    return folder


def test_bank_masks_by_alpha_or_black_and_pads_to_a_square(tmp_path):
    bank = load_bank(scan_folder(write_occluders(tmp_path / "occ")), 16, 3)
    assert bank.shape == (6, 4, 16, 16) and bank.dtype == torch.uint8
    bar = bank[0]  # bar_on_black.png sorts first
    assert bar[3, 8, 0] == 0 and bar[3, 8, 8] == 255  # outside / inside the bar
    assert (bar[:3].int() <= bar[3:].int()).all()  # premultiplied: colour <= alpha
    disc = bank[1]
    assert disc[3, 0, 0] == 0 and disc[3, 8, 8] == 255 and disc[:3, 0, 0].eq(0).all()
    assert load_bank(scan_folder(tmp_path / "occ"), 16, 1).shape == (6, 2, 16, 16)


def test_views_change_only_under_occluders_and_stored_views_are_fixed(images, tmp_path):
    occluders = write_occluders(tmp_path / "occ")
    dm = prepared(images, occluders, tmp_path / "a")
    item = dm.val_set[0]
    assert item.shape == (4, 3, 32, 32) and not torch.equal(item[0], item[3])
    assert torch.equal(item, prepared(images, occluders, tmp_path / "b").val_set[0])  # stored once, same draws
    a, b = dm.train_set[SampleKey(2, 5)], dm.train_set[SampleKey(2, 6)]
    assert torch.equal(a, dm.train_set[SampleKey(2, 5)]) and not torch.equal(a[:3], b[:3])
    target = item[3]
    views, coverage = compose_views(target[None], dm.style.bank(3), 3, dm.style.paste(), torch.Generator())
    clear = (coverage == 0).expand_as(views)
    assert coverage.any() and clear.any()
    assert torch.equal(views[clear], target.expand_as(views)[clear])  # unchanged where nothing was pasted


def test_changed_occluders_are_refused_in_one_line(images, tmp_path):
    occluders = write_occluders(tmp_path / "occ")
    prepared(images, occluders, tmp_path)
    write_occluders(tmp_path / "occ", 6)  # one more disc
    with pytest.raises(LMDBMetadataError, match=r"params.occluders: stored .*add dataset.rebuild=true") as err:
        prepared(images, occluders, tmp_path)
    assert "\n" not in str(err.value)
    assert len(prepared(images, occluders, tmp_path, rebuild=True).val_set) == 4


@pytest.mark.parametrize(
    "case, match",
    [
        ("unset", r"needs the occluder images: add dataset.corruption.occluders=<folder>"),
        ("empty", r"image folder .* holds no images"),
        ("unreadable", r"1 of 7 occluder images in .* cannot be used: broken.png"),
    ],
)
def test_bad_occluder_folders_are_one_line(images, tmp_path, case, match):
    occluders = None if case == "unset" else tmp_path / "occ"
    if case == "empty":
        occluders.mkdir()
    if case == "unreadable":
        write_occluders(occluders)
        (occluders / "broken.png").write_text("no")
    with pytest.raises(DataError, match=match) as err:
        prepared(images, occluders, tmp_path)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_train_py_runs_with_pasted_occluders(tmp_path):
    write_demo(tmp_path / "images", 60)
    cmd = [
        sys.executable,
        "train.py",
        "dataset=image_folder",
        f"dataset.path={tmp_path / 'images'}",
        "dataset/corruption=paste",
        f"dataset.corruption.occluders={write_occluders(tmp_path / 'occ')}",
        "dataset.corruption.occluder_size=16",
        "dataset.image_size=32",
        "dataset.batch_size=8",
        "dataset.num_workers=0",
        "dataset.workers=0",
        "debug=fdr",
        "model/size=tiny",
        "trainer=cpu",
        "logger=csv",
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_style_presets_repeat_the_built_in_datasets_values():
    """The presets are FusionT-LESS's pasting and FusionCelebA's ellipses: the copies agree."""
    import dataclasses

    from omegaconf import OmegaConf

    from datamodules.paste import PasteParams
    from tests.conftest import CONF

    paste = OmegaConf.load(CONF / "dataset" / "corruption" / "paste.yaml")
    assert {f.name: f.default for f in dataclasses.fields(PasteParams)} == {
        k: v for k, v in paste.items() if k not in ("_target_", "occluders")
    }
    ellipses, celeba = (OmegaConf.load(CONF / "dataset" / p) for p in ("corruption/ellipses.yaml", "celeba.yaml"))
    assert all(celeba[k] == v for k, v in ellipses.items() if k != "_target_")
