"""The evaluation job behind ``evaluate.py``: load the checkpoint (checked against the dataset
before any data is prepared), run the ``Evaluator`` (``fusionvae.evaluation.evaluator``) in Lightning's test
loop, write the reports (``fusionvae.evaluation.report``: metrics.{json,csv,md}, per_item.csv,
metrics_vs_k.png) and the image grids per K (``fusionvae.model.sampling``)."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torchvision.io import read_image
from torchvision.utils import save_image

from fusionvae.errors import BadInputError
from fusionvae.evaluation.bn_readjust import readjust_bn
from fusionvae.evaluation.evaluator import EvalSettings, Evaluator
from fusionvae.evaluation.report import describe_model, summary_table, write_per_item, write_report
from fusionvae.jobs.malloc import keep_freed_memory
from fusionvae.model.objective import k_range, split_views
from fusionvae.model.sampling import fusion_grid
from fusionvae.training.build import build, finish
from fusionvae.training.callbacks import log_images
from fusionvae.training.checkpoint_paths import resolve_ckpt_path
from fusionvae.training.module import FusionVAEModule
from fusionvae.training.preflight import check_run
from fusionvae.training.resume import check_dataset, legacy_overrides, read_checkpoint

log = logging.getLogger("fusionvae")


def write_grids(module: FusionVAEModule, loader, settings: EvalSettings, out_dir: Path, device) -> list[Path]:
    """Grids ``grid_k<K>.png`` for K = 0..k_max on the first ``grid_images`` test items."""
    if settings.grid_images == 0:
        return []
    module = module.to(device).eval()
    batch = next(iter(loader))[: settings.grid_images].to(device, torch.float32)
    nets = {
        t: (
            readjust_bn(module, loader, t, settings.bn_readjust_batches, device) if settings.bn_readjust else module
        ).net
        for t in settings.temperatures
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in k_range(module.hparams.k_max, batch):
        views, target = split_views(batch, k)
        grid = fusion_grid(nets, views, target, batch.shape[1] - 1, settings.grid_samples)
        paths.append(out_dir / f"grid_k{k}.png")
        save_image(grid, paths[-1])
    return paths


def load_model(ckpt_path: str) -> FusionVAEModule:
    """The module of a checkpoint, as it was trained (also one written before a network setting
    existed: ``legacy_overrides``); one-line ``FusionVAEError`` if it is missing or damaged."""
    ckpt = read_checkpoint(ckpt_path)  # cheap (memory-mapped): clear errors before Lightning's loader
    legacy = legacy_overrides(ckpt["hyper_parameters"])
    return FusionVAEModule.load_from_checkpoint(Path(ckpt_path), map_location="cpu", **legacy)


def checkpoint_to_evaluate(cfg: DictConfig) -> tuple[Path, FusionVAEModule]:
    """``cfg.ckpt_path`` (``last``: the newest training run's last.ckpt) and its module, checked
    against the dataset config before any data is prepared."""
    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.get("ckpt_path"):
        raise BadInputError(
            "evaluate.py needs a checkpoint: add ckpt_path=<run dir>/checkpoints/last.ckpt "
            "(or ckpt_path=last for the newest training run)"
        )
    path = resolve_ckpt_path(cfg.ckpt_path, cfg.paths.log_dir, "train")
    model = load_model(str(path))
    check_dataset(model.hparams, cfg.dataset, path)
    return path, model


def run_evaluation(cfg: DictConfig) -> dict:
    """Evaluate ``cfg.ckpt_path`` per K; write metrics.{json,csv,md}, metrics_vs_k.png and grids to
    ``cfg.paths.output_dir``; return ``{K: {metric: mean}}``."""
    check_run(cfg)
    settings = EvalSettings.from_cfg(cfg.get("eval"))
    keep_freed_memory()  # 1.8x faster on the CPU (fusionvae/jobs/malloc.py)
    ckpt_path, model = checkpoint_to_evaluate(cfg)
    datamodule, _, trainer = build(cfg)
    evaluator = Evaluator(model, settings)
    out_dir = Path(cfg.paths.output_dir)
    start = time.time()
    try:
        trainer.test(evaluator, datamodule=datamodule, verbose=False)  # its table: below, compact
        results = evaluator.results
        seconds = time.time() - start
        if trainer.is_global_zero:
            info = {
                "ckpt_path": str(ckpt_path),
                "units": "bits/dim" if model.hparams.bits_per_dim else "nats",
                "model": describe_model(model.hparams, str(ckpt_path)),
                "eval": {**asdict(settings), "temperatures": list(settings.temperatures)},
                "test_batches": trainer.num_test_batches[0] if trainer.num_test_batches else None,
                "items": evaluator.items,
                "classifier_accuracy": evaluator.classifier_accuracy,  # on the clean test set
                "overrides": list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else [],
                "seconds": round(seconds, 1),
            }
            write_report(results, evaluator.stderr, info, out_dir)
            write_per_item(evaluator.per_item, out_dir / "per_item.csv")
            log.info("%s items, %s\n%s", evaluator.items, ckpt_path, summary_table(results, info["units"]))
            paths = write_grids(
                model, datamodule.test_dataloader(), settings, out_dir / "images", trainer.strategy.root_device
            )
            for path in paths:
                log_images(trainer.loggers, f"eval/{path.stem}", read_image(str(path)).float() / 255, 0)
    finally:
        finish(trainer)
    if trainer.is_global_zero:
        log.info("results (metrics.md, per_item.csv, grids): %s", out_dir)
    return results
