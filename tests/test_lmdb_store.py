"""PNG-in-LMDB store (datamodules/lmdb_store.py): format, metadata checks, atomicity, workers."""
from __future__ import annotations

import multiprocessing
import os
import pickle
import shutil
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from datamodules.images import decode_stack, encode_stack
from datamodules.lmdb_store import (META_KEY, LMDBMetadataError, LMDBReader, LMDBRecordError, StoredStacks,
                                    ensure_lmdb, is_complete, read_meta, record_key, write_lmdb)
from datamodules.parallel import parallel_map


def _meta(count: int, shape: list[int], **params) -> dict:
    return dict(kind="test", version=1, count=count, shape=shape, channels=shape[-1], seed=0, params=params)


def _stacks(count: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, *shape), dtype=np.uint8)


@pytest.fixture
def rgb_lmdb(tmp_path: Path) -> tuple[Path, np.ndarray, dict]:
    images = _stacks(10, (4, 8, 6, 3))
    meta = _meta(10, [4, 8, 6, 3], a=1)
    write_lmdb(tmp_path / "rgb", (encode_stack(s) for s in images), meta)
    return tmp_path / "rgb", images, meta


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_png_tile_roundtrip(channels: int) -> None:
    stack = _stacks(1, (3, 5, 7, channels))[0]
    assert np.array_equal(decode_stack(encode_stack(stack), stack.shape), stack)
    with pytest.raises(ValueError, match=r"decoded uint8 tile .* expected uint8"):
        decode_stack(encode_stack(stack), (3, 5, 7, 4 if channels != 4 else 3))


def test_write_read_keys_and_meta(rgb_lmdb) -> None:
    path, images, meta = rgb_lmdb
    reader = LMDBReader(path, meta)
    assert len(reader) == 10 and reader.shape == (4, 8, 6, 3)
    assert np.array_equal(reader.get_many([7, 0, 7]), images[[7, 0, 7]])
    assert np.array_equal(reader.get(3), images[3])
    assert read_meta(path)["params"] == {"a": 1}
    reader.close()  # lmdb refuses a second open of the environment in one process
    env = lmdb.open(str(path), readonly=True, lock=False)  # keys: zero-padded, plus the metadata
    with env.begin() as txn:
        keys = [k for k, _ in txn.cursor()]
    env.close()
    assert keys == [record_key(i) for i in range(10)] + [META_KEY] and record_key(3) == b"00000003"
    assert sorted(os.listdir(path.parent)) == ["rgb"]  # no temp dir left behind
    with pytest.raises(IndexError, match=r"index 10 out of range \[0, 10\)"):
        reader.get(10)


def test_grey_stacks_as_tensors(tmp_path: Path) -> None:
    images = _stacks(5, (2, 4, 4, 1))
    write_lmdb(tmp_path / "g", (encode_stack(s) for s in images), _meta(5, [2, 4, 4, 1]))
    items = StoredStacks(LMDBReader(tmp_path / "g")).__getitems__([1, 4])
    assert items[0].shape == (2, 1, 4, 4) and items[0].dtype == torch.float32
    assert torch.equal(items[1], torch.from_numpy(images[4]).permute(0, 3, 1, 2).float() / 255)


def test_metadata_mismatch_names_field(rgb_lmdb) -> None:
    path, _, meta = rgb_lmdb
    with pytest.raises(LMDBMetadataError, match=r"params\.a: stored 1, config expects 2.*rerun it"):
        LMDBReader(path, {**meta, "params": {"a": 2}}, hint="rerun it")
    with pytest.raises(LMDBMetadataError, match=r"shape: stored \[4, 8, 6, 3\]"):
        ensure_lmdb(path, {**meta, "shape": [4, 8, 6, 1]}, lambda: pytest.fail("must not regenerate"))
    assert ensure_lmdb(path, meta, lambda: pytest.fail("must not regenerate")) is False  # match: skipped


def test_interrupted_write_leaves_nothing_valid(tmp_path: Path) -> None:
    def records():
        yield encode_stack(_stacks(1, (1, 4, 4, 3))[0])
        raise KeyboardInterrupt  # killed half-way

    with pytest.raises(KeyboardInterrupt):
        write_lmdb(tmp_path / "x", records(), _meta(3, [1, 4, 4, 3]))
    assert os.listdir(tmp_path) == [] and not is_complete(tmp_path / "x")
    with pytest.raises(ValueError, match="0 records written .* meta count is 3"):  # too few: refused, cleaned up
        write_lmdb(tmp_path / "x", iter([]), _meta(3, [1, 4, 4, 3]))
    assert os.listdir(tmp_path) == []


