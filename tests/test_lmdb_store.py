"""PNG-in-LMDB store (datamodules/lmdb_store.py): format, metadata checks, atomicity, workers."""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from datamodules import lmdb_env, lmdb_store
from datamodules.images import decode_stack, encode_stack, luminance, quantize, to_tensor
from datamodules.lmdb_store import (
    META_KEY,
    LMDBMetadataError,
    LMDBReader,
    LMDBRecordError,
    StoredStacks,
    check_meta,
    ensure_lmdb,
    is_complete,
    read_meta,
    record_key,
    remove_stale_temps,
    write_lmdb,
)
from datamodules.parallel import parallel_map
from datamodules.tempfiles import HOST


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


# ---- messages -----------------------------------------------------------------------------------
def _exact(text: str) -> str:
    return f"^{re.escape(text)}$"


def test_metadata_message_lists_every_difference_and_the_default_fix():
    stored = dict(kind="test", count=10, params={"a": 1})
    expected = dict(kind="test", count=12, params={"a": 2}, seed=3)
    with pytest.raises(
        LMDBMetadataError,
        match=_exact(
            "LMDB /x/lmdb was generated with different settings (count: stored 10, config expects 12; "
            "params.a: stored 1, config expects 2; seed: stored '<missing>', config expects 3). It is not "
            "regenerated automatically: delete /x/lmdb and generate it again, "
            "or point the config at another LMDB directory"
        ),
    ):
        check_meta(stored, expected, "/x/lmdb")
    check_meta({"shape": [1, 2]}, {"shape": (1, 2)}, "/x")  # tuples compare as the stored lists


@pytest.mark.parametrize(
    "stored, expected, difference",
    [
        ({"params": 5}, {"params": {"a": 1}}, "params: stored 5, config expects {'a': 1}"),
        ({"params": {"a": 1}}, {"params": 3}, "params: stored {'a': 1}, config expects 3"),
        ({}, {"params": {"a": 1}}, "params: stored '<missing>', config expects {'a': 1}"),
    ],
)
def test_metadata_a_dict_against_a_non_dict_is_one_difference(stored, expected, difference):
    with pytest.raises(LMDBMetadataError, match=rf"\({re.escape(difference)}\)\. "):
        check_meta(stored, expected, "/x")


def test_missing_lmdb_messages(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=_exact(f"LMDB not found: {tmp_path / 'x'}")):
        LMDBReader(tmp_path / "x")
    with pytest.raises(FileNotFoundError, match=_exact(f"LMDB not found: {tmp_path / 'x'}; run make_x")):
        read_meta(tmp_path / "x", hint="run make_x")
    (tmp_path / ".x.tmp-1-a").mkdir()
    (tmp_path / ".x.tmp-2-b").mkdir()
    with pytest.raises(
        FileNotFoundError,
        match=_exact(
            f"LMDB not found: {tmp_path / 'x'} (unfinished .x.tmp-1-a, .x.tmp-2-b in {tmp_path} "
            "from an interrupted run can be deleted)"
        ),
    ):
        read_meta(tmp_path / "x")


def test_mismatch_messages_name_the_lmdb_and_the_hint(rgb_lmdb):
    path, _, meta = rgb_lmdb
    wrong = {**meta, "seed": 1}
    head = f"LMDB {path} was generated with different settings (seed: stored 0, config expects 1). "
    with pytest.raises(
        LMDBMetadataError,
        match=_exact(
            head + f"It is not regenerated automatically: delete {path} and generate it again, "
            "or point the config at another LMDB directory"
        ),
    ):
        ensure_lmdb(path, wrong, lambda: pytest.fail("must not regenerate"))
    tail = "It is not regenerated automatically: run make_x, or point the config at another LMDB directory"
    with pytest.raises(LMDBMetadataError, match=_exact(head + tail)):
        ensure_lmdb(path, wrong, lambda: pytest.fail("must not regenerate"), hint="run make_x")
    with pytest.raises(LMDBMetadataError, match=_exact(head + tail)):
        LMDBReader(path, wrong, hint="run make_x")


@pytest.mark.parametrize(
    "images",
    [
        np.zeros((1, 4, 4, 3), np.float32),  # not uint8
        np.zeros((4, 4, 3), np.uint8),  # no stack axis
        np.zeros((1, 4, 4, 2), np.uint8),  # two channels
    ],
)
def test_encode_stack_rejects_other_arrays(images):
    with pytest.raises(
        ValueError,
        match=_exact(f"expected uint8 images [n, H, W, C] with C in (1, 3, 4), got {images.dtype} {images.shape}"),
    ):
        encode_stack(images)


def test_decode_stack_names_the_expected_tile():
    data = encode_stack(_stacks(1, (3, 5, 7, 3))[0])
    with pytest.raises(ValueError, match=_exact("decoded uint8 tile (15, 7, 3), expected uint8 (15, 7, 4)")):
        decode_stack(data, (3, 5, 7, 4))


