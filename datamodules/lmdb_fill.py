"""Filling a new LMDB of ``datamodules.lmdb_store`` in its temp dir (``write_lmdb`` renames it into place)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

META_KEY = b"__meta__"
COMMIT_EVERY = 512  # records per write transaction


def record_key(index: int) -> bytes:
    return b"%08d" % index


def open_for_writing(path: Path, map_size: int):
    """A fresh private LMDB env: no lock file, syncs once at the end (the folder is renamed after)."""
    return lmdb.open(
        str(path),
        map_size=map_size,
        subdir=True,
        lock=False,
        sync=False,
        metasync=False,
        readahead=False,
        meminit=False,
    )


class Source:
    """The records, noting in ``progress`` whether an error came from them (not from the writing)."""

    def __init__(self, records: Iterable[bytes], progress: dict[str, Any]):
        self.records, self.progress = iter(records), progress

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        try:
            return next(self.records)
        except StopIteration:
            raise
        except BaseException:
            self.progress["source_failed"] = True
            raise


def fill(tmp: Path, records: Iterable[bytes], meta: dict[str, Any], path: Path, progress: dict[str, Any]) -> None:
    """Write the records and then the metadata record into a new LMDB in ``tmp``, and sync it."""
    count = progress["count"]
    per_record = int(np.prod(meta["shape"])) * 11 // 10 + 8192  # PNG worst case + page overhead
    env = open_for_writing(tmp, count * per_record + (64 << 20))
    try:
        written = 0
        txn = env.begin(write=True)
        try:
            for data in records:
                if written == count:
                    raise ValueError(f"more records than meta count {count} for {path}")
                txn.put(record_key(written), data)
                written += 1
                if written % COMMIT_EVERY == 0:
                    txn.commit()
                    progress["written"] = written
                    txn = env.begin(write=True)
            if written != count:
                raise ValueError(f"{written} records written to {path}, but meta count is {count}")
            txn.put(META_KEY, json.dumps(meta, sort_keys=True).encode("utf-8"))  # last: marks completion
            txn.commit()
            progress["written"] = written
        except BaseException:
            txn.abort()
            raise
        env.sync(True)
    finally:
        env.close()
