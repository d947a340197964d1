"""Fuse API and CLI: image files -> grid of inputs, mean image and samples."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fusionvae.fuse import fuse, fuse_files, load_image, load_views, main
from tests.conftest import ROOT, save_checkpoint
from tests.test_evaluation import tiny_module

CELL = 64 + 2  # a 32 px image enlarged to 64, + grid padding
HEADER = 14  # the row of column labels


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    return save_checkpoint(tiny_module(), tmp_path_factory.mktemp("fuse") / "last.ckpt")


def write_png(path, size, mode="L", value=None):
    rng = np.random.default_rng(0)
    shape = (size, size) if mode == "L" else (size, size, 3)
    data = np.full(shape, value, np.uint8) if value is not None else rng.integers(0, 256, shape, dtype=np.uint8)
    Image.fromarray(data, mode=mode).save(path)
    return path


def grid_size(path):
    with Image.open(path) as img:
        return img.size


@pytest.mark.parametrize("k", [0, 1, 3])
def test_fuse_files_writes_inputs_mean_and_samples(ckpt, tmp_path, k):
    images = [write_png(tmp_path / f"v{i}.png", 32) for i in range(k)]
    out = tmp_path / "grid.png"
    result = fuse_files(ckpt, images, out, num_samples=5, temperature=0.8)
    # one row: the k_max = 3 input slots (missing views crossed out), the mean, 5 samples; 32 px
    # images enlarged to 64, 2 px padding, a 14 px header of labels
    assert grid_size(out) == ((3 + 1 + 5) * 66 + 2, 14 + 66 + 2)
    assert result.views.shape == (k, 1, 32, 32) and result.samples.shape == (5, 1, 32, 32)
    assert result.mean.shape == (1, 32, 32) and torch.isfinite(result.samples).all()
    assert not torch.equal(result.samples[0], result.samples[1])  # diverse samples


def test_fuse_is_seeded_and_the_mean_is_deterministic(ckpt, tmp_path):
    img = [write_png(tmp_path / "v.png", 32)]
    a = fuse_files(ckpt, img, tmp_path / "a.png", num_samples=2, seed=3)
    b = fuse_files(ckpt, img, tmp_path / "b.png", num_samples=2, seed=3)
    c = fuse_files(ckpt, img, tmp_path / "c.png", num_samples=2, seed=4)
    assert torch.equal(a.samples, b.samples) and not torch.equal(a.samples, c.samples)
    assert torch.equal(a.mean, c.mean)


def test_image_loading_converts_pads_resizes_and_validates(tmp_path):
    rgb = load_image(write_png(tmp_path / "rgb.png", 32, "RGB"), channels=1, image_size=32)
    assert rgb.shape == (1, 32, 32) and 0 <= rgb.min() and rgb.max() <= 1
    grey = load_image(write_png(tmp_path / "g.png", 32, value=255), channels=3, image_size=32)
    assert grey.shape == (3, 32, 32) and torch.all(grey == 1)
    digit = load_image(write_png(tmp_path / "d.png", 28, value=255), channels=1, image_size=32, crop=2)
    assert digit.shape == (1, 32, 32) and digit[0, 2:30, 2:30].min() == 1 and digit[0, :2].max() == 0
    odd = write_png(tmp_path / "odd.png", 40)
    with pytest.raises(ValueError, match=r"40x40 but the model expects 32x32 .*--resize"):
        load_image(odd, channels=1, image_size=32, crop=2)
    assert load_image(odd, channels=1, image_size=32, resize=True).shape == (1, 32, 32)
    with pytest.raises(FileNotFoundError, match=r"image not found: .*missing\.png"):
        load_image(tmp_path / "missing.png", 1, 32)


def test_too_many_views_fail_clearly(ckpt, tmp_path):
    from fusionvae.evaluate_job import load_model

    module = load_model(str(ckpt))
    images = [write_png(tmp_path / f"v{i}.png", 32) for i in range(4)]
    with pytest.raises(ValueError, match="at most k_max=3"):
        load_views(images, module)
    assert load_views([], module).shape == (0, 1, 32, 32)
    with pytest.raises(ValueError, match=r"\[K, C, H, W\]"):
        fuse(module, torch.zeros(1, 32, 32))


def test_cli(ckpt, tmp_path):
    images = [str(write_png(tmp_path / f"v{i}.png", 28)) for i in range(2)]
    out = tmp_path / "cli" / "grid.png"
    assert main(["--ckpt", str(ckpt), "--out", str(out), "--samples", "3", "--temperature", "0.6", *images]) == out
    assert grid_size(out) == ((3 + 1 + 3) * CELL + 2, HEADER + CELL + 2)
    with pytest.raises(SystemExit, match=r"^2$") as exit_info:
        main(["--ckpt", str(ckpt), "--out", str(out), str(write_png(tmp_path / "big.png", 40))])
    assert exit_info.value.code == 2


def test_cli_as_a_module(ckpt, tmp_path):
    out = tmp_path / "m.png"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fusionvae.fuse",
            "--ckpt",
            str(ckpt),
            "--out",
            str(out),
            "--samples",
            "2",
            "--decode",
            "mean",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert grid_size(out) == ((3 + 1 + 2) * CELL + 2, HEADER + CELL + 2)
