"""The training job behind train.py."""
from __future__ import annotations

from omegaconf import DictConfig

from .instantiate import build, finish


def train(cfg: DictConfig) -> dict:
    """Fit (resuming from ``cfg.ckpt_path`` if set), optionally test; returns the final metrics."""
    datamodule, model, trainer = build(cfg)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        if cfg.get("test"):
            trainer.test(model, datamodule=datamodule, ckpt_path="best")
        return {k: float(v) for k, v in trainer.callback_metrics.items()}
    finally:
        finish(trainer)
