"""Checkpoints to resume or evaluate: found (``ckpt_path=last``), read and checked up front.

Every check here runs before any data is prepared and fails with one line naming the problem
and the fix (``fusionvae.errors``).
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from .checksums import verify_checksum
from .errors import CheckpointError, CheckpointNotFoundError
from .network import FusionVAE

LAST = "last"  # ckpt_path=last: the newest <log_dir>/<task_name>/runs/*/checkpoints/last.ckpt
NET_DEFAULTS = {k: v.default for k, v in inspect.signature(FusionVAE).parameters.items()}
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


def resolve_ckpt_path(value: Any, log_dir: str | Path, task_name: str) -> Path | None:
    """``value`` as a path; ``last`` -> the most recently written ``last.ckpt`` of
    ``<log_dir>/<task_name>/runs/*/checkpoints``; None / "" -> None."""
    if value is None or str(value) in ("", "null", "None"):
        return None
    if str(value) != LAST:
        return Path(str(value)).expanduser().absolute()
    runs = Path(str(log_dir)).expanduser().absolute() / task_name / "runs"
    found = sorted(runs.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise CheckpointNotFoundError(
            f"ckpt_path=last: there is no {runs}/*/checkpoints/last.ckpt yet; "
            f"give the checkpoint path (paths.log_dir / task_name select the folder)"
        )
    return found[-1]


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
_LEGACY_SKIP = {"max": "max_add", "mean": "mean_add"}


def legacy_overrides(hparams: Any) -> dict:
    """Network settings to give a checkpoint written before they existed, so it loads, evaluates
    and resumes exactly as it was trained (``{}`` for a current checkpoint)."""
    if "aggregation_level" in hparams:
        return {}
    skip = hparams.get("skip", "none")
    return {"aggregation_level": "params", "skip": _LEGACY_SKIP.get(skip, skip)}


def _image_spec(channels: Any, size: Any, k_max: Any) -> str:
    return f"{channels}x{size}x{size} images (CxHxW) with k_max={k_max}"


def check_dataset(hparams: Any, dataset: DictConfig, path: str | Path) -> None:
    """Refuse a checkpoint whose model does not fit the dataset config (channels, size, k_max)."""
    model = (
        hparams.get("channels", NET_DEFAULTS["channels"]),
        hparams.get("image_size", NET_DEFAULTS["image_size"]),
        hparams.get("k_max", 3),
    )
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


def run_dir_of(ckpt: Path) -> Path | None:
    """The Hydra run folder holding ``<run>/checkpoints/<ckpt>``, if it is one."""
    run = ckpt.absolute().parent.parent
    return run if ckpt.absolute().parent.name == "checkpoints" and (run / ".hydra").is_dir() else None


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def select_overrides(overrides: list[str], keys: tuple[str, ...]) -> list[str]:
    """The command-line overrides whose first key or group (``trainer.x=``, ``trainer=``,
    ``~trainer.x``) is one of ``keys``."""
    return [o for o in overrides if o.lstrip("+~").split("=", 1)[0].split(".")[0].split("/")[0] in keys]


def compose_train(overrides: list[str], config_dir: Path) -> DictConfig:
    """The train config with ``overrides``, before Hydra starts (argument rewriting: resume, SLURM sizes)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(config_dir), version_base="1.3"):
        return compose("train", overrides=overrides)


def _compose_log_dir(overrides: list[str], config_dir: Path, keys: tuple[str, ...]) -> tuple[str, str]:
    """``(paths.log_dir, task_name)`` of the train config with the overrides of ``keys`` (others,
    e.g. evaluate.py's ``eval.*``, may not exist in it)."""
    cfg = compose_train(select_overrides(overrides, keys), config_dir)
    return str(cfg.paths.log_dir), str(cfg.task_name)


def resume_in_place(argv: list[str], config_dir: Path) -> list[str]:
    """``train.py`` arguments that resume in the checkpoint's own run folder: with ``ckpt_path=<run>/
    checkpoints/x.ckpt`` (or ``last``) add ``hydra.run.dir=<run>`` and keep that run's Hydra files
    (this run's go to ``<run>/.hydra/resume_<time>``). Unchanged for sweeps, an explicit
    ``hydra.run.dir``, or a checkpoint outside a run folder."""
    args = list(argv[1:])
    if any(
        a in ("-m", "--multirun", "-h", "--help", "--hydra-help", "--info", "-c", "--cfg")
        or a.startswith("hydra.run.dir=")
        for a in args
    ):
        return list(argv)
    where = [i for i, a in enumerate(args) if a.lstrip("+").startswith("ckpt_path=")]
    if not where:
        return list(argv)
    value = args[where[-1]].split("=", 1)[1].strip("'\"")
    try:
        if value == LAST:
            ckpt = resolve_ckpt_path(LAST, *_compose_log_dir(args, config_dir, ("paths", "task_name", "experiment")))
        else:
            ckpt = resolve_ckpt_path(value, ".", "")
    except Exception:  # nothing to resume or a bad override: train() reports it in one line
        return list(argv)
    run = run_dir_of(ckpt) if ckpt is not None else None
    if run is None:
        return list(argv)
    args[where[-1]] = f"ckpt_path={_quote(str(ckpt))}"
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    return [argv[0], *args, f"hydra.run.dir={_quote(str(run))}", f"hydra.output_subdir=.hydra/resume_{stamp}"]


def training_dataset(run: Path) -> tuple[str | None, list[str]]:
    """The ``dataset`` choice of a training run and its ``dataset.*`` overrides (from ``.hydra``)."""
    from omegaconf import OmegaConf

    hydra_file, overrides_file = run / ".hydra" / "hydra.yaml", run / ".hydra" / "overrides.yaml"
    choice = OmegaConf.load(hydra_file).hydra.runtime.choices.get("dataset") if hydra_file.is_file() else None
    overrides = list(OmegaConf.load(overrides_file)) if overrides_file.is_file() else []
    return choice, [str(o) for o in overrides if str(o).lstrip("+").startswith("dataset.")]


def evaluate_on_training_dataset(argv: list[str], config_dir: Path) -> list[str]:
    """``evaluate.py`` arguments that evaluate on the dataset (and its settings) the checkpoint was
    trained on: ``dataset=<choice>`` and the run's ``dataset.*`` overrides go first, so the
    command line can still change settings; a different ``dataset=`` is refused (SystemExit)."""
    args = list(argv[1:])
    where = [a for a in args if a.lstrip("+").startswith("ckpt_path=")]
    if not where or any(a in ("-m", "--multirun") for a in args):
        return list(argv)
    value = where[-1].split("=", 1)[1].strip("'\"")
    try:
        # ckpt_path=last: the newest run of task "train" (as run_evaluation resolves it)
        ckpt = (
            resolve_ckpt_path(value, *_compose_log_dir(args, config_dir, ("paths",))) if value == LAST else Path(value)
        )
    except Exception:  # evaluate.py reports it in one line
        return list(argv)
    run = run_dir_of(ckpt) if ckpt is not None else None
    choice, settings = training_dataset(run) if run is not None else (None, [])
    if choice is None:
        return list(argv)
    given = [a.split("=", 1)[1] for a in args if a.startswith("dataset=")]
    if given and given[-1] != choice:
        raise SystemExit(
            f"error: {ckpt} was trained on dataset={choice}; drop dataset={given[-1]} (evaluate.py "
            f"takes the dataset from the checkpoint's run) or evaluate a checkpoint trained on it"
        )
    return [argv[0], f"dataset={choice}", *settings, *[a for a in args if not a.startswith("dataset=")]]
