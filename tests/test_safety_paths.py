"""Safety paths: LMDB metadata with a field missing from the stored record, and atomic checkpoints
(an interrupted save keeps the previous last.ckpt and leaves no temporary file)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from datamodules.images import encode_stack
from datamodules.lmdb_store import LMDBMetadataError, LMDBReader, check_meta, ensure_lmdb, write_lmdb
from fusionvae.training.build import build
from fusionvae.training.checkpoint_io import AtomicCheckpointIO
from tests.conftest import TINY, compose_cfg

META = dict(kind="test", version=1, count=2, shape=[1, 4, 4, 3], channels=3, seed=0, params=dict(a=1, b=[2, 3]))


# ---- LMDB metadata ------------------------------------------------------------------------------
@pytest.mark.parametrize("drop, field", [("seed", "seed"), ("version", "version"), ("params.b", r"params\.b")])
def test_a_field_missing_from_the_stored_metadata_is_refused(drop, field):
    stored = {**META, "params": dict(META["params"])}
    if "." in drop:
        del stored["params"][drop.split(".")[1]]
    else:
        del stored[drop]
    with pytest.raises(LMDBMetadataError, match=rf"\({field}: stored '<missing>', config expects .*rebuild it"):
        check_meta(stored, META, "/x/lmdb", hint="rebuild it")
    check_meta(META, META, "/x/lmdb")  # complete metadata passes


def test_stored_none_is_not_a_missing_field():
    expected = {**META, "seed": None}
    check_meta(expected, expected, "/x")
    with pytest.raises(LMDBMetadataError, match=r"seed: stored '<missing>', config expects None"):
        check_meta({k: v for k, v in expected.items() if k != "seed"}, expected, "/x")


def test_reader_and_ensure_refuse_an_lmdb_lacking_an_expected_param(tmp_path: Path):
    images = np.random.default_rng(0).integers(0, 256, (2, 1, 4, 4, 3), dtype=np.uint8)
    old = {**META, "params": dict(a=1)}  # written by an older generator that had no "b"
    write_lmdb(tmp_path / "x", (encode_stack(s) for s in images), old)
    with pytest.raises(LMDBMetadataError, match=r"params\.b: stored '<missing>', config expects \[2, 3\]"):
        LMDBReader(tmp_path / "x", META)
    with pytest.raises(LMDBMetadataError, match=r"params\.b: stored '<missing>'"):
        ensure_lmdb(tmp_path / "x", META, lambda: pytest.fail("a mismatching LMDB must not be regenerated"))
    assert np.array_equal(LMDBReader(tmp_path / "x", old).get(1), images[1])


# ---- atomic checkpoints -------------------------------------------------------------------------
def _checkpoint(value: float) -> dict:
    return {"state_dict": {"w": torch.full((64, 64), value)}, "global_step": int(value)}


def test_interrupted_checkpoint_save_keeps_the_previous_file(tmp_path: Path, monkeypatch):
    io = AtomicCheckpointIO()
    last = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint(_checkpoint(1.0), last)
    good = last.read_bytes()
    real_save = torch.save

    def interrupted(obj, f, *args, **kwargs):  # half a file, then the disk fills up (or SIGKILL)
        real_save(obj, f, *args, **kwargs)
        if isinstance(f, (str, os.PathLike)):
            os.truncate(f, os.path.getsize(f) // 2)
        else:
            f.truncate(f.tell() // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(OSError, match="No space left on device"):
        io.save_checkpoint(_checkpoint(2.0), last)
    monkeypatch.undo()
    assert last.read_bytes() == good
    assert sorted(os.listdir(last.parent)) == ["last.ckpt", "last.ckpt.sha256"]  # no temporary file left behind
    assert io.load_checkpoint(last)["global_step"] == 1  # its checksum still matches it


def test_checkpoint_save_replaces_the_file_without_leftovers(tmp_path: Path):
    io = AtomicCheckpointIO()
    last = tmp_path / "last.ckpt"
    io.save_checkpoint(_checkpoint(1.0), last)
    inode = last.stat().st_ino
    io.save_checkpoint(_checkpoint(3.0), last)
    loaded = io.load_checkpoint(last)
    assert loaded["global_step"] == 3 and torch.equal(loaded["state_dict"]["w"], torch.full((64, 64), 3.0))
    assert last.stat().st_ino != inode  # a new file renamed over the old one, not rewritten in place
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt", "last.ckpt.sha256"]


def test_training_configs_use_the_atomic_checkpoint_io(tmp_path: Path):
    paths = [f"paths.data_dir={tmp_path}", f"paths.output_dir={tmp_path}"]
    _, _, trainer = build(compose_cfg("train", [*TINY, *paths]))
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    for name in ("cpu", "gpu", "ddp", "ddp_cpu", "multi_node"):  # the GPU ones cannot start a trainer here
        plugins = [instantiate(p) for p in compose_cfg("train", [*TINY, *paths, f"trainer={name}"]).trainer.plugins]
        assert any(isinstance(p, AtomicCheckpointIO) for p in plugins), name
