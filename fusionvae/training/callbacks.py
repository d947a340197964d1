"""Lightning callbacks: image grids to disk and to the attached loggers; a logging interval that
gives a short run its training curves."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import lightning as L
import torch
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


def log_images(loggers, tag: str, grid: torch.Tensor, step: int, caption: str = "") -> None:
    """Send ``grid [3, H, W]`` to every W&B and TensorBoard logger in ``loggers``."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(tag, [grid], step=step, **({"caption": [caption]} if caption else {}))
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, grid, step)
