"""Trainer and optimiser values that would train silently wrong are refused in one line, naming the
key and the fix, before any data work (issue 20: ``trainer.gradient_clip_val=-1``, "off" in some
codebases, reversed every gradient; a negative or NaN learning rate failed late or walked uphill)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fusionvae.errors import BadInputError
from fusionvae.jobs.train import train
from fusionvae.training.build import build
from tests.conftest import ROOT, TINY, compose_cfg

CLIP = "trainer.gradient_clip_val must be >= 0 (0 or null: no clipping), got "
LR = "model.optim.lr must be a finite number > 0, got "


def _cfg(tmp_path: Path, *overrides: str):
    # no MNIST in data_dir: any data work would raise FileNotFoundError instead of the expected error
    paths = [f"paths.data_dir={tmp_path / 'no_data_here'}", f"paths.output_dir={tmp_path / 'out'}"]
    return compose_cfg("train", [*TINY, *paths, *overrides])


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.gradient_clip_val=-1", CLIP + "-1"),
        ("trainer.gradient_clip_val=nan", CLIP + "nan"),
        ("trainer.gradient_clip_val=abc", CLIP + "abc"),
        ("model.optim.lr=-0.01", LR + "-0.01 (the default is model.optim.lr=0.01)"),
        ("model.optim.lr=nan", LR + "nan (the default is model.optim.lr=0.01)"),
        ("seed=abc", "seed must be a whole number >= 0, got 'abc'"),
        ("dataset.val_batch_size=0", "dataset.val_batch_size must be a whole number >= 1, got 0"),
        ("dataset.batch_size=-4", "dataset.batch_size must be a whole number >= 1, got -4"),
        ("model.optim.lr_min=0.5", "model.optim.lr_min (0.5) must be <= model.optim.lr (0.01)"),
        (
            "model.optim.lr_min=-1",
            "model.optim.lr_min must be a finite number >= 0, got -1 (the default is model.optim.lr_min=0.0001)",
        ),
    ],
)
def test_bad_values_are_refused_before_any_data_work(tmp_path: Path, override: str, message: str):
    with pytest.raises(BadInputError) as info:
        train(_cfg(tmp_path, override))
    assert str(info.value) == message
    assert not (tmp_path / "out").exists()  # refused before the logger made a run folder


@pytest.mark.parametrize("value, expected", [("0", None), ("null", None), ("0.5", 0.5)])
def test_zero_or_null_means_no_clipping(tmp_path: Path, value: str, expected):
    _, model, trainer = build(_cfg(tmp_path, f"trainer.gradient_clip_val={value}", "model.optim.lr_min=0"))
    assert model.step_engine.clip == expected and trainer.gradient_clip_val is None


def test_cli_gives_one_error_line_and_exit_1(tmp_path: Path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FUSIONVAE_DATA_DIR": str(tmp_path / "no_data_here")}
    env.pop("HYDRA_FULL_ERROR", None)
    args = [*TINY, "trainer.gradient_clip_val=-1", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error: ")] == [f"error: {CLIP}-1"]
