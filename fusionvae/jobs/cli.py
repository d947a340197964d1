"""The Hydra mains behind ``train.py`` / ``evaluate.py`` in a checkout and the console scripts
``fusionvae-train`` / ``fusionvae-evaluate`` of an installed package: same configs, same overrides."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from fusionvae.jobs.reporting import reported, unused_run_folder_removed
from fusionvae.jobs.run_args import check_command_line, evaluate_on_training_dataset, hydra_subdir, run_dir
from fusionvae.jobs.slurm import size_launcher


def config_dir() -> Path:
    """The Hydra configs: ``fusionvae/conf`` in a wheel install (the build maps the top-level
    ``conf/`` there), else the checkout's ``conf/`` beside the package (plain or editable)."""
    package = Path(__file__).resolve().parents[1]  # fusionvae/
    packaged = package / "conf"
    return packaged if (packaged / "train.yaml").is_file() else package.parent / "conf"


CONF = config_dir()


def config_groups(config_dir: Path = CONF) -> str:
    """``--help``'s group list (Hydra's format): every group below ``config_dir`` but Hydra's own,
    with its options; shared partials (``dataset/_loader``, ``eval/_rgb64``) are not options."""
    lines = []
    for group in sorted(p for p in config_dir.rglob("*") if p.is_dir() and p.name != "__pycache__"):
        name = group.relative_to(config_dir).as_posix()
        options = sorted(f.stem for f in group.glob("*.yaml") if not f.stem.startswith("_"))
        if options and not (name == "hydra" or name.startswith("hydra/")):
            lines.append(f"{name}: {', '.join(options)}\n")
    return "".join(lines)


OmegaConf.register_new_resolver("fusionvae_config_groups", lambda: config_groups(), replace=True)
# train.py's run folder: a resumed run continues in its own (conf/train.yaml, hydra.run)
OmegaConf.register_new_resolver("fusionvae_run_dir", run_dir, replace=True)
OmegaConf.register_new_resolver("fusionvae_hydra_subdir", hydra_subdir, replace=True)


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="train")
def train_job(cfg: DictConfig) -> float | None:
    from fusionvae.jobs.train import train  # here, not above: `--help` and `--cfg` answer without importing Lightning

    with reported(), unused_run_folder_removed():
        return train(cfg).get("val/nelbo")  # the objective Hydra sweepers minimise


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="evaluate")
def evaluate_job(cfg: DictConfig) -> dict:
    from fusionvae.jobs.evaluate import run_evaluation  # as in train_job

    with reported(), unused_run_folder_removed():
        return run_evaluation(cfg)


def quiet_logging_failures() -> None:
    """A log file that cannot be written (full disk) must not print a traceback per log line: the
    run's one ``error:`` line says what failed (the setting Python's logging docs advise for
    applications)."""
    logging.raiseExceptions = False


def train_main() -> None:
    """``fusionvae-train`` / ``python train.py``: resume in the checkpoint's run folder, size a SLURM
    launcher from the trainer, then train."""
    quiet_logging_failures()
    with reported():
        check_command_line(sys.argv, CONF, "train")
        sys.argv = size_launcher(sys.argv, CONF)
    train_job()


def evaluate_main() -> None:
    """``fusionvae-evaluate`` / ``python evaluate.py``: on the checkpoint's training dataset."""
    quiet_logging_failures()
    with reported():
        check_command_line(sys.argv, CONF, "evaluate")
    sys.argv = evaluate_on_training_dataset(sys.argv, CONF)
    evaluate_job()
