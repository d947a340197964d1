"""Damaged LMDB files and full disks end in one line naming the file or folder and the fix
(issue 20): our own stores (``datamodules.lmdb_store``), the official LMDBs
(``datamodules.official_lmdb``) and the builds, through the datamodules and ``reported()``."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import lmdb
import numpy as np
import pytest

from datamodules import lmdb_fill
from datamodules.demo_images import write_demo
from datamodules.image_folder import ImageFolderDataModule
from datamodules.images import encode_stack
from datamodules.lmdb_env import close_env, resolve
from datamodules.lmdb_store import (
    LMDBDamagedError,
    LMDBNoSpaceError,
    LMDBReader,
    ensure_lmdb,
    is_complete,
    read_meta,
    write_lmdb,
)
from datamodules.official import FusionCelebAOfficialDataModule
from datamodules.official_lmdb import OfficialLMDB
from datamodules.view_styles import EllipseWindows
from fusionvae.jobs.reporting import reported
from tests.official_standins import CELEBA_NAMES, cv2_png, make_celeba_official, write_official_lmdb

PAGE = 4096
OUR_FIX = "and run again to build it anew (or copy an intact one there)"
OFFICIAL_FIX = "copy it again from the official download (or re-create it) into dataset.official_dir"
SPACE_FIX = "free space or point paths.data_dir / FUSIONVAE_DATA_DIR (or dataset.lmdb_dir) at a larger disk"


def _meta(count: int, size: int) -> dict:
    return dict(kind="test", version=1, count=count, shape=[1, size, size, 1], channels=1, seed=0, params={})


def _images(count: int, size: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (count, 1, size, size, 1), dtype=np.uint8)


def _store(path: Path, count: int = 300, size: int = 16) -> Path:
    """One of our stores: small records (many keys per leaf page) or, with a large ``size``, records
    in overflow pages."""
    write_lmdb(path, (encode_stack(s) for s in _images(count, size)), _meta(count, size))
    return path


def zero_page(lmdb_dir: Path, page: int, dst: Path) -> Path:
    """A copy of the LMDB folder ``lmdb_dir`` with its data.mdb page ``page`` overwritten by zeros."""
    shutil.copytree(lmdb_dir, dst)
    with open(dst / "data.mdb", "r+b") as f:
        f.seek(page * PAGE)
        f.write(bytes(PAGE))
    return dst


def pages(lmdb_dir: Path) -> int:
    return os.path.getsize(lmdb_dir / "data.mdb") // PAGE


def one_line(err: BaseException) -> str:
    message = str(err)
    assert "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def our_store(tmp_path_factory) -> Path:
    return _store(tmp_path_factory.mktemp("ours") / "store")


# ----------------------------------------------------------------------------- our stores


def _damage_on_our_paths(path: Path, count: int, size: int) -> list[str]:
    """What is_complete, the reader, reading every record and a build make of the damaged store
    ``path``: the messages of LMDBDamagedError (anything else fails the test)."""
    messages = []
    steps = [
        lambda: is_complete(path),
        lambda: LMDBReader(path, _meta(count, size)).get_many(range(count)),
        lambda: ensure_lmdb(path, _meta(count, size), lambda: (encode_stack(s) for s in _images(count, size))),
    ]
    try:
        for step in steps:
            try:
                step()
            except LMDBDamagedError as err:
                messages.append(one_line(err))
    finally:
        close_env(str(resolve(path)))
    return messages


@pytest.mark.parametrize("count, size", [(300, 16), (12, 64)], ids=["leaf-records", "overflow-records"])
def test_every_zeroed_page_of_our_store_is_one_line_naming_the_file_and_the_fix(tmp_path, count, size):
    src = _store(tmp_path / "src", count, size)
    seen = set()
    for page in range(pages(src)):
        path = zero_page(src, page, tmp_path / f"p{page}")
        for message in _damage_on_our_paths(path, count, size):
            file_named = f"LMDB file {path / 'data.mdb'} is damaged (" in message
            assert file_named or message.startswith(f"LMDB {path}: record "), message
            assert "damaged" in message and ("delete it" in message or f"delete {path} " in message), message
            seen.add(message.split("(")[1].split(")")[0] if file_named else "record")
        assert not any(".tmp-" in p for p in os.listdir(tmp_path)), "a build left a temp dir behind"
        shutil.rmtree(path)
    assert {"MDB_INVALID: File is not an LMDB file"} <= seen  # the header pages
    assert seen & {"MDB_CORRUPTED: Located page was wrong type", "record"}  # the tree / data pages


def test_a_damaged_store_is_not_taken_for_a_missing_one_by_a_build(our_store, tmp_path, capsys):
    """It used to end in FileExistsError 'already holds an LMDB' (a traceback) or a bare lmdb error."""
    path = zero_page(our_store, 0, tmp_path / "store")
    before = (path / "data.mdb").read_bytes()
    with pytest.raises(LMDBDamagedError) as err:
        ensure_lmdb(path, _meta(300, 16), lambda: iter(()))
    assert one_line(err.value) == (
        f"LMDB file {path / 'data.mdb'} is damaged (MDB_INVALID: File is not an LMDB file): delete {path} {OUR_FIX}"
    )
    assert (path / "data.mdb").read_bytes() == before and os.listdir(tmp_path) == ["store"]  # untouched
    with pytest.raises(SystemExit) as stop, reported():
        LMDBReader(path)
    assert stop.value.code == 1 and capsys.readouterr().err == f"error: {err.value}\n"


def test_a_damaged_page_in_the_middle_fails_the_read_in_one_line(our_store, tmp_path, capsys):
    path = zero_page(our_store, pages(our_store) // 2, tmp_path / "store")
    reader = LMDBReader(path, _meta(300, 16))  # the metadata is intact
    with pytest.raises(SystemExit) as stop, reported():
        reader.get_many(range(300))
    err = capsys.readouterr().err
    assert stop.value.code == 1 and err.count("\n") == 1
    assert err.startswith(f"error: LMDB file {path / 'data.mdb'} is damaged (MDB_") and err.endswith(f"{OUR_FIX}\n")
    reader.close()


def test_a_damaged_metadata_record_is_named(tmp_path):
    path = _store(tmp_path / "store", 3, 8)
    env = lmdb.open(str(path), lock=False)
    with env.begin(write=True) as txn:
        txn.put(b"__meta__", b'{"kind": "test", "cou\xff')
    env.close()
    with pytest.raises(LMDBDamagedError, match=r"is damaged \(its metadata record is not the JSON the writer stored\)"):
        LMDBReader(path)


def test_image_folder_datamodule_reports_its_damaged_lmdb_and_rebuild_replaces_it(tmp_path, capsys):
    """Without dataset.rebuild: one line (it used to end in 'already holds an LMDB', a traceback);
    with it: the damaged LMDB is built anew."""
    write_demo(tmp_path / "folder", 40, grey=True, seed=1)
    settings = dict(data_dir=str(tmp_path / "data"), path=str(tmp_path / "folder"), channels=1, image_size=32)
    settings.update(batch_size=8, num_workers=0, workers=0)
    style = EllipseWindows(n_ellipses=2, r_low=5, r_high=10, noise_std=0.25)
    dm = ImageFolderDataModule(style, **settings)
    dm.prepare_data()
    images = dm.lmdb_dir / "images"
    dm.teardown()
    close_env(str(resolve(images)))
    with open(images / "data.mdb", "r+b") as f:
        f.write(bytes(PAGE))  # page 0: the header
    with pytest.raises(SystemExit) as stop, reported():
        ImageFolderDataModule(style, **settings).prepare_data()
    assert stop.value.code == 1 and capsys.readouterr().err == (
        f"error: LMDB file {images / 'data.mdb'} is damaged (MDB_INVALID: File is not an LMDB file): "
        f"delete {images} {OUR_FIX}\n"
    )
    rebuilt = ImageFolderDataModule(style, **settings, rebuild=True)
    rebuilt.prepare_data()
    assert is_complete(images) and read_meta(images)["count"] == 40
    rebuilt.teardown()


# ----------------------------------------------------------------------------- official LMDBs


def _damage_on_official_paths(path: Path) -> list[str]:
    messages = []
    reader = []
    steps = [
        lambda: reader.append(OfficialLMDB(path)),
        lambda: reader[0].check_keys(),
        lambda: reader[0].check_records(),
        lambda: reader[0].get_many(range(len(reader[0]))),
    ]
    try:
        for step in steps:
            try:
                step()
            except LMDBDamagedError as err:
                messages.append(one_line(err))
            if not reader:
                break
    finally:
        close_env(str(resolve(path)))
    return messages


@pytest.mark.parametrize("count, size", [(200, 8), (12, 64)], ids=["leaf-records", "overflow-records"])
def test_every_zeroed_page_of_an_official_lmdb_is_one_line_naming_the_file_and_the_fix(tmp_path, count, size):
    images = np.random.default_rng(0).integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    src = write_official_lmdb(tmp_path / "src.lmdb", [cv2_png(image) for image in images])
    seen = set()
    for page in range(pages(src)):
        path = zero_page(src, page, tmp_path / f"p{page}.lmdb")
        for message in _damage_on_official_paths(path):
            file_named = message.startswith(f"official LMDB file {path / 'data.mdb'} is damaged (")
            assert file_named or message.startswith(f"official LMDB {path}: record key "), message
            assert "damaged" in message and message.endswith(OFFICIAL_FIX), message
            seen.add(message.split("(")[1].split(")")[0] if file_named else "record")
        shutil.rmtree(path)
    assert {"MDB_INVALID: File is not an LMDB file"} <= seen
    assert seen & {"MDB_CORRUPTED: Located page was wrong type", "record"}


def test_official_datamodule_reports_a_damaged_lmdb_before_training(tmp_path, capsys):
    make_celeba_official(tmp_path / "official", 12, 6)
    valid = tmp_path / "official" / CELEBA_NAMES["valid"]
    with open(valid / "data.mdb", "r+b") as f:
        f.write(bytes(PAGE))
    dm = FusionCelebAOfficialDataModule(str(tmp_path / "official"), batch_size=2, num_workers=0)
    with pytest.raises(SystemExit) as stop, reported():
        dm.prepare_data()
    assert stop.value.code == 1 and capsys.readouterr().err == (
        f"error: official LMDB file {valid / 'data.mdb'} is damaged (MDB_INVALID: File is not an LMDB file): "
        f"{OFFICIAL_FIX}\n"
    )


# ----------------------------------------------------------------------------- full disk during a build


def _lmdb_error(kind: type, code: int, what: str) -> lmdb.Error:
    """The error lmdb's C code raises: ``code`` and ``reason`` set (``str``: '<what>: <reason>')."""
    err = kind(f"{what}: {os.strerror(code)}")
    err.code, err.reason, err.what = code, os.strerror(code), what
    return err


