"""Checkpoints written atomically: to a temporary file in the same folder, then renamed.

The temporary is ``.<name>.tmp-<pid>-<host>-<hex>``: a run killed mid-write leaves it behind,
never a half-written ``<name>``; ``remove_stale_temps`` deletes such leftovers when a run starts
(``fusionvae.resilience.RunGuard`` calls it for the checkpoint folder).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from datamodules.tempfiles import owner_tag, remove_stale

TEMP_MARK = ".tmp"
log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}{TEMP_MARK}-{owner_tag()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Delete temporary checkpoint files in ``directory`` whose writer is gone (a dead pid here,
    or any other host: a run folder has one writer at a time)."""
    removed = remove_stale(directory, TEMP_MARK, other_hosts=True)
    for path in removed:
        log.warning("removed %s: a checkpoint left half-written by an interrupted run", path)
    return removed
