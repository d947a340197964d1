"""Checkpoint evaluation: the test loop per K on the fixed validation/test set, saved as JSON."""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from .instantiate import build, finish
from .lit_module import FusionVAEModule


def load_model(ckpt_path: str) -> FusionVAEModule:
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (set ckpt_path=<run dir>/checkpoints/last.ckpt)")
    return FusionVAEModule.load_from_checkpoint(path, map_location="cpu")


def run_evaluation(cfg: DictConfig) -> dict:
    model = load_model(cfg.ckpt_path)
    datamodule, _, trainer = build(cfg)
    try:
        results = trainer.test(model, datamodule=datamodule)[0]
    finally:
        finish(trainer)
    out = Path(cfg.paths.output_dir) / "metrics.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"ckpt_path": str(cfg.ckpt_path), **results}, indent=2))
    return results
