"""What a training run checks before any data work, logger or lock: its settings and the folders it
will write. Every problem a user can fix ends the run here in one ``error:`` line that names the
key and the fix (``fusionvae.jobs.reporting.reported``), so a refused start costs seconds and leaves no
W&B run behind (and ``reporting.unused_run_folder_removed`` no empty run folder)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from fusionvae.errors import BadInputError, WriteError
from fusionvae.model.objective import LossSettings
from fusionvae.settings import check_arguments
from fusionvae.training.optim import OptimSettings

# model keys that describe the data (the model config reads them from dataset.*): a different
# value would build a network for other images, or ask for views the batches do not hold
_SAME_AS_DATA = ("image_size", "channels")


def check_run(cfg: DictConfig) -> None:
    """All checks of a training run's config and folders."""
    check_settings(cfg)
    check_writable(cfg)


def check_settings(cfg: DictConfig) -> None:
    """Refuse settings that would fail late or train silently wrong."""
    _check_trainer(cfg.trainer)
    if not _whole(cfg.get("seed"), 0):
        raise BadInputError(f"seed must be a whole number >= 0, got {cfg.get('seed')!r}")
    for key in ("batch_size", "val_batch_size"):
        value = cfg.dataset.get(key)
        if not (_whole(value, 1) or (key == "val_batch_size" and value is None)):
            raise BadInputError(f"dataset.{key} must be a whole number >= 1, got {value!r}")
    for group in ("dataset", "model", "trainer"):
        if group in cfg and "_target_" in cfg[group]:
            _check_node(cfg[group], group)
    if "model" in cfg:
        _check_model_matches_data(cfg.model, cfg.dataset)
        for key, settings in (("optim", OptimSettings), ("loss", LossSettings)):
            node = cfg.model.get(key)
            settings.from_dict(OmegaConf.to_container(node, resolve=True) if node is not None else None)


def _check_trainer(trainer: DictConfig) -> None:
    if (trainer.get("accumulate_grad_batches") or 1) > 1:
        raise BadInputError(
            "trainer.accumulate_grad_batches is not supported (the model steps its optimiser itself): "
            "raise dataset.batch_size, or use more devices (trainer.devices) for a larger batch"
        )
    clip = trainer.get("gradient_clip_val")
    if clip is not None and not _at_least_zero(clip):  # -1 ("off" elsewhere) would reverse every gradient
        raise BadInputError(f"trainer.gradient_clip_val must be >= 0 (0 or null: no clipping), got {clip}")


def _check_node(node: DictConfig, key: str) -> None:
    """The keys of a ``_target_`` config against its class: a typo (``+dataset.batchsize=8``) or a
    value of the wrong type (``model.num_latent_scales=abc``) in one line, not inside Hydra's
    instantiation error."""
    try:
        cls = get_class(str(node._target_))
    except Exception as err:  # noqa: BLE001 - Hydra's error names the import that failed
        raise BadInputError(f"{key}._target_={node._target_} cannot be imported: {err}") from None
    values = OmegaConf.to_container(node, resolve=True)
    check_arguments(cls, {k: v for k, v in values.items() if k != "_target_"}, key)


def _check_model_matches_data(model: DictConfig, dataset: DictConfig) -> None:
    for key in _SAME_AS_DATA:
        if key in model and key in dataset and model[key] != dataset[key]:
            raise BadInputError(
                f"model.{key} ({model[key]}) differs from the data's dataset.{key} ({dataset[key]}): "
                f"set dataset.{key}={model[key]} instead (model.{key} follows it)"
            )
    if "k_max" in model and "k_max" in dataset and model.k_max > dataset.k_max:
        raise BadInputError(
            f"model.k_max ({model.k_max}) is more views than the data holds (dataset.k_max={dataset.k_max}): "
            f"set dataset.k_max={model.k_max} instead (model.k_max follows it)"
        )


def _whole(value, low: int) -> bool:
    """An int (not a bool) >= ``low``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _at_least_zero(value) -> bool:
    """A number >= 0 (False for NaN, strings and booleans)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


def check_writable(cfg: DictConfig) -> None:
    """The run folder and every callback's ``dirpath`` take a file now: a read-only or full disk is
    found before the data is prepared, not when the first checkpoint is written after an epoch."""
    folders = [cfg.paths.output_dir]
    for node in (cfg.get("callbacks") or {}).values():
        if isinstance(node, DictConfig) and node.get("dirpath"):
            folders.append(node.dirpath)
    for folder in dict.fromkeys(str(f) for f in folders):
        _try_write(Path(folder))


def _try_write(folder: Path) -> None:
    """Write and fsync 4 KiB in ``folder``; the folders made for it go again (a refused start
    leaves nothing)."""
    made = next((p for p in reversed([folder, *folder.parents]) if not p.exists()), None)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-") as f:
            f.write(b"x" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise WriteError(err, folder) from None
    finally:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