# ---- values ----------------------------------------------------------------------------------------
def test_rgb_stacks_as_grey_match_pil(rgb_lmdb):
    path, images, meta = rgb_lmdb
    reader = LMDBReader(path, meta)
    assert reader.get_many([1, 2]).dtype == np.uint8 and reader.get(0).dtype == np.uint8
    grey = StoredStacks(reader, channels=1).__getitems__([2, 5])
    for item, index in zip(grey, [2, 5]):
        pil = np.stack([np.asarray(Image.fromarray(img).convert("L")) for img in images[index]])
        assert item.shape == (4, 1, 8, 6)
        assert torch.equal(item, torch.from_numpy(pil).unsqueeze(1).float() / 255)
    colour = StoredStacks(reader, channels=3).__getitems__([2])[0]
    assert torch.equal(colour, torch.from_numpy(images[2]).permute(0, 3, 1, 2).float() / 255)
    grey_in = _stacks(1, (2, 3, 3, 1))[0]
    assert torch.equal(to_tensor(grey_in, channels=1), torch.from_numpy(grey_in).permute(0, 3, 1, 2).float() / 255)


def test_luminance_and_quantize_values():
    rgb = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.2, 0.4, 0.6]], dtype=torch.float64)
    rgb = rgb.T.reshape(1, 3, 2, 2)  # [..., 3, H, W]
    expected = torch.tensor([0.299, 0.587, 0.114, 0.299 * 0.2 + 0.587 * 0.4 + 0.114 * 0.6], dtype=torch.float64)
    out = luminance(rgb)
    assert out.shape == (1, 1, 2, 2) and out.dtype == torch.float64
    torch.testing.assert_close(out.view(-1), expected, rtol=1e-15, atol=0)
    assert luminance(torch.zeros(5, 3, 2, 4, device="meta")).shape == (5, 1, 2, 4)
    x = torch.tensor([-0.2, 0.33, 0.61, 0.8, 1.0, 1.4])
    assert torch.equal(quantize(x.clone()), torch.tensor([0.0, 84, 156, 204, 255, 255]) / 255)


# ---- reading plumbing -----------------------------------------------------------------------------
def test_reader_environment_is_opened_once_read_only_and_without_lock_files(rgb_lmdb):
    path, images, meta = rgb_lmdb
    reader = LMDBReader(path, meta)
    env = lmdb_env.open_env(str(path))
    assert lmdb_env.open_env(str(path)) is env  # cached: one environment per process
    flags = env.flags()
    assert (flags["readonly"], flags["lock"], flags["readahead"], flags["meminit"]) == (True, False, False, False)
    assert np.array_equal(reader.get(1), images[1])
    assert os.listdir(path) == ["data.mdb"]  # neither the writer nor readers leave a lock.mdb
    reader.close()
    with pytest.raises(lmdb.Error):
        env.stat()  # really closed
    reader.close()  # closing twice is harmless
    assert np.array_equal(reader.get(2), images[2])  # reopened


def test_reader_reopens_a_data_file_replaced_in_place(tmp_path: Path, rgb_lmdb):
    path, images, meta = rgb_lmdb
    reader = LMDBReader(path, meta)
    assert np.array_equal(reader.get(4), images[4])
    new = _stacks(10, (4, 8, 6, 3), seed=2)
    write_lmdb(tmp_path / "new", (encode_stack(s) for s in new), meta)
    os.replace(tmp_path / "new" / "data.mdb", path / "data.mdb")  # as rsync or cp --remove-destination do
    assert np.array_equal(reader.get(4), new[4])


def test_reset_after_fork_replaces_a_held_lock(rgb_lmdb):
    path, images, meta = rgb_lmdb
    reader = LMDBReader(path, meta)
    held = lmdb_env._ENVS_LOCK
    held.acquire()  # as if another thread held it when the process forked
    try:
        lmdb_env._reset_after_fork()
        assert lmdb_env._ENVS_LOCK is not held
        assert np.array_equal(reader.get(3), images[3])  # would deadlock on the held lock
    finally:
        held.release()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_remove_stale_temps_deletes_dead_local_writers_only(tmp_path: Path, caplog):
    dead = tmp_path / f".x.tmp-{_dead_pid()}-{HOST}-abcd1234"
    live = tmp_path / f".y.tmp-{os.getpid()}-{HOST}-abcd1234"
    remote = tmp_path / ".z.tmp-7-otherhost-abcd1234"  # another host's writer may be running
    for d in (dead, live, remote, tmp_path / "data"):
        d.mkdir()
        (d / "data.mdb").write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="datamodules.lmdb_store"):
        assert remove_stale_temps(tmp_path) == [dead]
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, remote.name, "data"])
    assert [r.getMessage() for r in caplog.records] == [f"removed {dead}: an unfinished LMDB of an interrupted run"]


# ---- writing --------------------------------------------------------------------------------------
def test_write_lmdb_rejects_incomplete_metadata(tmp_path: Path):
    meta = _meta(1, [1, 4, 4, 3])
    del meta["kind"], meta["seed"]
    with pytest.raises(ValueError, match=_exact("LMDB metadata lacks ['kind', 'seed']")):
        write_lmdb(tmp_path / "x", [encode_stack(_stacks(1, (1, 4, 4, 3))[0])], meta)
    assert os.listdir(tmp_path) == []


