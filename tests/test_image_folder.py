"""dataset=image_folder (README "Your own images"): any folder of images becomes a Fusion dataset.

The split is deterministic and disjoint, images are centre-cropped and area-resized exactly, the
validation / test views are stored once, a changed folder or setting is refused in one line naming
the rebuild, and every bad input (no path, a missing or empty folder, unreadable images, too few
images) is one line. End to end (subprocesses): ``python train.py dataset=image_folder ...`` on grey
(debug=fdr) and RGB folders (one short epoch, then ``evaluate.py`` on its checkpoint), and
``fusionvae-fuse`` on a scene folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.demo_images import write_demo, write_scenes
from datamodules.errors import DataError
from datamodules.folder_scan import fit_image, scan_folder, split_files
from datamodules.image_folder import ImageFolderDataModule
from datamodules.lmdb_store import LMDBMetadataError, is_complete, read_meta
from datamodules.make_celeba import area_resize
from datamodules.training_order import SampleKey
from datamodules.view_styles import EllipseWindows
from tests.conftest import ROOT, compose_cfg, save_checkpoint

STYLE = EllipseWindows(n_ellipses=2, r_low=5, r_high=10, noise_std=0.25)


def dm_settings(folder: Path | None, data: Path) -> dict:
    settings = dict(data_dir=str(data), path=folder and str(folder), channels=1, image_size=32, batch_size=8)
    return {**settings, "num_workers": 0, "workers": 0}


def datamodule(folder: Path | None, data: Path, **overrides) -> ImageFolderDataModule:
    return ImageFolderDataModule(STYLE, **{**dm_settings(folder, data), **overrides})


def prepared(folder: Path, data: Path, **overrides) -> ImageFolderDataModule:
    dm = datamodule(folder, data, **overrides)
    dm.prepare_data()
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def grey(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("grey")
    write_demo(folder, 200, grey=True)
    return folder


def small_folder(tmp_path: Path, count: int = 40, name: str = "small") -> Path:
    write_demo(tmp_path / name, count, grey=True, seed=1)
    return tmp_path / name


# ---- split and preprocessing ------------------------------------------------------------------------
def test_seeded_split_is_deterministic_disjoint_and_covers_the_folder(grey):
    scan = scan_folder(grey)
    rule, parts = split_files(scan, 0.1, 0.1, 0)
    assert rule == "seeded" and (rule, parts) == split_files(scan_folder(grey), 0.1, 0.1, 0)
    assert {k: len(v) for k, v in parts.items()} == {"train": 160, "valid": 20, "test": 20}
    sets = [set(v) for v in parts.values()]
    assert sum(map(len, sets)) == len(set().union(*sets)) == len(scan.files) == 200  # disjoint, complete
    assert set(split_files(scan, 0.1, 0.1, 1)[1]["valid"]) != sets[1]  # the seed chooses
    assert all(v == sorted(v) for v in parts.values())


def test_split_by_sub_folders_and_images_outside_them_are_refused(tmp_path):
    write_demo(tmp_path / "train", 10, grey=True)
    write_demo(tmp_path / "val", 3, grey=True, seed=1)
    rule, parts = split_files(scan_folder(tmp_path), 0.1, 0.1, 0)
    assert rule == "folders" and [len(parts[s]) for s in ("train", "valid", "test")] == [10, 3, 0]
    assert all(p.startswith("train/") for p in parts["train"])
    write_demo(tmp_path / "extra", 1, grey=True)
    with pytest.raises(DataError, match=r"1 image\(s\) are outside train/, val/ and test/ \(first: extra/"):
        split_files(scan_folder(tmp_path), 0.1, 0.1, 0)


def test_fit_image_centre_crops_and_area_resizes(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    assert np.array_equal(fit_image(tmp_path / "a.png", 16, 3), area_resize(rgb[5:35], 16))  # rows 5:35 centred
    grey = np.asarray(Image.fromarray(rgb).convert("L"))[5:35, :, None]
    assert np.array_equal(fit_image(tmp_path / "a.png", 16, 1), area_resize(grey, 16))
    rgba = np.dstack([rgb, np.zeros((40, 30), np.uint8)])  # fully transparent: black
    Image.fromarray(rgba).save(tmp_path / "t.png")
    assert not fit_image(tmp_path / "t.png", 8, 3).any()


# ---- the LMDBs ---------------------------------------------------------------------------------------
def test_items_stored_views_and_training_views(grey, tmp_path):
    dm = prepared(grey, tmp_path / "a")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (160, 20, 20)
    for item in (dm.train_set[0], dm.val_set[0], dm.test_set[0]):
        assert item.shape == (4, 1, 32, 32) and 0 <= item.min() and item.max() <= 1
    train_files = split_files(scan_folder(grey), 0.1, 0.1, 0)[1]["train"]
    want = torch.from_numpy(fit_image(grey / train_files[7], 32, 1)).permute(2, 0, 1).float() / 255
    assert torch.equal(dm.train_set[SampleKey(7, 1)][-1], want)  # clean target = the fitted image
    again = prepared(grey, tmp_path / "b")  # another LMDB directory: the same stored views
    assert torch.equal(dm.val_set[3], again.val_set[3]) and torch.equal(dm.test_set[5], again.test_set[5])
    assert not torch.equal(dm.val_set[3][0], dm.val_set[3][1])  # views differ
    a, b = dm.train_set[SampleKey(4, 11)], dm.train_set[SampleKey(4, 12)]
    assert torch.equal(a, dm.train_set[SampleKey(4, 11)]) and not torch.equal(a[:3], b[:3])  # per-seed views


def test_changed_folder_is_refused_in_one_line_and_rebuilt_on_request(tmp_path):
    folder = small_folder(tmp_path)
    prepared(folder, tmp_path / "data")
    shutil.copy(folder / "part0" / "img0000.png", folder / "part1" / "new.png")
    with pytest.raises(LMDBMetadataError) as err:
        datamodule(folder, tmp_path / "data").prepare_data()
    message = str(err.value)
    assert "\n" not in message and "has changed since its LMDB" in message and "40 images then, 41 now" in message
    assert "add dataset.rebuild=true" in message
    dm = prepared(folder, tmp_path / "data", rebuild=True)
    assert (
        read_meta(dm.lmdb_dir / "images")["count"] == 41 and len(dm.val_set) + len(dm.test_set) == 8
    )  # round(4.1) each
    prepared(folder, tmp_path / "data")  # up to date again


def test_other_settings_are_refused_naming_the_field(tmp_path):
    folder = small_folder(tmp_path)
    dm = prepared(folder, tmp_path / "data")
    with pytest.raises(LMDBMetadataError, match=r"image_size: stored 32, config expects 16.*dataset.rebuild=true"):
        datamodule(folder, tmp_path / "data", image_size=16, lmdb_dir=str(dm.lmdb_dir)).prepare_data()


def test_changed_views_are_refused_and_only_the_views_rebuilt(tmp_path):
    folder = small_folder(tmp_path)
    dm = prepared(folder, tmp_path / "data")
    images_file = os.stat(dm.lmdb_dir / "images" / "data.mdb").st_ino
    other = EllipseWindows(n_ellipses=3, r_low=5, r_high=10, noise_std=0.25)
    with pytest.raises(LMDBMetadataError, match=r"valid was generated with .*params.n_ellipses: stored 2"):
        ImageFolderDataModule(other, **dm_settings(folder, tmp_path / "data")).prepare_data()
    rebuilt = ImageFolderDataModule(other, **dm_settings(folder, tmp_path / "data"), rebuild=True)
    rebuilt.prepare_data()
    rebuilt.setup()
    assert read_meta(rebuilt.lmdb_dir / "valid")["params"]["n_ellipses"] == 3
    assert os.stat(dm.lmdb_dir / "images" / "data.mdb").st_ino == images_file  # the images were kept


@pytest.mark.parametrize(
    "case, match",
    [
        ("no path", r"needs the folder of images: add dataset.path=<folder>"),
        ("empty", r"holds no images \(png, jpg"),
        ("unreadable", r"2 of 42 images in .* cannot be used: a/bad.png \(cannot identify image file\); b.jpg "),
        ("too few", r"too few images for the split: 5 images give 3 train, 1 valid, 1 test .*dataset.batch_size=8 "),
    ],
)
def test_bad_inputs_are_one_line(tmp_path, case, match):
    folder = tmp_path / "images"
    folder.mkdir()
    if case == "unreadable":
        small_folder(tmp_path, name="images")
        (folder / "a").mkdir()
        (folder / "a" / "bad.png").write_text("not a png")
        (folder / "b.jpg").write_bytes(b"\xff\xd8 truncated")
    if case == "too few":
        small_folder(tmp_path, 5, name="images")
    dm = datamodule(None if case == "no path" else folder, tmp_path / "data", lmdb_dir=str(tmp_path / "lmdb"))
    with pytest.raises(DataError, match=match) as err:
        dm.prepare_data()
    assert "\n" not in str(err.value)
    assert not is_complete(tmp_path / "lmdb" / "images")  # nothing half-made is kept


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"image folder not found: .*nowhere \(set dataset.path"):
        datamodule(tmp_path / "nowhere", tmp_path / "data").prepare_data()


def test_config_interpolates_into_the_model():
    cfg = compose_cfg("train", ["dataset=image_folder", "dataset.channels=1", "dataset.image_size=32"])
    assert (cfg.model.channels, cfg.model.image_size, cfg.model.k_max) == (1, 32, 3)
    assert cfg.dataset.corruption._target_.endswith("EllipseWindows")
    assert compose_cfg("evaluate", ["dataset=image_folder", "ckpt_path=x"]).eval.iw_samples == 100


# ---- end to end -------------------------------------------------------------------------------------
def run_train(folder: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "train.py",
        "dataset=image_folder",
        f"dataset.path={folder}",
        "model/size=tiny",
        "trainer=cpu",
        "logger=csv",
        "dataset.num_workers=0",
        "dataset.workers=0",
        "dataset.image_size=32",
        "dataset.batch_size=8",
        "dataset.val_batch_size=8",
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:") or "Traceback" in line]


@pytest.mark.slow
@pytest.mark.parametrize("grey_images, channels", [(True, 1), (False, 3)], ids=["grey", "rgb"])
def test_train_py_runs_end_to_end_and_refuses_a_changed_folder(tmp_path, grey_images, channels):
    folder = tmp_path / "images"
    write_demo(folder, 200, grey=grey_images)
    # grey: one batch of each (fast_dev_run); RGB: one short epoch, which writes a checkpoint to evaluate
    short = ["debug=fdr"] if grey_images else [f"trainer.{k}=1" for k in ("max_epochs", "limit_train_batches")]
    proc = run_train(folder, tmp_path, f"dataset.channels={channels}", "trainer.limit_val_batches=1", *short)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "val/nelbo" in proc.stdout + proc.stderr
    if not grey_images:  # evaluate.py finds the folder and settings in the run
        cmd = [
            sys.executable,
            "evaluate.py",
            f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}",
            *("trainer=cpu", "trainer.limit_test_batches=1", "dataset.val_batch_size=4", "dataset.num_workers=0"),
            *("eval.iw_samples=2", "eval.iw_chunk=2", "eval.num_samples=2", "eval.grid_images=1"),
            f"paths.data_dir={tmp_path / 'data'}",
            f"hydra.run.dir={tmp_path / 'eval'}",
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert len(json.loads((tmp_path / "eval" / "metrics.json").read_text())["per_k"]) == 4
        return
    write_demo(folder / "more", 1, grey=True, seed=5)
    proc = run_train(folder, tmp_path, f"dataset.channels={channels}", "debug=fdr")
    assert proc.returncode == 1 and len(error_lines(proc)) == 1, proc.stderr[-3000:]
    (line,) = error_lines(proc)
    assert "has changed since its LMDB" in line and "add dataset.rebuild=true to the command" in line


@pytest.mark.slow
def test_train_py_reports_unreadable_images_in_one_line(tmp_path):
    folder = tmp_path / "images"
    write_demo(folder, 30, grey=True)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    proc = run_train(folder, tmp_path, "dataset.channels=1", "debug=fdr")
    assert proc.returncode == 1 and len(error_lines(proc)) == 1, proc.stderr[-3000:]
    assert "1 of 31 images in" in error_lines(proc)[0] and "broken.png" in error_lines(proc)[0]


# ---- fuse a scene folder ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from tests.test_evaluation import tiny_module

    torch.manual_seed(0)
    return save_checkpoint(tiny_module(), tmp_path_factory.mktemp("fuse") / "last.ckpt")


def test_fuse_takes_a_scene_folder_and_writes_the_samples(ckpt, tmp_path):
    from fusionvae.jobs.fuse import main

    (scene,) = write_scenes(tmp_path / "scenes", 1, 32, grey=True)
    out, samples = tmp_path / "grid.png", tmp_path / "samples"
    assert main(["--ckpt", str(ckpt), "--out", str(out), "--samples", "2", "--samples-dir", str(samples), str(scene)])
    with Image.open(out) as img:
        assert img.size == ((3 + 1 + 2) * 66 + 2, 14 + 66 + 2)  # 3 views (target.png left out), mean, 2 samples
    assert sorted(p.name for p in samples.iterdir()) == ["mean.png", "sample_000.png", "sample_001.png"]
    shutil.copy(scene / "view1.png", scene / "view4.png")
    with pytest.raises(SystemExit) as stop:
        main(["--ckpt", str(ckpt), "--out", str(out), str(scene)])
    assert stop.value.code == 2


def test_fuse_fit_makes_inputs_as_the_folder_datasets_store_them(ckpt, tmp_path):
    from fusionvae.jobs.evaluate import load_model
    from fusionvae.jobs.fuse import load_views, main

    scene = tmp_path / "scene"
    scene.mkdir()
    for i in range(2):
        grey = np.random.default_rng(i).integers(0, 256, (48, 40), dtype=np.uint8)
        Image.fromarray(grey).save(scene / f"v{i}.png")
    out = tmp_path / "grid.png"
    with pytest.raises(SystemExit):  # 40x48 is not the model's 32x32
        main(["--ckpt", str(ckpt), "--out", str(out), str(scene)])
    assert main(["--ckpt", str(ckpt), "--out", str(out), "--fit", str(scene)]) == out
    views = load_views(sorted(scene.iterdir()), load_model(str(ckpt)), fit=True)
    want = torch.from_numpy(fit_image(scene / "v1.png", 32, 1)).permute(2, 0, 1).float() / 255
    assert views.shape == (2, 1, 32, 32) and torch.equal(views[1], want)


def test_experiment_presets_fit_the_model_to_the_images(tmp_path):
    """experiment=own_images(_small): only the path is needed; the small one repeats FusionMNIST's views."""
    from omegaconf import OmegaConf

    from tests.conftest import CONF

    small = compose_cfg("train", ["experiment=own_images_small", "dataset.path=x"])
    mnist = OmegaConf.load(CONF / "dataset" / "mnist.yaml")
    assert all(mnist[k] == v for k, v in small.dataset.corruption.items() if k != "_target_")
    preset = OmegaConf.load(CONF / "model" / "size" / "mnist.yaml")
    assert (small.model.channels, small.model.image_size, small.model.num_channels) == (1, 32, preset.num_channels)
    big = compose_cfg("train", ["experiment=own_images", "dataset.path=x"])
    assert (big.model.channels, big.model.image_size, big.model.num_latent_scales) == (3, 64, 3)


@pytest.mark.slow
def test_small_preset_trains_one_step(tmp_path):
    from fusionvae.jobs.train import train

    write_demo(tmp_path / "images", 40, grey=True)
    overrides = ["experiment=own_images_small", f"dataset.path={tmp_path / 'images'}", "debug=fdr", "trainer=cpu"]
    overrides += ["logger=csv", "dataset.num_workers=0", "dataset.workers=0", "dataset.batch_size=8"]
    overrides += [f"paths.data_dir={tmp_path / 'data'}", f"paths.output_dir={tmp_path / 'out'}"]
    metrics = train(compose_cfg("train", overrides))
    assert all(np.isfinite(metrics[f"val/nelbo_k{k}"]) for k in range(4))
