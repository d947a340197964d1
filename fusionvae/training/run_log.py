"""What a training run tells its loggers and its user: the resolved config and parameter counts
once (so runs can be compared by dataset, corruption and trainer settings), the run directory at
the start, and the best validation NELBO with its checkpoint and a per-K table at the end."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fusionvae.files import write_text

log = logging.getLogger("fusionvae")
_REPEAT = re.compile(r"\$\{[\w.\[\]-]+\}")  # ${key}: another key's value (not ${resolver:...})


def run_hyperparameters(cfg: DictConfig, model, trainer=None) -> dict:
    """The resolved config (dataset, model, trainer, seed, paths, ...) plus parameter counts, each
    setting once and no absolute path: a key that only repeats another (``model.seed: ${seed}``,
    ``dataset.data_dir: ${paths.data_dir}``) is left to that key, paths are relative to the working
    directory, and the ``hydra`` node is left out. The trainer's chosen precision and device count
    replace ``auto``."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    config = _without_repeats(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False), raw)
    config = _relative_paths({k: v for k, v in config.items() if k != "hydra"})
    if trainer is not None and isinstance(config.get("trainer"), dict):
        config["trainer"].update(
            precision=str(trainer.precision),
            accelerator=type(trainer.accelerator).__name__,
            world_size=trainer.world_size,
        )
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {**config, "params": {"total": params, "trainable": trainable}}


def _without_repeats(resolved, raw):
    """``resolved`` less the entries whose unresolved value is a bare ``${other.key}``."""
    if isinstance(resolved, dict) and isinstance(raw, dict):
        return {
            k: _without_repeats(v, raw.get(k))
            for k, v in resolved.items()
            if not (isinstance(raw.get(k), str) and _REPEAT.fullmatch(raw[k]))
        }
    return resolved


def _relative_paths(value):
    """Every absolute path string in ``value`` relative to the working directory."""
    if isinstance(value, dict):
        return {k: _relative_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_relative_paths(v) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        return os.path.relpath(value)
    return value


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
    """The summary to train.log and ``result.json`` to the run folder (rank zero)."""
    if not trainer.is_global_zero:
        return
    text = summary(trainer)
    if text:
        log.info("%s", text)
    write_result(trainer)


def write_result(trainer) -> Path:
    """``result.json`` in the run folder (``trainer.default_root_dir``), what a sweep's summary
    reads (``fusionvae.jobs.sweep_summary``): the checkpoint callback's best score, its monitor and
    checkpoint (relative to the folder), the step, and the last value of every ``val/`` metric."""
    root = Path(trainer.default_root_dir)
    callback = trainer.checkpoint_callback
    score = getattr(callback, "best_model_score", None)
    path = getattr(callback, "best_model_path", "")
    result = {
        "best": {
            "monitor": getattr(callback, "monitor", None),
            "score": None if score is None else float(score),
            "checkpoint": os.path.relpath(path, root) if path else None,
        },
        "global_step": int(trainer.global_step),
        "last": {k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith("val/")},
    }
    root.mkdir(parents=True, exist_ok=True)
    return write_text(root / "result.json", json.dumps(result, indent=2) + "\n")
