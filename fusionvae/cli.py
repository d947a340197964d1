"""The Hydra mains behind ``train.py`` / ``evaluate.py`` in a checkout and the console scripts
``fusionvae-train`` / ``fusionvae-evaluate`` of an installed package: same configs, same overrides."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from .errors import reported
from .launcher import size_launcher
from .run_args import evaluate_on_training_dataset, resume_in_place


def config_dir() -> Path:
    """The Hydra configs: ``fusionvae/conf`` in a wheel install (the build maps the top-level
    ``conf/`` there), else the checkout's ``conf/`` beside the package (plain or editable)."""
    here = Path(__file__).resolve().parent
    packaged = here / "conf"
    return packaged if (packaged / "train.yaml").is_file() else here.parent / "conf"


CONF = config_dir()


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="train")
def train_job(cfg: DictConfig) -> float | None:
    from .training import train  # here, not above: `--help` and `--cfg` answer without importing Lightning

    with reported():
        return train(cfg).get("val/nelbo")  # the objective Hydra sweepers minimise


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="evaluate")
def evaluate_job(cfg: DictConfig) -> dict:
    from .evaluate_job import run_evaluation  # as in train_job

    with reported():
        return run_evaluation(cfg)


def train_main() -> None:
    """``fusionvae-train`` / ``python train.py``: resume in the checkpoint's run folder, size a SLURM
    launcher from the trainer, then train."""
    with reported():
        sys.argv = size_launcher(resume_in_place(sys.argv, CONF), CONF)
    train_job()


def evaluate_main() -> None:
    """``fusionvae-evaluate`` / ``python evaluate.py``: on the checkpoint's training dataset."""
    sys.argv = evaluate_on_training_dataset(sys.argv, CONF)
    evaluate_job()
