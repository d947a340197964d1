"""PNG-in-LMDB image store shared by FusionCelebA and FusionT-LESS (docs/design.md §2).

Record format
    key ``b"%08d" % i`` (i = 0 .. count-1) -> one PNG holding a stack of ``n`` uint8 images of
    ``H x W x C`` (C = 1 grey, 3 RGB, 4 RGBA) tiled vertically, i.e. an ``(n * H) x W`` image.
    ``shape`` in the metadata is ``[n, H, W, C]`` and is the same for every record.
    key ``b"__meta__"`` -> UTF-8 JSON: ``kind``, ``version`` (generator version), ``count``,
    ``shape``, ``channels``, ``seed`` and generator ``params``; readers compare it with what the
    config expects and name the first differing field.

Atomicity: ``write_lmdb`` fills a hidden temp dir next to the target (``.<name>.tmp-<pid>-<hex>``),
writes the metadata record last, syncs, then ``os.rename``s it into place. A reader only opens the
target path and requires the metadata record, so a left-over temp dir (a killed run) is never
taken for a valid LMDB; it can be deleted. A build that fails (also on a full disk:
``LMDBNoSpaceError``) removes its temp dir. A damaged ``data.mdb`` is ``LMDBDamagedError`` (also
from ``is_complete``, so a build never takes it for a missing LMDB); see ``datamodules.lmdb_errors``.

Reading: ``LMDBReader`` opens its environment lazily, once per process (``readonly``,
``lock=False``, ``readahead=False``, ``meminit=False``; ``datamodules.lmdb_env``), so readers
pickle without it and work with ``spawn`` workers and DDP. The PNG tiles: ``datamodules.images``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import torch

from datamodules.batched import BatchedDataset
from datamodules.errors import DataError
from datamodules.images import decode_stack, to_tensor
from datamodules.lmdb_env import close_env, open_env, resolve
from datamodules.lmdb_errors import (  # noqa: F401  (LMDBNoSpaceError: re-exported)
    LMDBDamagedError,
    LMDBExistsError,
    LMDBMetadataError,
    LMDBNoSpaceError,
    LMDBRecordError,
    damage_checked,
    damaged,
    free_space,
    space_checked,
)
from datamodules.lmdb_fill import META_KEY, Source, fill, record_key
from datamodules.tempfiles import owner_tag, remove_stale

TEMP_MARK = ".tmp-"  # in the names of unfinished LMDB dirs: .<name>.tmp-<pid>-<host>-<hex>

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- metadata


def _normalise(value: Any) -> Any:
    return json.loads(json.dumps(value))  # tuples -> lists, as stored


def _differences(stored: dict[str, Any], expected: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, want in expected.items():
        have = stored.get(key, "<missing>")
        if isinstance(want, dict) and isinstance(have, dict):
            out += _differences(have, want, f"{prefix}{key}.")
        elif have != want:
            out.append(f"{prefix}{key}: stored {have!r}, config expects {want!r}")
    return out


def check_meta(stored: dict[str, Any], expected: dict[str, Any], path: str | Path, hint: str = "") -> None:
    """Raise ``LMDBMetadataError`` naming every field of ``expected`` that ``stored`` does not match."""
    diffs = _differences(stored, _normalise(expected))
    if diffs:
        fix = hint or f"delete {path} and generate it again"
        raise LMDBMetadataError(
            f"LMDB {path} was generated with different settings ({'; '.join(diffs)}). "
            f"It is not regenerated automatically: {fix}, or point the config at another LMDB directory"
        )


# ----------------------------------------------------------------------------- reading


def read_meta(path: str | Path, hint: str = "") -> dict[str, Any]:
    """Metadata of the complete LMDB at ``path``; FileNotFoundError if absent, DataError (a ValueError)
    if unfinished, LMDBDamagedError if its file is damaged."""
    path = resolve(path)
    if TEMP_MARK in path.name:
        raise DataError(f"{path} is an unfinished LMDB left by an interrupted run, not a dataset: delete it")
    if not (path / "data.mdb").is_file():
        extra = f"; {hint}" if hint else ""
        leftovers = sorted(p.name for p in path.parent.glob(f".{path.name}{TEMP_MARK}*"))
        if leftovers:
            extra += f" (unfinished {', '.join(leftovers)} in {path.parent} from an interrupted run can be deleted)"
        raise FileNotFoundError(f"LMDB not found: {path}{extra}")
    with damage_checked(path), open_env(str(path)).begin() as txn:
        raw = txn.get(META_KEY)
        raw = None if raw is None else bytes(raw)
    if raw is None:
        raise DataError(f"LMDB {path} has no metadata record (unfinished write?): delete it and generate it again")
    try:
        meta = json.loads(raw.decode("utf-8"))
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        meta = None
    if not isinstance(meta, dict) or not all(k in meta for k in REQUIRED_META):
        raise damaged(path, "its metadata record is not the JSON the writer stored")
    return meta


def is_complete(path: str | Path) -> bool:
    """Whether ``path`` holds a finished LMDB (data plus metadata record); ``LMDBDamagedError`` if
    its file is damaged (it is neither complete nor missing: a build must not take it for missing)."""
    try:
        read_meta(path)
    except (OSError, ValueError, lmdb.Error):
        return False
    return True


class LMDBReader:
    """Random access to the records of one LMDB written by ``write_lmdb``.

    The metadata is checked against ``expected`` on construction. The object holds no environment
    (a per-process cache does), so it pickles cheaply and works in any worker process.
    """

    def __init__(self, path: str | Path, expected: dict[str, Any] | None = None, hint: str = ""):
        self.path = resolve(path)
        self.hint = hint
        self.meta = read_meta(self.path, hint)
        if expected:
            check_meta(self.meta, expected, self.path, hint)
        self.shape: tuple[int, int, int, int] = tuple(self.meta["shape"])
        self.count = int(self.meta["count"])

    def __len__(self) -> int:
        return self.count

    def get(self, index: int) -> np.ndarray:
        """uint8 ``[n, H, W, C]`` of record ``index``."""
        return self.get_many([index])[0]

    def get_many(self, indices: Iterable[int]) -> np.ndarray:
        """uint8 ``[B, n, H, W, C]`` of the given records, read in one transaction."""
        indices = [int(i) for i in indices]
        out = np.empty((len(indices), *self.shape), dtype=np.uint8)
        with damage_checked(self.path), open_env(str(self.path)).begin(buffers=True) as txn:
            for row, index in enumerate(indices):
                if not 0 <= index < self.count:
                    raise IndexError(f"LMDB {self.path}: index {index} out of range [0, {self.count})")
                key = record_key(index)
                data = txn.get(key)
                if data is None:
                    raise LMDBDamagedError(
                        f"LMDB {self.path}: record {key.decode()} is missing ({self.count} expected); "
                        f"the LMDB is damaged: delete it and generate it again"
                    )
                try:
                    out[row] = decode_stack(data, self.shape)
                except Exception as exc:  # PIL raises several types for junk bytes
                    raise LMDBDamagedError(
                        f"LMDB {self.path}: record {key.decode()} is not a valid {list(self.shape)} PNG stack "
                        f"({exc}); the LMDB is damaged: delete it and generate it again"
                    ) from exc
        return out

    def close(self) -> None:
        """Close this process's environment (it is reopened on the next read)."""
        close_env(str(self.path))

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)  # nothing process-bound: the environment lives in _ENVS


