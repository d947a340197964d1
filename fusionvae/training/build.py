"""Build datamodule, model, callbacks, loggers and trainer from a Hydra config."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar as AnyProgressBar
from omegaconf import DictConfig

from fusionvae.training.run_name import run_name


def build_list(cfg: DictConfig | None, wandb: dict | None = None) -> list:
    """Instantiate every ``_target_`` entry of a config group (callbacks, loggers); a W&B logger
    gets the ``wandb`` keyword arguments its config leaves unset (null, empty)."""
    if not cfg:
        return []
    nodes = [node for node in cfg.values() if isinstance(node, DictConfig) and "_target_" in node]
    return [
        instantiate(node, **{k: v for k, v in (wandb or {}).items() if not node.get(k)})
        if str(node._target_).endswith("WandbLogger")
        else instantiate(node)
        for node in nodes
    ]


def wandb_identity(cfg: DictConfig, wandb_id: str | None = None) -> dict:
    """W&B run name, group and id of this job: the name is ``run_name`` or else the short override
    name (``fusionvae.training.run_name``: a sweep's varying keys, e.g. ``model=cvae,seed=1``) or else
    ``task_name``; the group is one per sweep (``<task_name>-<sweep folder>``), ``task_name`` for a
    single run; a resumed run continues its W&B run ``wandb_id``."""
    task = str(cfg.get("task_name") or "run")
    overrides, group = "", task
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        overrides = run_name(hydra_cfg)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            group = f"{task}-{Path(hydra_cfg.sweep.dir).name}"
    identity = {"name": cfg.get("run_name") or overrides or task, "group": group}
    return {**identity, "id": wandb_id, "resume": "allow"} if wandb_id else identity


def resolve_precision(accelerator, precision):
    """``trainer.precision=auto``: ``bf16-mixed`` when the run gets a CUDA GPU with native bf16
    (Ampere and newer; ``accelerator`` auto, gpu or cuda), else ``32-true`` (the CPU, and older
    GPUs: fp16 (16-mixed) would need loss scaling and its range is narrow for the KL and likelihood
    terms, so it is not chosen for you; ``trainer.precision=16-mixed`` tries it). Any other value
    is returned unchanged."""
    if str(precision) != "auto":
        return precision
    cuda = str(accelerator) in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if cuda and torch.cuda.is_bf16_supported(including_emulation=False) else "32-true"


def build(cfg: DictConfig, wandb_id: str | None = None):
    """Datamodule (training order and randomness from ``cfg.seed``), model and trainer, from a config
    that ``fusionvae.training.preflight.check_settings`` accepted."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # the seed is in train.log with the config
    datamodule = instantiate(cfg.dataset, seed=cfg.seed)
    model = instantiate(cfg.model) if "model" in cfg else None
    loggers = build_list(cfg.get("logger"), wandb_identity(cfg, wandb_id))
    callbacks = build_list(cfg.get("callbacks"))
    precision = resolve_precision(cfg.trainer.get("accelerator", "auto"), cfg.trainer.get("precision", "auto"))
    # Lightning refuses gradient_clip_val under manual optimisation: the module's step clips instead
    clip = cfg.trainer.get("gradient_clip_val")
    if model is not None and clip:
        model.step_engine.clip = float(clip)
    # a progress bar where callbacks.progress_bar configures one, none where it is null (Lightning
    # would add its own, which reads its metrics from the device after every batch); an explicit
    # trainer.enable_progress_bar wins
    configured = any(isinstance(c, AnyProgressBar) for c in callbacks)
    bar = {} if "enable_progress_bar" in cfg.trainer else {"enable_progress_bar": configured}
    trainer = instantiate(
        cfg.trainer, precision=precision, callbacks=callbacks, logger=loggers or False, gradient_clip_val=None, **bar
    )
    return datamodule, model, trainer


def finish(trainer: L.Trainer) -> None:
    """End this job's logger runs (one W&B run per multirun job) and the process group."""
    for logger in trainer.loggers:
        finalize = getattr(getattr(logger, "experiment", None), "finish", None)
        if callable(finalize) and type(logger).__name__ == "WandbLogger":
            finalize()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
