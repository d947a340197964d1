"""Where a run's checkpoints are: ``ckpt_path`` as a path (``last``: the newest run's
``last.ckpt``) and the Hydra run folder holding a checkpoint. No torch: the command line uses it
before Hydra starts (``train.py --help`` must answer without importing torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fusionvae.errors import CheckpointNotFoundError

LAST = "last"  # ckpt_path=last: the newest <log_dir>/<task_name>/runs/*/checkpoints/last.ckpt


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


def run_dir_of(ckpt: Path) -> Path | None:
    """The Hydra run folder holding ``<run>/checkpoints/<ckpt>``, if it is one."""
    run = ckpt.absolute().parent.parent
    return run if ckpt.absolute().parent.name == "checkpoints" and (run / ".hydra").is_dir() else None