def test_leftover_temp_dir_is_not_valid(tmp_path: Path, rgb_lmdb) -> None:
    path, images, meta = rgb_lmdb
    # A killed run leaves a temp dir with records but no metadata; copy data.mdb to fake one.
    env = lmdb.open(str(tmp_path / ".x.tmp-123-abcd"), map_size=1 << 24, lock=False)
    with env.begin(write=True) as txn:
        txn.put(record_key(0), encode_stack(images[0]))
    env.close()
    with pytest.raises(FileNotFoundError, match=r"LMDB not found: .*/x; run it.*\.x\.tmp-123-abcd"):
        LMDBReader(tmp_path / "x", hint="run it")
    with pytest.raises(ValueError, match="unfinished"):
        LMDBReader(tmp_path / ".x.tmp-123-abcd")
    os.rename(tmp_path / ".x.tmp-123-abcd", tmp_path / "y")  # even under a valid name: no metadata
    with pytest.raises(ValueError, match="no metadata record"):
        LMDBReader(tmp_path / "y")
    assert not is_complete(tmp_path / "y")
    assert ensure_lmdb(tmp_path / "x", meta, lambda: (encode_stack(s) for s in images))  # generated afresh
    assert np.array_equal(LMDBReader(tmp_path / "x", meta).get(9), images[9])


def test_corrupt_and_missing_records_name_the_key(rgb_lmdb) -> None:
    path, _, meta = rgb_lmdb
    env = lmdb.open(str(path), lock=False)
    with env.begin(write=True) as txn:
        txn.put(record_key(4), b"\x89PNG junk bytes")
        txn.delete(record_key(6))
    env.close()
    reader = LMDBReader(path, meta)
    reader.get(3)
    with pytest.raises(LMDBRecordError, match=rf"{path}: record 00000004 is not a valid .*delete it"):
        reader.get(4)
    with pytest.raises(LMDBRecordError, match=rf"{path}: record 00000006 is missing"):
        reader.get_many([5, 6])


def test_missing_lmdb_and_existing_target(tmp_path: Path, rgb_lmdb) -> None:
    with pytest.raises(FileNotFoundError, match="LMDB not found"):
        LMDBReader(tmp_path / "nothing")
    path, images, meta = rgb_lmdb
    with pytest.raises(FileExistsError, match="already holds an LMDB; delete it to regenerate it"):
        write_lmdb(path, (encode_stack(s) for s in images), meta)


def test_reader_pickles_and_reopens_after_regeneration(tmp_path: Path, rgb_lmdb) -> None:
    path, images, meta = rgb_lmdb
    reader = LMDBReader(path, meta)
    reader.get(0)  # environment open in this process
    clone = pickle.loads(pickle.dumps(reader))
    assert np.array_equal(clone.get(5), images[5])
    reader.close()
    assert np.array_equal(clone.get(2), images[2])  # reopened lazily
    # Replaced on disk (deleted and regenerated): the cached environment is not reused.
    shutil.rmtree(path)
    new = _stacks(10, (4, 8, 6, 3), seed=1)
    write_lmdb(path, (encode_stack(s) for s in new), meta)
    assert np.array_equal(reader.get(1), new[1])


def _collect(dataset: StoredStacks, workers: int, context: str | None = None) -> torch.Tensor:
    loader = DataLoader(dataset, batch_size=3, num_workers=workers, multiprocessing_context=context)
    return torch.cat(list(loader))


def test_dataloader_workers_after_parent_opened(rgb_lmdb) -> None:
    path, images, meta = rgb_lmdb
    dataset = StoredStacks(LMDBReader(path, meta))
    serial = _collect(dataset, 0)  # the parent holds the environment open when workers fork
    assert torch.equal(_collect(dataset, 2), serial)
    assert torch.equal(serial, torch.from_numpy(images).permute(0, 1, 4, 2, 3).float() / 255)


@pytest.mark.slow
def test_dataloader_spawn_workers(rgb_lmdb) -> None:
    path, _, meta = rgb_lmdb
    dataset = StoredStacks(LMDBReader(path, meta))
    assert torch.equal(_collect(dataset, 1, "spawn"), _collect(dataset, 0))


def test_parallel_map_keeps_order() -> None:
    items = list(range(-40, 0))
    assert list(parallel_map(abs, items, workers=2, desc="abs", progress=False)) == [abs(i) for i in items]
    assert list(parallel_map(abs, items, workers=0, progress=False)) == [abs(i) for i in items]
    assert multiprocessing.active_children() == []
