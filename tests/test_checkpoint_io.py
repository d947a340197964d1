"""Atomic checkpoint writes and the clean-up of their leftovers (fusionvae/training/checkpoint_io.py)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import torch

from datamodules.tempfiles import HOST
from fusionvae.training.checkpoint_io import AtomicCheckpointIO, remove_stale_temps


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_save_creates_missing_parent_folders(tmp_path: Path):
    path = tmp_path / "run" / "checkpoints" / "epoch001.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 7, "w": torch.arange(3.0)}, path)
    loaded = AtomicCheckpointIO().load_checkpoint(path)
    assert loaded["global_step"] == 7 and torch.equal(loaded["w"], torch.arange(3.0))
    assert sorted(os.listdir(path.parent)) == ["epoch001.ckpt", "epoch001.ckpt.sha256"]  # no temporary left


def test_remove_stale_temps_deletes_dead_and_foreign_writers_only(tmp_path: Path, caplog):
    dead = tmp_path / f".last.ckpt.tmp-{dead_pid()}-{HOST}-abcd1234"
    remote = tmp_path / ".epoch003.ckpt.tmp-7-otherhost-abcd1234"  # a run folder has one writer at a time
    live = tmp_path / f".epoch004.ckpt.tmp-{os.getpid()}-{HOST}-abcd1234"
    keep = [tmp_path / "last.ckpt", tmp_path / ".hidden", live]
    for p in (dead, remote, *keep):
        p.write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="fusionvae.training.checkpoint_io"):
        removed = remove_stale_temps(tmp_path)
    assert sorted(removed) == sorted([dead, remote])
    assert sorted(tmp_path.iterdir()) == sorted(keep)
    assert sorted(r.getMessage() for r in caplog.records) == sorted(
        f"removed {p}: a checkpoint left half-written by an interrupted run" for p in (dead, remote)
    )
    assert remove_stale_temps(tmp_path / "missing") == []