class _FailingEnv:
    """A writing environment whose ``where`` (put, commit or sync) raises ``error`` from the
    ``after``-th call on, as on a disk that has just filled up."""

    def __init__(self, env, where: str, error: BaseException, after: int = 1):
        self.env, self.where, self.error, self.calls, self.after = env, where, error, 0, after

    def _maybe_fail(self, where: str) -> None:
        if where == self.where:
            self.calls += 1
            if self.calls >= self.after:
                raise self.error

    def begin(self, write=False):
        txn, outer = self.env.begin(write=write), self

        class Txn:
            def put(self, key, value):
                outer._maybe_fail("put")
                return txn.put(key, value)

            def commit(self):
                outer._maybe_fail("commit")
                return txn.commit()

            def abort(self):
                return txn.abort()

        return Txn()

    def sync(self, force=False):
        self._maybe_fail("sync")
        return self.env.sync(force)

    def close(self):
        self.env.close()


@pytest.mark.parametrize(
    "where, after, error, why",
    [
        ("commit", 2, _lmdb_error(lmdb.Error, errno.EIO, "mdb_txn_commit"), "Input/output error, which LMDB reports"),
        ("put", 700, _lmdb_error(lmdb.DiskError, errno.ENOSPC, "mdb_put"), "No space left on device"),
        ("sync", 1, OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)), os.strerror(errno.EDQUOT)),
    ],
    ids=["EIO-at-commit", "ENOSPC-at-put", "EDQUOT-at-sync"],
)
def test_a_full_disk_during_a_build_is_one_line_and_leaves_nothing(
    tmp_path, monkeypatch, capsys, where, after, error, why
):
    real_open = lmdb_fill.open_for_writing
    monkeypatch.setattr(lmdb_fill, "open_for_writing", lambda *a: _FailingEnv(real_open(*a), where, error, after))
    data = tmp_path / "data"
    path = data / "store"
    with pytest.raises(SystemExit) as stop, reported():
        ensure_lmdb(path, _meta(1200, 8), lambda: (encode_stack(s) for s in _images(1200, 8)))
    err = capsys.readouterr().err
    assert stop.value.code == 1 and err.count("\n") == 1, err
    assert err.startswith(f"error: no space left on {data} while building {path} ({why}")
    written = {"commit": 512, "put": 512, "sync": 1200}[where]  # the records committed before the failure
    assert f"; {written} of 1200 records written, " in err and " MiB were free when the build began" in err
    assert err.endswith(f"): {SPACE_FIX}\n")
    assert os.listdir(data) == []  # the half-built store is gone, nothing looks complete
    monkeypatch.undo()  # space freed: the build goes through
    assert ensure_lmdb(path, _meta(1200, 8), lambda: (encode_stack(s) for s in _images(1200, 8)))
    assert is_complete(path) and os.listdir(data) == ["store"]


