"""Checkpoints to resume or evaluate, read and checked up front (finding them from the command
line is ``fusionvae.jobs.run_args``).

Every check here runs before any data is prepared and fails with one line naming the problem
and the fix (``fusionvae.errors``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from fusionvae.errors import CheckpointError, CheckpointNotFoundError
from fusionvae.model.network_config import NetworkConfig, legacy_overrides
from fusionvae.training.checkpoint_paths import run_dir_of
from fusionvae.training.checksums import verify_checksum

# model keys that may change on resume: they do not change the weights' shapes or meaning
_NOT_ARCHITECTURE = {
    "_target_",
    "_convert_",
    "optim",
    "loss",
    "seed",
    "channels_last",
    "compile",
    "compile_mode",
    "activation_checkpointing",
}


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint dict (tensors memory-mapped), checked against its checksum and for finite
    weights; one-line errors if missing or damaged (before any data is prepared)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(
            f"checkpoint not found: {path} (set ckpt_path=<run dir>/checkpoints/last.ckpt, "
            f"or ckpt_path=last for the newest run)"
        )
    verify_checksum(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # truncated zip, junk bytes, foreign pickles: many types
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({reason}): it is damaged or not a PyTorch "
            f"checkpoint; use another one (e.g. an epoch*.ckpt beside it)"
        ) from None
    missing = [k for k in ("state_dict", "hyper_parameters") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} has no {' / '.join(missing)}: it is not a FusionVAE training checkpoint; "
            f"use one written by train.py (<run dir>/checkpoints/*.ckpt)"
        )
    check_finite(ckpt["state_dict"], "state_dict", path)
    return ckpt


def check_resumable(ckpt: dict, path: str | Path) -> None:
    """Refuse to resume a checkpoint without a usable optimiser state (Lightning would fail with a
    traceback, or a NaN moment would skip every step)."""
    if not ckpt.get("optimizer_states"):
        raise CheckpointError(
            f"checkpoint {path} holds no optimizer_states (saved with weights only): it can be evaluated, "
            f"not resumed; resume from a last.ckpt or epoch*.ckpt written by train.py, or train anew without ckpt_path"
        )
    check_finite(ckpt["optimizer_states"], "optimizer_states", path)


def check_finite(tree: Any, name: str, path: str | Path) -> None:
    """Refuse NaN / inf in the floating-point tensors of ``tree`` (a diverged run saved, or damage):
    evaluating them runs the whole test loop for nothing, resuming them skips every step."""
    bad = _nonfinite(tree, name)
    if bad:
        raise CheckpointError(
            f"checkpoint {path} holds NaN or inf in {len(bad)} tensor(s) (first: {bad[0]}): the run diverged "
            f"before it was saved, or the file is damaged; use an earlier checkpoint (e.g. an epoch*.ckpt beside it)"
        )


def _nonfinite(tree: Any, name: str) -> list[str]:
    if torch.is_tensor(tree):
        return [name] if tree.is_floating_point() and not bool(torch.isfinite(tree).all()) else []
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    return [bad for key, value in items for bad in _nonfinite(value, f"{name}.{key}")]


# Checkpoints written before ``model.aggregation_level`` existed (hyperparameters without it) were
# trained with the view heads before aggregation and with skips added to the decoder state: load
# them as what they are, not with today's defaults
def _image_spec(channels: Any, size: Any, k_max: Any) -> str:
    return f"{channels}x{size}x{size} images (CxHxW) with k_max={k_max}"


def check_dataset(hparams: Any, dataset: DictConfig, path: str | Path) -> None:
    """Refuse a checkpoint whose model does not fit the dataset config (channels, size, k_max)."""
    net = NetworkConfig.from_hparams(hparams)
    model = (net.channels, net.image_size, hparams["k_max"])  # every module checkpoint records k_max
    data = (dataset.get("channels"), dataset.get("image_size"), dataset.get("k_max"))
    if any(d is not None and d != m for m, d in zip(model, data)):
        name = str(dataset.get("_target_", "the dataset")).rsplit(".", 1)[-1]
        raise CheckpointError(
            f"checkpoint {path} is a model for {_image_spec(*model)}, but the dataset config "
            f"({name}) gives {_image_spec(*data)}: pick the dataset it was trained on "
            f"(dataset=..., dataset.k_max=...) or a checkpoint for this dataset"
        )


def check_model(hparams: Any, model: DictConfig, path: str | Path) -> None:
    """Refuse to resume into a different architecture (the weights would not fit)."""
    wanted = OmegaConf.to_container(model, resolve=True)
    hparams = {**hparams, **legacy_overrides(hparams)}
    differ = [k for k, v in wanted.items() if k not in _NOT_ARCHITECTURE and k in hparams and hparams[k] != v]
    if differ:
        diffs = "; ".join(f"model.{k}: checkpoint {hparams[k]!r}, config {wanted[k]!r}" for k in differ)
        fix = " ".join(f"model.{k}={hparams[k]}" for k in differ)
        run = run_dir_of(Path(path))
        where = f" (see {run}/.hydra/overrides.yaml)" if run else ""
        raise CheckpointError(
            f"checkpoint {path} has another model than the config ({diffs}): "
            f"resume with the overrides of the original run{where}, here: {fix}"
        )
