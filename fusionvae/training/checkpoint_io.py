"""Checkpoints written atomically: to a temporary file in the same folder, then renamed; each with
its SHA-256 beside it (``<name>.ckpt.sha256``, the format ``sha256sum -c`` reads).

The temporary is ``.<name>.tmp-<pid>-<host>-<hex>``: a run killed mid-write leaves it behind,
never a half-written ``<name>``; ``remove_stale_temps`` deletes such leftovers when a run starts
(``fusionvae.training.resilience.RunGuard`` calls it for the checkpoint folder). The checksum finds bytes
changed after the write (disk, copy, transfer) that still unzip and would load without a word
(``fusionvae.training.checksums``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from datamodules.tempfiles import owner_tag, remove_stale
from fusionvae.training.checksums import checksum_path, sha256_of, verify_checksum

TEMP_MARK = ".tmp"
log = logging.getLogger(__name__)


def _write_durably(path: Path, write, before_replace=None) -> None:
    """``write(f)`` to a temporary beside ``path``, fsync, ``before_replace()``, rename over ``path``."""
    tmp = path.with_name(f".{path.name}{TEMP_MARK}-{owner_tag()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except Exception as err:  # torch.save reports a full disk as a RuntimeError: name the file
        os_error = err if isinstance(err, OSError) else err.__context__
        if isinstance(os_error, OSError) and os_error.errno and not os_error.filename:
            raise OSError(os_error.errno, os.strerror(os_error.errno), str(path)) from err
        raise
    finally:
        tmp.unlink(missing_ok=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path, sums = Path(path), checksum_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # the old sum goes just before the new checkpoint replaces the old one: a crash before the new
        # sum is written leaves a checkpoint that loads unchecked, never one a stale sum calls damaged
        _write_durably(path, lambda f: torch.save(checkpoint, f), lambda: sums.unlink(missing_ok=True))
        text = f"{sha256_of(path)}  {path.name}\n"
        _write_durably(sums, lambda f: f.write(text.encode()))

    def load_checkpoint(self, path, *args, **kwargs):
        verify_checksum(path)  # Lightning's own loads: resume, SLURM requeue, test with ckpt_path="best"
        return super().load_checkpoint(path, *args, **kwargs)

    def remove_checkpoint(self, path) -> None:
        super().remove_checkpoint(path)
        checksum_path(path).unlink(missing_ok=True)


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Delete temporary checkpoint files in ``directory`` whose writer is gone (a dead pid here,
    or any other host: a run folder has one writer at a time)."""
    removed = remove_stale(directory, TEMP_MARK, other_hosts=True)
    for path in removed:
        log.warning("removed %s: a checkpoint left half-written by an interrupted run", path)
    return removed