def test_other_write_errors_and_the_records_own_errors_pass_unchanged(tmp_path, monkeypatch):
    real_open = lmdb_fill.open_for_writing
    full_map = _lmdb_error(lmdb.MapFullError, 0, "mdb_put")
    monkeypatch.setattr(lmdb_fill, "open_for_writing", lambda *a: _FailingEnv(real_open(*a), "put", full_map))
    with pytest.raises(lmdb.MapFullError):  # the map size, not the disk: not reported as a full disk
        write_lmdb(tmp_path / "a", (encode_stack(s) for s in _images(3, 8)), _meta(3, 8))
    monkeypatch.undo()

    def records():  # e.g. a source image on a full /tmp: its error, not the LMDB's disk
        yield encode_stack(_images(1, 8)[0])
        raise OSError(errno.ENOSPC, "No space left on device", "/somewhere/else")

    with pytest.raises(OSError) as info:
        write_lmdb(tmp_path / "b", records(), _meta(3, 8))
    assert not isinstance(info.value, LMDBNoSpaceError) and info.value.filename == "/somewhere/else"
    assert os.listdir(tmp_path) == []


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs (needs root / CAP_SYS_ADMIN: skipped where mounting is not permitted)."""
    mount = tmp_path / f"tiny-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode(errors='replace').strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_real_full_disk_during_a_build(tiny_disk, capsys):
    path = tiny_disk / "store"
    with pytest.raises(LMDBNoSpaceError) as err:  # ~2.5 MiB of incompressible PNGs on a 1 MiB disk
        write_lmdb(path, (encode_stack(s) for s in _images(40, 256)), _meta(40, 256))
    message = one_line(err.value)
    assert message.startswith(f"no space left on {tiny_disk} while building {path} (") and message.endswith(SPACE_FIX)
    assert err.value.errno in (errno.ENOSPC, errno.EIO, errno.EDQUOT)
    assert os.listdir(tiny_disk) == []  # the temp dir is removed: the space is free again
    assert write_lmdb(path, (encode_stack(s) for s in _images(4, 64)), _meta(4, 64)) == path  # and usable
    assert np.array_equal(LMDBReader(path).get_many(range(4)), _images(4, 64))
    close_env(str(resolve(path)))
