"""Issue 20's list of bad inputs, walked through the real entry point (``train.py``'s ``train_main``,
in this process: a subprocess per case would cost a Python + torch start each): every one ends in
exactly one ``error:`` line that names the key and the fix, exits non-zero, and leaves no run
folder (nor W&B run) behind. Data work would need MNIST in ``paths.data_dir``, which these runs
point at an empty folder: a refusal that came after the data work would show up as a
missing-data error instead of the expected line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fusionvae.jobs import cli
from tests.conftest import TINY

SHORT = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]

CASES = [
    ("logger=null", "logger=null: a config group takes an option, not null; use logger=none to run without one"),
    (
        "experiment=null",
        "experiment=null: a config group takes an option, not null; use ~experiment to run without one",
    ),
    ("+foo=1", "+foo=1: train.py has no setting foo; python train.py --cfg job lists them"),
    ("sed=3", "sed=3: train.py has no setting sed (did you mean seed?); python train.py --cfg job lists them"),
    ("seed=abc", "seed must be a whole number >= 0, got 'abc'"),
    ("dataset.val_batch_size=0", "dataset.val_batch_size must be a whole number >= 1, got 0"),
    (
        "model.optim.lr=-0.01",
        "model.optim.lr must be a finite number > 0, got -0.01 (the default is model.optim.lr=0.01)",
    ),
    ("model.optim.lr=nan", "model.optim.lr must be a finite number > 0, got nan (the default is model.optim.lr=0.01)"),
    ("+model.optim.foo=1", "unknown setting(s) model.optim.foo; known: eps, lr, lr_min, warmup_epochs, weight_decay"),
    ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val must be >= 0 (0 or null: no clipping), got -1"),
    (
        "model.k_max=9",
        "model.k_max (9) is more views than the data holds (dataset.k_max=3): set dataset.k_max=9 instead "
        "(model.k_max follows it)",
    ),
    (
        "model.image_size=64",
        "model.image_size (64) differs from the data's dataset.image_size (32): set dataset.image_size=64 "
        "instead (model.image_size follows it)",
    ),
    # values Hydra's instantiate used to wrap in its InstantiationException block
    ("model.num_latent_scales=abc", "model.num_latent_scales must be an int, got 'abc'"),
    (
        "model.loss.power_iter=abc",
        "model.loss.power_iter must be an int, got 'abc' (the default is model.loss.power_iter=1)",
    ),
    ("+dataset.batchsize=3", "unknown setting(s) dataset.batchsize (did you mean batch_size?); check the spelling"),
    ("+trainer.max_step=3", "unknown setting(s) trainer.max_step (did you mean max_steps?); check the spelling"),
    # a constructor's own check of a value, also wrapped by Hydra before
    ("model.num_latent_scales=0", "model.num_latent_scales must be >= 1, got 0"),
    (
        "dataset.image_size=30",
        "FusionMNIST images are 28 + 2 * dataset.pad pixels: dataset.image_size=30 does not match dataset.pad=2; "
        "set dataset.image_size=32 or change dataset.pad",
    ),
]


def run_train(args: list[str], logs: Path, capsys, monkeypatch) -> tuple[int, list[str]]:
    """``python train.py <args>`` in this process: (exit code, stderr lines)."""
    monkeypatch.setenv("FUSIONVAE_LOG_DIR", str(logs))
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(sys, "argv", ["train.py", *TINY, *SHORT, *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        cli.train_main()
    return stop.value.code, capsys.readouterr().err.splitlines()


def run_folders(logs: Path) -> list[Path]:
    return [p.parent for p in logs.rglob(".hydra")]


@pytest.mark.parametrize("override, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_before_any_data_work_and_no_run_folder(
    tmp_path, capsys, monkeypatch, override, message
):
    logs = tmp_path / "logs"
    code, err = run_train([override, f"paths.data_dir={tmp_path / 'no_data_here'}"], logs, capsys, monkeypatch)
    assert code == 1
    assert [line for line in err if line.strip()] == [f"error: {message}"]
    assert run_folders(logs) == []


def test_log_dir_that_is_a_file_is_refused_before_hydra(tmp_path, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("")
    code, err = run_train([], afile / "below", capsys, monkeypatch)
    assert code == 1
    assert err == [
        f"error: FUSIONVAE_LOG_DIR={afile / 'below'}: {afile} is a file, not a folder; "
        "point FUSIONVAE_LOG_DIR at a folder"
    ]


def test_checkpoint_without_optimiser_state_is_refused_before_any_data_work(tmp_path, capsys, monkeypatch):
    from hydra.utils import instantiate

    from tests.conftest import compose_cfg, save_checkpoint

    module = instantiate(compose_cfg("train", TINY).model)
    ckpt = save_checkpoint(module, tmp_path / "old" / "checkpoints" / "last.ckpt")  # weights only
    code, err = run_train(
        [f"ckpt_path={ckpt}", f"paths.data_dir={tmp_path / 'none'}"], tmp_path / "logs", capsys, monkeypatch
    )
    assert code == 1 and len(err) == 1
    assert err[0].startswith(f"error: checkpoint {ckpt} holds no optimizer_states (saved with weights only)")
    assert run_folders(tmp_path / "logs") == []


# ---- folders a run cannot write: real file systems (root in a container can mount a tmpfs) --------


@pytest.fixture
def mount_tmpfs(tmp_path):
    mounted = []

    def mount(name: str, options: str) -> Path:
        where = tmp_path / name
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
        if proc.returncode != 0:
            pytest.skip("mounting a tmpfs is not permitted here (needs root)")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "--lazy", str(where)], capture_output=True)  # a log handler may hold a file open


def test_read_only_checkpoint_folder_is_refused_before_any_data_work(tmp_path, capsys, monkeypatch, mount_tmpfs):
    ro = mount_tmpfs("ro", "ro,size=64k")
    folder = ro / "checkpoints"
    args = [f"callbacks.model_checkpoint.dirpath={folder}", f"callbacks.run_guard.dirpath={folder}"]
    code, err = run_train([*args, f"paths.data_dir={tmp_path / 'none'}"], tmp_path / "logs", capsys, monkeypatch)
    assert code == 1
    assert err == [
        f"error: cannot write {folder}: Read-only file system; point paths.log_dir (FUSIONVAE_LOG_DIR) at another "
        "disk (a started run resumes with ckpt_path=last)"
    ]
    assert run_folders(tmp_path / "logs") == []


def test_disk_full_during_training_ends_in_one_line(data_dir, tmp_path, capsys, monkeypatch, mount_tmpfs):
    small = mount_tmpfs("small", "size=200k")  # the run's config and log fit, its images and checkpoints do not
    code, err = run_train(
        [f"paths.data_dir={data_dir}", f"hydra.run.dir={small / 'run'}"], tmp_path, capsys, monkeypatch
    )
    errors = [line for line in err if line.startswith("error: ")]
    assert code == 1 and len(errors) == 1 and "Traceback" not in "\n".join(err)
    assert "No space left on device; free space there, or point paths.log_dir (FUSIONVAE_LOG_DIR)" in errors[0]


def test_fast_dev_run_with_test_tests_the_final_weights(data_dir, tmp_path, capsys, monkeypatch):
    """``debug=fdr test=true`` (no checkpoint is written) ended in Lightning's traceback."""
    monkeypatch.setenv("FUSIONVAE_LOG_DIR", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["train.py", *TINY, "debug=fdr", "test=true", f"paths.data_dir={data_dir}"])
    cli.train_main()
    assert "testing the final weights" in next(tmp_path.rglob("train.log")).read_text()
    assert "test/nelbo_k3" in capsys.readouterr().out  # Lightning's table of the test loop


def test_an_error_from_a_dataloader_worker_is_one_line(capsys):
    """torch re-raises a worker's error with its traceback in the message: the line is the original."""
    from torch.utils.data import DataLoader, Dataset

    from fusionvae.errors import BadInputError
    from fusionvae.jobs.reporting import reported

    class Damaged(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, index):
            raise BadInputError(f"record {index} of /data/x is damaged: rebuild it")

    with pytest.raises(SystemExit) as stop, reported():
        next(iter(DataLoader(Damaged(), num_workers=1)))
    assert stop.value.code == 1
    assert capsys.readouterr().err.splitlines() == ["error: record 0 of /data/x is damaged: rebuild it"]
