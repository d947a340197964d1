"""Lightning callbacks: image grids to disk and to the attached loggers."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torchvision.utils import save_image

from .grids import fusion_grid


class ImageGrids(L.Callback):
    """After validation, grids for K = 0..k_max on the first validation batch (fixed set)."""

    def __init__(self, every_n_epochs: int = 1, num_images: int = 8, temperatures=(0.6, 0.8, 1.0)):
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.temperatures = tuple(temperatures)
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
        for k in range(pl_module.hparams.k_max + 1):
            grid = fusion_grid(pl_module, batch, k, self.temperatures, self.num_images)
            name = f"grid_k{k}"
            save_image(grid, out_dir / f"{name}_epoch{trainer.current_epoch:04d}.png")
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_image(f"images/{name}", [grid], step=trainer.global_step,
                                     caption=["inputs | target | mean | samples t=" + ",".join(map(str, self.temperatures))])
                elif isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_image(f"images/{name}", grid, trainer.global_step)
