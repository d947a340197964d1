"""What a run hands its loggers: each setting once, no absolute path (fusionvae.training.run_log), and a
logging interval that gives a short run its training curves (fusionvae.training.callbacks.LogInterval).
End to end (the CSV logger's hparams.yaml and metrics.csv of a real sweep):
tests/test_train.py::test_multirun_sweep_gives_one_wandb_run_per_job."""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import TINY, compose_cfg

from fusionvae.training.callbacks import LogInterval, ProgressBar
from fusionvae.training.host_waits import HostWaits
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


class PbarModule(L.LightningModule):
    """One parameter; logs a device tensor to the progress bar every step (the FusionVAE module no
    longer does: Lightning would read it after every batch)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def training_step(self, batch, batch_idx):
        loss = (self.w * batch).sum()
        self.log("nelbo", loss.detach(), prog_bar=True, on_step=True, on_epoch=False, logger=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("bar, reads", [("ours", [3, 6, 7]), ("lightning", [1, 2, 3, 4, 5, 6, 7, 7])])
def test_the_progress_bar_reads_its_metrics_at_logging_steps_only(tmp_path, bar, reads):
    """Reading the bar's metrics (``.item()``) makes the host wait for the GPU: ours reads them after
    every ``log_every_n_steps``-th batch (3 here) and at the epoch's end (after batch 7); Lightning's
    after every batch. Each read is listed by the number of batches done then."""
    from lightning.pytorch.callbacks import RichProgressBar

    progress = ProgressBar() if bar == "ours" else RichProgressBar()
    seen = []
    get_metrics = progress.get_metrics

    def recording(trainer, pl_module):
        seen.append(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        return get_metrics(trainer, pl_module)

    progress.get_metrics = recording
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=7,
        logger=False,
        enable_checkpointing=False,
        callbacks=[progress],
        log_every_n_steps=3,
        default_root_dir=tmp_path,
        enable_model_summary=False,
    )
    trainer.fit(PbarModule(), torch.utils.data.DataLoader(torch.ones(7, 1), batch_size=1))
    assert seen == reads


def test_train_py_uses_that_progress_bar(tmp_path):
    from hydra.utils import instantiate

    cfg = compose_cfg("train", [f"paths.output_dir={tmp_path}"])
    assert type(instantiate(cfg.callbacks.progress_bar)) is ProgressBar


class HostWaitsPerBatch(L.Callback):
    """``HostWaits`` from one training batch's start to the next one's (the batch's end hooks and
    Lightning's bookkeeping included): ``per_batch[i]`` lists batch i's ops."""

    def __init__(self):
        self.per_batch, self.waits = [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._close()
        self.waits = HostWaits().__enter__()

    def on_train_end(self, trainer, pl_module):
        self._close()

    def _close(self):
        if self.waits is not None:
            self.waits.__exit__(None, None, None)
            self.per_batch.append(self.waits.ops)
            self.waits = None


def test_train_py_waits_for_the_device_at_logging_steps_only(data_dir, tmp_path):
    """train.py's trainer with the default callbacks (progress bar, run guard, checkpoints) and a
    logger: a training batch that is not a logging step makes the host wait for nothing (the
    first two read the power iteration's start flag). Lightning's RichProgressBar and a progress-bar
    value logged every step would each wait at every batch."""
    from fusionvae.training.build import build

    overrides = [o for o in TINY if o != "callbacks.progress_bar=null"]
    cfg = compose_cfg(
        "train",
        [
            *overrides,
            f"paths.data_dir={data_dir}",
            f"paths.output_dir={tmp_path}",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=11",
            "trainer.limit_val_batches=0",
            "trainer.log_every_n_steps=5",
            "callbacks.log_interval=null",
        ],
    )
    datamodule, model, trainer = build(cfg)
    assert any(type(c) is ProgressBar for c in trainer.callbacks)
    probe = HostWaitsPerBatch()
    trainer.callbacks.append(probe)
    trainer.fit(model, datamodule=datamodule)
    counts = [len(ops) for ops in probe.per_batch]
    assert len(counts) == 11 and counts[4] > 0 and counts[9] > 0  # the logging steps read their values
    # batches 2..9 but the logging steps (the last one's window holds the epoch's end)
    assert [c for i, c in enumerate(counts[:-1]) if i >= 2 and i not in (4, 9)] == [0] * 6, counts


@pytest.mark.parametrize(
    "overrides, bar",
    [([], ProgressBar), (["callbacks.progress_bar=null"], None), (["callbacks=none"], None)],
    ids=["default", "null", "callbacks=none"],
)
def test_a_progress_bar_only_where_one_is_configured(tmp_path, overrides, bar):
    """``callbacks.progress_bar=null`` means no bar: Lightning would add its own RichProgressBar,
    which reads its metrics from the device after every batch. ``trainer.enable_progress_bar=true``
    asks for Lightning's."""
    from fusionvae.training.build import build

    trainer = build(compose_cfg("train", ["logger=none", f"paths.output_dir={tmp_path}", *overrides]))[2]
    assert (trainer.progress_bar_callback is None) if bar is None else type(trainer.progress_bar_callback) is bar
    asked = build(
        compose_cfg(
            "train",
            [
                "logger=none",
                f"paths.output_dir={tmp_path}",
                "callbacks.progress_bar=null",
                "+trainer.enable_progress_bar=true",
            ],
        )
    )[2]
    assert type(asked.progress_bar_callback).__name__ in ("RichProgressBar", "TQDMProgressBar")
