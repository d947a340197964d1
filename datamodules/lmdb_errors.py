"""Errors of the LMDBs (ours, ``datamodules.lmdb_store``, and the official ones) that the user fixes,
and the mapping of lmdb's own exceptions onto them; ``fusionvae.jobs.reporting.reported`` prints each as one
line ``error: <message>``.

- ``LMDBDamagedError``: lmdb found a broken page, header or length field in ``data.mdb``
  (``damage_checked``; a damaged page comes back as MDB_CORRUPTED / MDB_PAGE_NOTFOUND, a damaged
  header as MDB_INVALID, MDB_VERSION_MISMATCH, ENOMEM or EINVAL on opening), or a record is not what
  was stored. The message names the file and the fix (build it again / copy it again). lmdb checks
  no checksums: random bytes it does not notice can also crash the process (SIGBUS, or an assertion
  while a cursor walks the keys, which is why the readers only look keys up) or yield junk that the
  PNG decoder refuses; py-lmdb >= 3 checks a file offline: ``python -m lmdb verify -e <folder>``.
- ``LMDBNoSpaceError``: a build ran out of disk space (``space_checked``). A write that LMDB cannot
  finish comes back as EIO ("Input/output error": a short write), ENOSPC (lmdb.DiskError) or EDQUOT;
  mkdir / fsync as OSError. ``lmdb.MapFullError`` is another matter (the map size, not the disk).
"""

from __future__ import annotations

import errno
import shutil
from contextlib import contextmanager
from pathlib import Path

import lmdb

from datamodules.errors import DataError


class LMDBMetadataError(ValueError):
    """The stored metadata differs from what the config expects."""


class LMDBRecordError(RuntimeError):
    """A record is missing or cannot be decoded."""


class LMDBDamagedError(LMDBRecordError):
    """The LMDB file is damaged: lmdb reports a broken page or header, or a record is not what was stored."""


class LMDBExistsError(DataError, FileExistsError):
    """The folder a new LMDB is to be written to is taken (by an LMDB or other files)."""


class LMDBNoSpaceError(DataError, OSError):
    """The disk filled up (or its quota) while an LMDB was built; the half-built LMDB is removed."""


# what lmdb raises for a damaged data.mdb (on opening it or on reading a key); plain lmdb.Error too
DAMAGE = (
    lmdb.CorruptedError,
    lmdb.PageNotFoundError,
    lmdb.InvalidError,
    lmdb.BadValsizeError,
    lmdb.VersionMismatchError,
    lmdb.PanicError,
    lmdb.BadTxnError,
    lmdb.MapResizedError,
    lmdb.InvalidParameterError,
    lmdb.MemoryError,
)
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EIO)  # EIO: lmdb's word for a short write to a full disk
OUR_FIX = "delete {path} and run again to build it anew (or copy an intact one there)"


def reason(exc: BaseException) -> str:
    """lmdb's reason without the path or call it prefixes (``MDB_CORRUPTED: Located page was wrong type``)."""
    text = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
    return f"{type(exc).__name__}: {text}" if isinstance(exc, lmdb.MemoryError) else text


def damaged(path: Path, why: str, fix: str = OUR_FIX, what: str = "LMDB") -> LMDBDamagedError:
    """The one-line error for the damaged LMDB folder ``path``; ``fix`` may name ``{path}``."""
    return LMDBDamagedError(f"{what} file {Path(path) / 'data.mdb'} is damaged ({why}): {fix.format(path=path)}")


@contextmanager
def damage_checked(path: Path, fix: str = OUR_FIX, what: str = "LMDB"):
    """Turn lmdb's errors for a damaged ``<path>/data.mdb`` into ``LMDBDamagedError`` (``damaged``)."""
    try:
        yield
    except lmdb.Error as exc:
        if not (isinstance(exc, DAMAGE) or type(exc) is lmdb.Error):
            raise
        raise damaged(path, reason(exc), fix, what) from exc


def _no_space_code(exc: BaseException) -> int | None:
    if isinstance(exc, lmdb.DiskError):
        return errno.ENOSPC
    code = exc.errno if isinstance(exc, OSError) else getattr(exc, "code", None)
    if code is None and exc.args and isinstance(exc.args[-1], int):  # lmdb.Error(what, code) made in Python
        code = exc.args[-1]
    return code if code in NO_SPACE else None


def free_space(folder: Path) -> int | None:
    """Bytes free for this user on ``folder``'s disk (its nearest existing parent), None if unknown."""
    for where in (folder, *folder.parents):
        if where.exists():
            try:
                return shutil.disk_usage(where).free
            except OSError:
                return None
    return None


@contextmanager
def space_checked(path: Path, progress: dict[str, int]):
    """Turn a full disk (or quota) while the LMDB ``path`` is built into ``LMDBNoSpaceError``;
    ``progress``: ``free`` bytes when the build began, records ``written`` of ``count``, and
    ``source_failed`` when the error came from the records' source, not from writing (passed on)."""
    try:
        yield
    except (lmdb.Error, OSError) as exc:
        code = _no_space_code(exc)
        if code is None or progress.get("source_failed") or isinstance(exc, DataError):
            raise
        why = reason(exc) + (", which LMDB reports for a full disk" if code == errno.EIO else "")
        done = f"; {progress.get('written', 0)} of {progress.get('count', '?')} records written"
        free = progress.get("free")
        began = f", {free / 2**20:.1f} MiB were free when the build began" if free is not None else ""
        error = LMDBNoSpaceError(
            f"no space left on {path.parent} while building {path} ({why}{done}{began}): free space or point "
            f"paths.data_dir / FUSIONVAE_DATA_DIR (or dataset.lmdb_dir) at a larger disk"
        )
        error.errno = code  # not strerror / filename: str() would then be "[Errno 28] ..."
        raise error from exc
