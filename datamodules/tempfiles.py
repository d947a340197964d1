"""Temporary files and folders named after their writer, so leftovers of killed runs can be found.

Atomic writers (LMDBs in ``datamodules.lmdb_store``, checkpoints in ``fusionvae.training.checkpoint_io``)
write to ``<hidden name><mark><pid>-<host>-<random>`` and rename when complete. A process killed
mid-write (SIGKILL, OOM, power loss) leaves that temporary behind; it is never read as data, and
``remove_stale`` deletes the ones whose writer is no longer alive.
"""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from pathlib import Path

HOST = socket.gethostname()


def owner_tag() -> str:
    """``<pid>-<host>-<random>`` for the name of a temporary file or folder of this process."""
    return f"{os.getpid()}-{HOST}-{uuid.uuid4().hex[:8]}"


def owner_of(tag: str) -> tuple[int, str | None] | None:
    """(pid, host) of a tag; host None for older names without one (``<pid>`` or ``<pid>-<hex>``)."""
    parts = tag.split("-")
    if not parts[0].isdigit():
        return None
    return int(parts[0]), "-".join(parts[1:-1]) or None


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (an unreaped zombie counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def is_stale(tag: str, other_hosts: bool) -> bool:
    """Whether the writer of ``tag`` is gone: a dead pid on this host; a writer on another host
    counts as gone only if ``other_hosts`` (a folder only this run writes to)."""
    owner = owner_of(tag)
    if owner is None:
        return False  # not named by us: leave it alone
    pid, host = owner
    if host is not None and host != HOST:
        return other_hosts
    return not pid_alive(pid)


def remove_stale(directory: str | Path, mark: str, other_hosts: bool = False) -> list[Path]:
    """Delete the temporaries ``.<name><mark><tag>`` in ``directory`` whose writer is gone;
    return what was deleted. A missing directory holds nothing."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for path in sorted(directory.glob(f".*{mark}*")):
        tag = path.name.split(mark, 1)[1].lstrip("-")
        if not is_stale(tag, other_hosts):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed
