"""Read-only LMDB environments, one per process and path.

py-lmdb refuses to open one environment twice in a process, and an environment inherited through
``fork`` (DataLoader workers) is unusable in the child: environments are cached per process, and
reopened in a forked child or when the LMDB was replaced on disk (regenerated). Objects that read
LMDBs keep only paths, so they pickle into ``spawn`` workers and DDP processes.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import lmdb

_ENVS: dict[str, tuple[int, tuple[int, int], lmdb.Environment]] = {}  # realpath -> (pid, file id, env)
_ENVS_LOCK = threading.Lock()


def _reset_after_fork() -> None:
    global _ENVS_LOCK
    _ENVS_LOCK = threading.Lock()  # another thread may have held it at fork time


os.register_at_fork(after_in_child=_reset_after_fork)


def open_env(path: str) -> lmdb.Environment:
    """This process's read-only environment for ``path``: opened once per process, reopened in a
    forked child (the inherited one is unusable there and py-lmdb refuses a second open) and when
    the LMDB was replaced on disk (regenerated)."""
    stat = os.stat(os.path.join(path, "data.mdb"))
    file_id, pid = (stat.st_dev, stat.st_ino), os.getpid()
    with _ENVS_LOCK:
        entry = _ENVS.pop(path, None)
        if entry is not None:
            if entry[:2] == (pid, file_id):
                _ENVS[path] = entry
                return entry[2]
            entry[2].close()
        env = lmdb.open(path, readonly=True, lock=False, readahead=False, meminit=False, subdir=True)
        _ENVS[path] = (pid, file_id, env)
        return env


def close_env(path: str) -> None:
    with _ENVS_LOCK:
        entry = _ENVS.pop(path, None)
    if entry is not None:
        entry[2].close()


def resolve(path: str | Path) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))