def test_write_lmdb_refuses_more_records_than_the_count(tmp_path: Path):
    records = [encode_stack(s) for s in _stacks(3, (1, 4, 4, 3))]
    with pytest.raises(ValueError, match=_exact(f"more records than meta count 2 for {tmp_path / 'x'}")):
        write_lmdb(tmp_path / "x", iter(records), _meta(2, [1, 4, 4, 3]))
    assert os.listdir(tmp_path) == []


def test_write_lmdb_creates_missing_parents(tmp_path: Path):
    images = _stacks(2, (1, 4, 4, 1))
    path = write_lmdb(tmp_path / "a" / "b" / "x", (encode_stack(s) for s in images), _meta(2, [1, 4, 4, 1]))
    assert path == tmp_path / "a" / "b" / "x" and np.array_equal(LMDBReader(path).get_many([0, 1]), images)


def test_write_lmdb_many_small_records(tmp_path: Path):
    """More records than one write transaction holds (512), and more than 8192 of them: the map
    grows with the count."""
    tiles = [encode_stack(np.full((1, 4, 4, 1), i % 251, np.uint8)) for i in range(9000)]
    write_lmdb(tmp_path / "x", iter(tiles), _meta(9000, [1, 4, 4, 1]))
    reader = LMDBReader(tmp_path / "x")
    assert len(reader) == 9000
    assert [int(reader.get(i)[0, 0, 0, 0]) for i in (0, 511, 512, 513, 8999)] == [
        0,
        511 % 251,
        512 % 251,
        513 % 251,
        8999 % 251,
    ]


def test_write_lmdb_larger_than_the_default_map(tmp_path: Path):
    """py-lmdb's default map is 10 MiB: three incompressible 4 MiB records need the computed size."""
    images = _stacks(3, (1, 1024, 1024, 4), seed=3)
    write_lmdb(tmp_path / "x", (encode_stack(s) for s in images), _meta(3, [1, 1024, 1024, 4]))
    assert np.array_equal(LMDBReader(tmp_path / "x").get(2), images[2])


def test_write_lmdb_single_incompressible_record(tmp_path: Path):
    image = _stacks(1, (1, 32, 32, 4), seed=4)
    write_lmdb(tmp_path / "x", [encode_stack(image[0])], _meta(1, [1, 32, 32, 4]))
    assert np.array_equal(LMDBReader(tmp_path / "x").get(0), image[0])


def test_write_lmdb_syncs_before_the_rename(tmp_path: Path, monkeypatch):
    events, real_open, real_rename = [], lmdb.open, os.rename

    class Spy:
        def __init__(self, env):
            self._env = env

        def __getattr__(self, name):
            return getattr(self._env, name)

        def sync(self, force=False):
            events.append(("sync", force))
            return self._env.sync(force)

    monkeypatch.setattr(lmdb, "open", lambda *args, **kwargs: Spy(real_open(*args, **kwargs)))
    monkeypatch.setattr(os, "rename", lambda src, dst: (events.append("rename"), real_rename(src, dst))[1])
    write_lmdb(tmp_path / "x", [encode_stack(_stacks(1, (1, 4, 4, 3))[0])], _meta(1, [1, 4, 4, 3]))
    assert events == [("sync", True), "rename"]


def test_write_lmdb_keeps_a_copy_another_process_finished_first(tmp_path: Path):
    path, theirs, ours = tmp_path / "x", _stacks(2, (1, 4, 4, 3), seed=5), _stacks(2, (1, 4, 4, 3), seed=6)
    meta = _meta(2, [1, 4, 4, 3])

    def records():
        yield from (encode_stack(s) for s in ours)
        write_lmdb(path, (encode_stack(s) for s in theirs), meta)  # the other process wins the race

    assert write_lmdb(path, records(), meta) == path
    assert np.array_equal(LMDBReader(path).get_many([0, 1]), theirs)
    assert os.listdir(tmp_path) == ["x"]  # our copy removed


def test_write_lmdb_refuses_to_replace_a_folder_that_is_not_an_lmdb(tmp_path: Path):
    path = tmp_path / "x"
    meta = _meta(1, [1, 4, 4, 3])

    def records():
        yield encode_stack(_stacks(1, (1, 4, 4, 3))[0])
        path.mkdir()  # something else appears at the target meanwhile
        (path / "notes.txt").write_text("mine")

    with pytest.raises(
        FileExistsError,
        match=_exact(
            f"cannot move the new LMDB to {path}: it exists and is not an LMDB (Directory not empty); "
            "remove it or choose another directory"
        ),
    ):
        write_lmdb(path, records(), meta)
    assert os.listdir(tmp_path) == ["x"] and os.listdir(path) == ["notes.txt"]


def test_interrupt_after_the_rename_keeps_the_complete_lmdb(tmp_path: Path, monkeypatch):
    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(lmdb_store, "_fsync_dir", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_lmdb(tmp_path / "x", [encode_stack(_stacks(1, (1, 4, 4, 3))[0])], _meta(1, [1, 4, 4, 3]))
    assert os.listdir(tmp_path) == ["x"] and is_complete(tmp_path / "x")