class StoredStacks(BatchedDataset):
    """Stored stacks as float ``[n, C, H, W]`` in [0, 1]; RGB converted to grey if ``channels`` is 1."""

    def __init__(self, reader: LMDBReader, channels: int | None = None):
        self.reader = reader
        self.channels = channels

    def __len__(self) -> int:
        return len(self.reader)

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        return list(to_tensor(self.reader.get_many(indices), self.channels).unbind(0))


# ----------------------------------------------------------------------------- writing

REQUIRED_META = ("kind", "version", "count", "shape", "channels", "seed", "params")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_lmdb(path: str | Path, records: Iterable[bytes], meta: dict[str, Any]) -> Path:
    """Write ``records`` (PNG bytes, ``meta["count"]`` of them) and ``meta`` atomically to ``path``.

    Raises FileExistsError if ``path`` already holds data, ``LMDBNoSpaceError`` if the disk fills
    up (the temp dir is removed). If another process finishes the same LMDB first, its complete
    copy is kept and ours discarded.
    """
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"LMDB metadata lacks {missing}")
    path = resolve(path)
    if (path / "data.mdb").exists():
        raise LMDBExistsError(f"{path} already holds an LMDB; delete it to regenerate it")
    progress = {"count": int(meta["count"]), "written": 0, "free": free_space(path.parent)}
    with space_checked(path, progress):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}{TEMP_MARK}{owner_tag()}"
        tmp.mkdir()
        try:
            fill(tmp, Source(records, progress), meta, path, progress)
            try:
                os.rename(tmp, path)
            except OSError as exc:
                if not is_complete(path):
                    raise LMDBExistsError(
                        f"cannot move the new LMDB to {path}: it exists and is not an LMDB "
                        f"({exc.strerror}); remove it or choose another directory"
                    ) from exc
                shutil.rmtree(tmp, ignore_errors=True)  # another process finished it first
            _fsync_dir(path.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return path


def ensure_lmdb(
    path: str | Path,
    expected: dict[str, Any],
    records: Callable[[], Iterable[bytes]],
    hint: str = "",
    extra: dict[str, Any] | None = None,
) -> bool:
    """Generate the LMDB at ``path`` unless a complete one exists; return whether it was generated.

    An existing LMDB must match ``expected`` (else LMDBMetadataError naming the field and ``hint``);
    a new one gets ``expected`` plus ``extra`` (informational, not checked) as metadata.
    """
    remove_stale_temps(resolve(path).parent)
    if is_complete(path):
        check_meta(read_meta(path), expected, resolve(path), hint)
        return False
    write_lmdb(path, records(), {**(extra or {}), **_normalise(expected)})
    return True


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Delete unfinished LMDB dirs in ``directory`` left by killed writers on this host (their
    pid is gone); writers still running, here or on other hosts, are left alone."""
    removed = remove_stale(directory, TEMP_MARK)
    for path in removed:
        log.warning("removed %s: an unfinished LMDB of an interrupted run", path)
    return removed
