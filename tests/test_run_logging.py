"""What a run hands its loggers: each setting once, no absolute path (fusionvae.training.run_log), and a
logging interval that gives a short run its training curves (fusionvae.training.callbacks.LogInterval).
End to end (the CSV logger's hparams.yaml and metrics.csv of a real sweep):
tests/test_train.py::test_multirun_sweep_gives_one_wandb_run_per_job."""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY, compose_cfg

from fusionvae.training.callbacks import LogInterval
from fusionvae.training.run_log import run_hyperparameters


def strings(value):
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return [value] if isinstance(value, str) else []


def test_each_setting_once_and_paths_relative(tmp_path):
    paths = [f"paths.data_dir={tmp_path / 'data'}", f"paths.output_dir={tmp_path / 'run'}", f"ckpt_path={tmp_path}/x"]
    got = run_hyperparameters(compose_cfg("train", [*TINY, *paths]), torch.nn.Linear(2, 3))
    assert not [s for s in strings(got) if os.path.isabs(s)]
    assert got["paths"]["data_dir"] == os.path.relpath(tmp_path / "data")
    assert got["ckpt_path"] == os.path.relpath(tmp_path / "x")
    # ${seed}, ${dataset.k_max}, ${paths.data_dir}, ${paths.output_dir}: logged at their source only
    assert got["seed"] == 42 and got["dataset"]["k_max"] == 3
    assert not {"seed", "k_max", "crop", "bits_per_dim", "channels", "image_size"} & set(got["model"])
    assert "data_dir" not in got["dataset"] and "default_root_dir" not in got["trainer"]
    assert got["model"]["aggregation"] == "max" and got["params"] == {"total": 9, "trainable": 9}
    assert "hydra" not in got


def test_an_overridden_value_is_its_own_setting(tmp_path):
    cfg = compose_cfg("train", [*TINY, f"paths.output_dir={tmp_path}", "model.k_max=2"])
    assert run_hyperparameters(cfg, torch.nn.Linear(1, 1))["model"]["k_max"] == 2


def test_the_module_leaves_its_hyperparameters_to_the_run_log():
    from hydra.utils import instantiate

    cfg = compose_cfg("train", [*TINY, "paths.output_dir=x"])
    assert instantiate(cfg.model)._log_hyperparams is False  # Lightning would log them a second time


@pytest.mark.parametrize(
    "steps, configured, expected",
    [(2, 50, 1), (40, 50, 2), (600, 50, 30), (100_000, 50, 50), (600, 10, 10), (math.inf, 50, 50), (600, 0, 0)],
)
def test_the_logging_interval_gives_a_short_run_curves(steps, configured, expected):
    trainer = SimpleNamespace(estimated_stepping_batches=steps, log_every_n_steps=configured)
    LogInterval(points=20).on_fit_start(trainer, None)
    assert trainer.log_every_n_steps == expected
