"""The training job behind train.py."""

from __future__ import annotations

import logging
import signal

from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from fusionvae.errors import Preempted
from fusionvae.training.build import build, finish
from fusionvae.training.checkpoint_paths import resolve_ckpt_path
from fusionvae.training.preflight import check_run
from fusionvae.training.resilience import stop_outside_training
from fusionvae.training.resume import check_dataset, check_model, check_resumable, read_checkpoint
from fusionvae.training.run_lock import run_lock
from fusionvae.training.run_log import log_end, log_start

log = logging.getLogger(__name__)


def resume_from(cfg: DictConfig) -> tuple[str | None, str | None]:
    """The checkpoint to resume (``ckpt_path``; ``last`` = the newest run's last.ckpt) and its W&B
    run id, checked against the config before any data is prepared."""
    path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.log_dir, cfg.task_name)
    if path is None:
        return None, None
    ckpt = read_checkpoint(path)
    check_dataset(ckpt["hyper_parameters"], cfg.dataset, path)
    if "model" in cfg:
        check_model(ckpt["hyper_parameters"], cfg.model, path)
    check_resumable(ckpt, path)
    return str(path), (ckpt.get("fusionvae") or {}).get("wandb_id")


def train(cfg: DictConfig) -> dict:
    """Fit (resuming from ``cfg.ckpt_path`` if set), optionally test; returns the final metrics.

    Raises ``Preempted`` after SIGTERM / SIGUSR1 / SIGINT (checkpoint saved by ``RunGuard``), and
    ``RunFolderInUseError`` while another job trains in ``paths.output_dir`` (``fusionvae.training.run_lock``)."""
    with stop_outside_training():
        check_run(cfg)
        ckpt_path, wandb_id = resume_from(cfg)
        datamodule, model, trainer = build(cfg, wandb_id=wandb_id)
        # locked before any logger starts: a refused job must not join the running job's W&B run
        with run_lock(cfg.paths.output_dir, rank_zero=trainer.is_global_zero):
            return _fit(cfg, trainer, model, datamodule, ckpt_path)


def _fit(cfg: DictConfig, trainer, model, datamodule, ckpt_path: str | None) -> dict:
    try:
        if trainer.is_global_zero:
            log_start(cfg, trainer, model)
        try:
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        except SIGTERMException:  # Lightning's own handler stopped the run (before RunGuard's took over)
            raise Preempted(signal.SIGTERM, trainer.global_step, None) from None
        log_end(trainer)
        if cfg.get("test"):
            trainer.test(model, datamodule=datamodule, ckpt_path=weights_to_test(trainer))
        return {k: float(v) for k, v in trainer.callback_metrics.items()}
    finally:
        finish(trainer)


def weights_to_test(trainer) -> str | None:
    """``test=true`` tests the best checkpoint; without one (``debug=fdr`` writes none, nor does
    ``callbacks=none``) the weights in memory, and says so."""
    callback = trainer.checkpoint_callback
    if callback is not None and getattr(callback, "best_model_path", ""):
        return "best"
    log.info("test=true: no best checkpoint was written (debug=fdr or callbacks=none); testing the final weights")
    return None
