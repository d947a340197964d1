"""Fuse API and CLI: image files -> grid of inputs, mean image and samples."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fusionvae.errors import FusionVAEError
from fusionvae.jobs.fuse import fuse, fuse_files, load_image, load_views, main
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
    from fusionvae.jobs.evaluate import load_model

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
            "fusionvae.jobs.fuse",
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


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the checkpoint is loaded: bad arguments must be refused before that."""
    import fusionvae.jobs.fuse

    def load_model(path):
        raise AssertionError(f"the checkpoint {path} was loaded before the arguments were checked")

    monkeypatch.setattr(fusionvae.jobs.fuse, "load_model", load_model)


def gpus(monkeypatch, count: int, mps: bool = False) -> None:
    """This machine as one with ``count`` CUDA devices (and MPS or not), whatever it really has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


@pytest.mark.parametrize(
    ("args", "gpu_count", "expected"),
    [
        (["--device", "cuda"], 0, "--device cuda: no CUDA device is available here; use --device cpu"),
        (["--device", "cuda:0"], 0, "--device cuda:0: no CUDA device is available here; use --device cpu"),
        (["--device", "cuda:3"], 2, "--device cuda:3: this machine has 2 cuda devices (cuda:0..cuda:1); use one"),
        (["--device", "cuda:1"], 1, "--device cuda:1: this machine has 1 cuda device (cuda:0); use one of them or"),
        (["--device", "mps"], 0, "--device mps: no MPS (Apple GPU) device is available here; use --device cpu"),
        (["--device", "gpu0"], 0, "--device 'gpu0' is not a torch device: use cpu, cuda, cuda:<index> or mps"),
        (["--device", "cuda:x"], 0, "--device 'cuda:x' is not a torch device: use cpu, cuda, cuda:<index> or mps"),
        (["--device", "meta"], 0, "--device meta: the model cannot run on device type 'meta'"),
        (["--temperature", "nan"], 0, "--temperature must be a finite number >= 0 (1: the prior, 0: its means), got"),
        (["--temperature", "inf"], 0, "--temperature must be a finite number >= 0"),
        (["--temperature=-0.5"], 0, "--temperature must be a finite number >= 0"),
        (["--temperature", "warm"], 0, "--temperature must be a finite number >= 0"),
        (["--samples=-1"], 0, "--samples must be a whole number >= 0, got '-1'"),
        (["--samples", "2.5"], 0, "--samples must be a whole number >= 0, got '2.5'"),
        (["--seed=-1"], 0, "--seed must be a whole number >= 0 and below 2**64, got '-1'"),
        (["--seed", str(2**64)], 0, "--seed must be a whole number >= 0 and below 2**64"),
    ],
)
def test_bad_arguments_are_one_line_before_the_checkpoint_is_loaded(
    no_loading, monkeypatch, tmp_path, capsys, args, gpu_count, expected
):
    gpus(monkeypatch, gpu_count)
    with pytest.raises(SystemExit) as exit_info:
        main(["--ckpt", str(tmp_path / "m.ckpt"), "--out", str(tmp_path / "o.png"), *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(f"error: {expected}") and err.count("\n") == 1, err
    assert not (tmp_path / "o.png").exists()


def test_usage_errors_are_one_line_too(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", "o.png"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: the following arguments are required: --ckpt") and "--help" in err


def test_devices_this_machine_has_are_taken(no_loading, monkeypatch, tmp_path):
    from fusionvae.jobs.fuse_args import check_device

    gpus(monkeypatch, 2, mps=True)
    assert check_device("cuda:1") == torch.device("cuda:1") and check_device("mps") == torch.device("mps")
    assert check_device("cpu") == torch.device("cpu")
    gpus(monkeypatch, 0)
    with pytest.raises(FusionVAEError, match=r"^--device cuda: no CUDA device is available here; use --device cpu"):
        fuse_files(tmp_path / "m.ckpt", [], tmp_path / "o.png", device="cuda")  # the API checks it too
    with pytest.raises(FusionVAEError, match=r"^--temperature must be a finite number >= 0"):
        fuse_files(tmp_path / "m.ckpt", [], tmp_path / "o.png", temperature=float("nan"))


def test_temperature_zero_takes_the_prior_means(ckpt, tmp_path):
    from fusionvae.jobs.evaluate import load_model

    module = load_model(str(ckpt))
    views = load_views([write_png(tmp_path / "v.png", 32)], module)
    result = fuse(module, views, num_samples=2, temperature=0, decode="mean")
    assert torch.allclose(result.samples[0], result.mean) and torch.allclose(result.samples[1], result.mean)
    with pytest.raises(FusionVAEError, match=r"finite number >= 0 .* got nan"):
        fuse(module, views, num_samples=2, temperature=float("nan"))  # not the model's non-finite pixels
    assert main(["--ckpt", str(ckpt), "--out", str(tmp_path / "g.png"), "--temperature", "0", "--samples", "0"])


def test_cuda_on_a_machine_without_one_is_one_line(ckpt, tmp_path):
    """The command of issue 20, as a process, with the GPUs hidden (also on a machine that has them)."""
    out = tmp_path / "g.png"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, "-m", "fusionvae.jobs.fuse", "--ckpt", str(ckpt), "--out", str(out), "--device", "cuda"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and not out.exists(), proc.stderr[-3000:]
    assert proc.stderr == "error: --device cuda: no CUDA device is available here; use --device cpu\n"
