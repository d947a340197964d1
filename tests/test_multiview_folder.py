"""dataset=multiview_folder: one folder per scene with 1..k_max views and a target image.

Scenes without a target are left out, training fills the view slots with the scene's distinct
views first, stored validation stacks repeat the views in name order, bad scenes (loose images,
too many views, mixed sizes, unreadable files) and a changed folder are one line each, and
``python train.py dataset=multiview_folder ... debug=fdr`` runs for grey and RGB scenes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.demo_images import write_scenes
from datamodules.errors import DataError
from datamodules.folder_scan import fit_image
from datamodules.lmdb_store import LMDBMetadataError, is_complete
from datamodules.multiview_folder import MultiviewFolderDataModule, SceneStacks
from datamodules.training_order import SampleKey
from tests.conftest import ROOT


def datamodule(folder: Path, tmp_path: Path, **overrides) -> MultiviewFolderDataModule:
    settings = dict(data_dir=str(tmp_path / "data"), path=str(folder), channels=1, image_size=32, batch_size=4)
    settings.update(num_workers=0, workers=0, lmdb_dir=str(tmp_path / "lmdb"), **overrides)
    return MultiviewFolderDataModule(**settings)


def scenes(tmp_path: Path, count: int = 30, size: int = 32) -> Path:
    """``count`` grey scenes; scene001 keeps 1 view, scene002 2 views, scene003 has no target."""
    folder = tmp_path / "scenes"
    write_scenes(folder, count, size, grey=True)
    for name in ("view2.png", "view3.png"):
        (folder / "scene001" / name).unlink()
    (folder / "scene002" / "view3.png").unlink()
    (folder / "scene003" / "target.png").unlink()
    return folder


def test_scenes_split_and_training_fills_the_slots_with_distinct_views_first(tmp_path):
    folder = scenes(tmp_path)
    dm = datamodule(folder, tmp_path)
    dm.prepare_data()
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (23, 3, 3)  # the 29 scenes with a target
    assert all(item.shape == (4, 1, 32, 32) for item in (dm.train_set[0], dm.val_set[0], dm.test_set[0]))
    readers = [dm.train_set.reader, dm.val_set.reader, dm.test_set.reader]
    few = [(r, i, n) for r in readers for i, n in enumerate(r.meta["views"]) if n < 3]
    assert sorted(n for _, _, n in few) == [1, 2]  # scene001 and scene002, wherever the split put them
    for reader, index, n in few:
        stacks = SceneStacks(reader, reader.meta["views"], k_max=3, flip=False)
        item = stacks[SampleKey(index, 7)]
        assert torch.equal(item, stacks[SampleKey(index, 7)])  # drawn from the key
        stored = torch.from_numpy(reader.get(index)).permute(0, 3, 1, 2).float() / 255
        distinct = {stored[v].numpy().tobytes() for v in range(n)}
        assert {item[v].numpy().tobytes() for v in range(n)} == distinct  # every view first
        assert item[2].numpy().tobytes() in distinct and torch.equal(item[3], stored[3])  # target last


def test_stored_stack_repeats_views_in_name_order(tmp_path):
    folder = tmp_path / "scenes"
    write_scenes(folder, 8, 32, grey=True)
    for s in range(8):  # train/val by folder: scene000 validates with 2 views
        target = "val" if s == 0 else "train"
        shutil.move(folder / f"scene{s:03d}", folder / target / f"scene{s:03d}")
    (folder / "val" / "scene000" / "view3.png").unlink()
    dm = datamodule(folder, tmp_path)
    dm.prepare_data()
    dm.setup()
    scene = folder / "val" / "scene000"
    want = [fit_image(scene / f, 32, 1) for f in ("view1.png", "view2.png", "view1.png", "target.png")]
    want = torch.from_numpy(np.stack(want)).permute(0, 3, 1, 2).float() / 255
    assert len(dm.val_set) == 1 and torch.equal(dm.val_set[0], want) and dm.test_set is None


@pytest.mark.parametrize(
    "case, match",
    [
        ("loose", r"1 image\(s\) lie directly in .*: put each scene's views"),
        ("too many", r"1 scene\(s\) in .* do not have 1 to dataset.k_max=3 views: scene004 \(4 views\)"),
        ("mixed", r"1 of 30 scenes in .* cannot be used: scene005 \(mixed sizes 32x32, 40x32\)"),
        ("unreadable", r"1 of 30 scenes in .* cannot be used: scene006/view2.png \(cannot identify image file\)"),
        ("no target", r"no scene in .* has a target image"),
    ],
)
def test_bad_scenes_are_one_line(tmp_path, case, match):
    folder = tmp_path / "scenes"
    write_scenes(folder, 30, 32, grey=True)
    if case == "loose":
        shutil.copy(folder / "scene000" / "view1.png", folder / "loose.png")
    if case == "too many":
        shutil.copy(folder / "scene004" / "view1.png", folder / "scene004" / "view4.png")
    if case == "mixed":
        Image.fromarray(np.zeros((32, 40), np.uint8)).save(folder / "scene005" / "view3.png")
    if case == "unreadable":
        (folder / "scene006" / "view2.png").write_text("not a png")
    if case == "no target":
        for target in folder.glob("*/target.png"):
            target.unlink()
    with pytest.raises(DataError, match=match) as err:
        datamodule(folder, tmp_path).prepare_data()
    assert "\n" not in str(err.value) and not is_complete(tmp_path / "lmdb" / "train")


def test_changed_folder_is_refused_and_rebuilt(tmp_path):
    folder = scenes(tmp_path)
    datamodule(folder, tmp_path).prepare_data()
    write_scenes(tmp_path / "more", 1, 32, grey=True)
    shutil.move(tmp_path / "more" / "scene000", folder / "scene999")
    with pytest.raises(LMDBMetadataError, match=r"has changed since its LMDB .*add dataset.rebuild=true"):
        datamodule(folder, tmp_path).prepare_data()
    dm = datamodule(folder, tmp_path, rebuild=True)
    dm.prepare_data()
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == 30


@pytest.mark.slow
@pytest.mark.parametrize("grey, channels", [(True, 1), (False, 3)], ids=["grey", "rgb"])
def test_train_py_runs_on_scene_folders(tmp_path, grey, channels):
    folder = tmp_path / "scenes"
    write_scenes(folder, 40, 32, grey=grey)
    (folder / "scene001" / "view3.png").unlink()
    cmd = [
        sys.executable,
        "train.py",
        "dataset=multiview_folder",
        f"dataset.path={folder}",
        f"dataset.channels={channels}",
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
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "val/nelbo" in proc.stdout + proc.stderr
