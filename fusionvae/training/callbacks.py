"""Lightning callbacks: image grids to disk and to the attached loggers; a logging interval that
gives a short run its training curves; a progress bar that reads its metrics at logging steps."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torchvision.utils import save_image

from fusionvae.model.objective import split_views
from fusionvae.model.sampling import fusion_grid


class ImageGrids(L.Callback):
    """After validation, grids for K = 0..k_max on the first validation batch (fixed set): inputs,
    target, the mean image (t = 0) and a sample at each temperature (``fusionvae.model.sampling``)."""

    def __init__(self, every_n_epochs: int = 1, num_images: int = 8, temperatures=(0.6, 0.8, 1.0)):
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.temperatures = (0.0, *(float(t) for t in temperatures if t > 0))
        self._batch: torch.Tensor | None = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            self._batch = batch[: self.num_images]

    def on_validation_epoch_end(self, trainer, pl_module):
        if self._batch is None or trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        self._log(trainer, pl_module, self._batch)
        self._batch = None

    @rank_zero_only
    def _log(self, trainer, pl_module, batch):
        out_dir = Path(trainer.default_root_dir) / "images"
        out_dir.mkdir(parents=True, exist_ok=True)
        nets = {t: pl_module.net for t in self.temperatures}
        for k in range(pl_module.hparams.k_max + 1):
            views, target = split_views(batch, k)
            grid = fusion_grid(nets, views, target, batch.shape[1] - 1)
            save_image(grid, out_dir / f"grid_k{k}_epoch{trainer.current_epoch:04d}.png")
            log_images(trainer.loggers, f"images/grid_k{k}", grid, trainer.global_step)


class LogInterval(L.Callback):
    """Training curves also for a short run: ``trainer.log_every_n_steps`` (50) becomes at most
    (training steps / ``points``), at least 1, so a run logs its training metrics at >= ``points``
    steps when it has that many (a 2-step run: at both). Metrics still reach the loggers only at
    those logging steps (no extra host syncs in between); long runs keep the trainer's interval."""

    def __init__(self, points: int = 20):
        if points < 1:
            raise ValueError(f"callbacks.log_interval.points must be >= 1, got {points}")
        self.points = int(points)

    def setup(self, trainer, pl_module, stage):
        # Lightning's "fewer training batches than the logging interval" warning comes before
        # on_fit_start (the optimiser's schedule reads the step count); the interval is set there
        warnings.filterwarnings("ignore", message=r"The number of training batches .* logging interval")

    def on_fit_start(self, trainer, pl_module):
        steps = trainer.estimated_stepping_batches
        if trainer.log_every_n_steps > 0 and math.isfinite(steps):
            trainer.log_every_n_steps = max(1, min(trainer.log_every_n_steps, int(steps) // self.points))


class ProgressBar(RichProgressBar):
    """Lightning's RichProgressBar, showing the training NELBO (``train/nelbo``, logged every step
    but not as a progress-bar value) and reading its metrics after every
    ``trainer.log_every_n_steps``-th training batch and at the end of each epoch and validation,
    not after every batch. Reading a device value (``.item()``) makes the host wait until the GPU
    has finished the step; Lightning reads progress-bar values after every batch, and its bar its
    metrics, so a training step of ``train.py`` would wait for the GPU twice (it reads nothing
    else: ``fusionvae.training.step``). The bar's batch count still moves every batch."""

    _read_metrics = True
    shown = {"train/nelbo": "nelbo"}  # logged metric -> its name on the bar

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        for key, name in self.shown.items():
            if key in trainer.callback_metrics:
                metrics[name] = float(trainer.callback_metrics[key])
        return metrics

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._read_metrics = (batch_idx + 1) % max(1, trainer.log_every_n_steps) == 0
        try:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        finally:
            self._read_metrics = True

    def _update_metrics(self, trainer, pl_module):  # RichProgressBar's one reader of the metrics
        if self._read_metrics:
            super()._update_metrics(trainer, pl_module)


def log_images(loggers, tag: str, grid: torch.Tensor, step: int, caption: str = "") -> None:
    """Send ``grid [3, H, W]`` to every W&B and TensorBoard logger in ``loggers``."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(tag, [grid], step=step, **({"caption": [caption]} if caption else {}))
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, grid, step)
