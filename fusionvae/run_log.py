"""What a training run tells its loggers and its user: the resolved config and parameter counts
once (so runs can be compared by dataset, corruption and trainer settings), the run directory at
the start, and the best validation NELBO with its checkpoint and a per-K table at the end."""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("fusionvae")


def run_hyperparameters(cfg: DictConfig, model, trainer=None) -> dict:
    """The resolved config (dataset, model, trainer, seed, ...) plus parameter counts, flat enough
    for every logger; the ``hydra`` and ``paths`` nodes are left out, and the trainer's chosen
    precision and device count replace ``auto``."""
    config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    config = {k: v for k, v in config.items() if k not in ("hydra", "paths")}
    if trainer is not None and isinstance(config.get("trainer"), dict):
        config["trainer"].update(
            precision=str(trainer.precision),
            accelerator=type(trainer.accelerator).__name__,
            world_size=trainer.world_size,
        )
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {**config, "params": {"total": params, "trainable": trainable}}


def log_start(cfg: DictConfig, trainer, model) -> None:
    """Print the run directory; send the resolved config and parameter counts to every logger."""
    log.info("run directory: %s", cfg.paths.output_dir)
    for logger in trainer.loggers:
        logger.log_hyperparams(run_hyperparameters(cfg, model, trainer))


def summary(trainer) -> str:
    """The best ``val/nelbo``, its checkpoint and the last per-K validation NELBO and fusion
    diagnostic (KL to the prior, the prior's mean sigma), as lines."""
    callback = trainer.checkpoint_callback
    lines = []
    if callback is not None and callback.best_model_path:
        score = callback.best_model_score  # None for a checkpoint callback without a monitor
        lines.append(
            f"best val/nelbo {float(score):.4f}: {callback.best_model_path}"
            if score is not None
            else f"last checkpoint: {callback.best_model_path}"
        )
    metrics = trainer.callback_metrics
    for i, name in enumerate(("val/nelbo", "val/kl", "val/prior_sigma")):
        per_k = sorted((int(k.rsplit("_k", 1)[1]), float(v)) for k, v in metrics.items() if k.startswith(f"{name}_k"))
        if per_k and i == 0:
            lines.append(f"{'K':<15}" + "  ".join(f"{k:>9d}" for k, _ in per_k))
        if per_k:
            lines.append(f"{name:<15}" + "  ".join(f"{v:9.3f}" for _, v in per_k))
    return "\n".join(lines)


def log_end(trainer) -> None:
    text = summary(trainer)
    if text and trainer.is_global_zero:
        log.info("%s", text)
