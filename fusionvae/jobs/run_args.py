"""The command line and the run folder, before Hydra starts: one-line refusals of what Hydra would
answer with a traceback (``check_command_line``), the resolvers that put a resumed run in its own
folder (``run_dir``, ``hydra_subdir``; conf/train.yaml), and the arguments that evaluate a
checkpoint on its training dataset. The one override parser is ``select_overrides``. No torch
here: ``train.py --help`` must answer without importing it."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from omegaconf import DictConfig

from fusionvae.errors import BadInputError, CheckpointNotFoundError
from fusionvae.training.checkpoint_paths import LAST, resolve_ckpt_path, run_dir_of


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


def resumed_run(ckpt_path, log_dir, task_name) -> Path | None:
    """The Hydra run folder of the checkpoint ``ckpt_path`` names (``last``: the newest run's), or
    None: no checkpoint, one outside a run folder, or one that cannot be found (``train`` then
    reports it in one line)."""
    try:
        ckpt = resolve_ckpt_path(ckpt_path, log_dir, task_name)
    except CheckpointNotFoundError:
        return None
    return run_dir_of(ckpt) if ckpt is not None else None


def run_dir(ckpt_path, log_dir, task_name, fresh: str) -> str:
    """``hydra.run.dir`` of train.py (a resolver in conf/train.yaml): a resumed run continues in its
    own folder; any other run gets ``fresh``. An explicit ``hydra.run.dir=`` still wins."""
    run = resumed_run(ckpt_path, log_dir, task_name)
    return str(run) if run is not None else fresh


def hydra_subdir(ckpt_path, log_dir, task_name, stamp: str) -> str:
    """``hydra.output_subdir``: a resumed run keeps its first Hydra files in ``.hydra`` and writes
    this start's to ``.hydra/resume_<stamp>``."""
    return ".hydra" if resumed_run(ckpt_path, log_dir, task_name) is None else f".hydra/resume_{stamp}"


def training_dataset(run: Path) -> tuple[str | None, list[str]]:
    """The ``dataset`` choice of a training run and its ``dataset.*`` overrides (from ``.hydra``)."""
    from omegaconf import OmegaConf

    hydra_file, overrides_file = run / ".hydra" / "hydra.yaml", run / ".hydra" / "overrides.yaml"
    choice = OmegaConf.load(hydra_file).hydra.runtime.choices.get("dataset") if hydra_file.is_file() else None
    overrides = list(OmegaConf.load(overrides_file)) if overrides_file.is_file() else []
    return choice, [str(o) for o in overrides if str(o).lstrip("+").startswith(("dataset.", "dataset/"))]


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


def check_command_line(argv: list[str], config_dir: Path, config_name: str) -> None:
    """Refuse, in one line and before Hydra starts, what Hydra would answer with a traceback or
    accept without a word: a config group set to ``null``, a top-level key no config has
    (``+foo=1``), and a log folder that is a file."""
    groups = {p.name for p in config_dir.iterdir() if p.is_dir() and not p.name.startswith("_")}
    known = {*_top_level_keys(config_dir / f"{config_name}.yaml"), *groups, "hydra"}
    for arg in argv[1:]:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        name = key.lstrip("+~").split(".")[0].split("/")[0].split("@")[0]
        if key.lstrip("+~") in groups and value.strip() in ("null", "None"):
            fix = f"{name}=none" if (config_dir / name / "none.yaml").is_file() else f"~{name}"
            raise BadInputError(f"{arg}: a config group takes an option, not null; use {fix} to run without one")
        if name not in known:
            hint = difflib.get_close_matches(name, sorted(known), n=1)
            maybe = f" (did you mean {hint[0]}?)" if hint else ""
            raise BadInputError(
                f"{arg}: {config_name}.py has no setting {name}{maybe}; python {config_name}.py --cfg job lists them"
            )
    _check_log_dir(argv)


def _top_level_keys(config_file: Path) -> list[str]:
    from omegaconf import OmegaConf

    return [str(k) for k in OmegaConf.load(config_file) if k != "defaults"]


def _check_log_dir(argv: list[str]) -> None:
    """``FUSIONVAE_LOG_DIR`` / ``paths.log_dir=`` / ``hydra.run.dir=`` must not name or lie below a
    file (Hydra would fail making the run folder, with a traceback)."""
    given = [("FUSIONVAE_LOG_DIR", os.environ.get("FUSIONVAE_LOG_DIR"))]
    given += [tuple(a.lstrip("+").split("=", 1)) for a in argv[1:] if a.lstrip("+").startswith(_FOLDER_KEYS)]
    for key, value in given:
        if not value or "$" in value:  # unset, or an interpolation Hydra resolves
            continue
        path = Path(value.strip("'\"")).expanduser()
        blocker = next((p for p in (path, *path.parents) if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            raise BadInputError(f"{key}={value}: {blocker} is a file, not a folder; point {key} at a folder")


_FOLDER_KEYS = ("paths.log_dir=", "hydra.run.dir=", "hydra.sweep.dir=")
