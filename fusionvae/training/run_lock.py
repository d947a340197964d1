"""One training job per run folder: ``<run>/run.lock`` names the process that writes it.

Two jobs writing one folder (two resumes of one run, a manual resume while a requeued SLURM job
runs) would overwrite each other's ``last.ckpt`` and best checkpoint. The training job takes the
lock before the trainer starts, on global rank zero (the other DDP ranks write nothing of their
own), and removes it when it ends, also after an error or a signal. A second job is refused in one
line. A lock whose writer has surely ended is taken over: on this host, a pid that is gone or now
belongs to a later process; on any host, an earlier run of the same requeued SLURM job (it keeps
its job id; ``SLURM_RESTART_COUNT`` grows). A writer on another host cannot be checked from here:
the error says how to remove its lock if that job is really gone.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager, suppress
from pathlib import Path

from datamodules.tempfiles import HOST, owner_tag, pid_alive
from fusionvae.errors import RunFolderInUseError

LOCK_NAME = "run.lock"
log = logging.getLogger("fusionvae")
_held: set[Path] = set()  # locks this process holds (a lock naming our pid but not here is a former process's)


def _identity(pid: int) -> str | None:
    """``<boot id>:<start time>`` of process ``pid`` here (Linux /proc), to tell it from a later
    process given the same pid; None where it cannot be read."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[19]}"
    except (OSError, IndexError):
        return None


def _slurm() -> tuple[str | None, str | None, int]:
    env = os.environ
    return env.get("SLURM_JOB_ID"), env.get("SLURM_STEP_ID"), int(env.get("SLURM_RESTART_COUNT") or 0)


def _this_process() -> dict:
    job, step, restart = _slurm()
    return {
        "pid": os.getpid(),
        "host": HOST,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "process": _identity(os.getpid()),
        "slurm_job": job,
        "slurm_step": step,
        "slurm_restart": restart,
    }


def _read(path: Path) -> dict | None:
    """The lock's holder; None if there is no lock; ``{}`` if it cannot be read as one."""
    try:
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else {}


def _gone(holder: dict, path: Path) -> bool:
    """Whether the lock's writer has surely ended."""
    job, _, restart = _slurm()
    if job and holder.get("slurm_job") == job and int(holder.get("slurm_restart") or 0) < restart:
        return True  # SLURM ends a job's run before it starts it again
    if holder.get("host") != HOST:
        return False  # cannot be checked from here
    pid = holder["pid"]
    if pid == os.getpid():
        return path not in _held  # e.g. a container's process that had our pid before
    if not pid_alive(pid):
        return True
    recorded, now = holder.get("process"), _identity(pid)
    return bool(recorded and now and recorded != now)  # the pid now belongs to another process


def _refusal(path: Path, holder: dict) -> str:
    folder = path.parent
    if not holder:
        return (
            f"run folder {folder} has a lock file that is not one of ours ({path}): if no training job "
            f"writes to this folder, delete it and start again"
        )
    who = f"{holder['pid']}@{holder.get('host')} (started {holder.get('started', '?')})"
    if holder.get("host") == HOST:
        return (
            f"run folder {folder} is in use by training process {who}: two jobs in one folder overwrite "
            f"each other's checkpoints; wait for it to end or stop it (kill -TERM {holder['pid']} saves "
            f"and exits), then resume"
        )
    return (
        f"run folder {folder} is in use by training process {who}, which cannot be checked from {HOST}: "
        f"if that job is really gone, delete {path} and start again; else wait for it to end or stop it"
    )


def _remove_stale(path: Path, holder: dict) -> None:
    """Remove the lock of ``holder``, and only that one: another job may take it over meanwhile."""
    grave = path.with_name(f".{path.name}.stale-{owner_tag()}")
    with suppress(FileNotFoundError):
        os.rename(path, grave)  # atomic: of two jobs taking over, one moves it
        if _read(grave) != holder:  # we moved the fresh lock of a job that took it over first: give it back
            with suppress(FileExistsError):
                os.link(grave, path)
        grave.unlink()
        log.warning("took over %s from %s@%s, which has ended", path, holder.get("pid"), holder.get("host"))


def _create(content: Path, path: Path) -> None:
    """``path`` with the bytes of ``content``; FileExistsError if it exists."""
    try:
        os.link(content, path)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: exclusive create, then write
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(content.read_text())


def acquire(folder: str | Path, attempts: int = 5) -> Path:
    """Create ``<folder>/run.lock`` for this process (its content complete the moment it appears:
    written beside it, then hard-linked, which fails if the lock exists); raise
    ``RunFolderInUseError`` if another job holds it."""
    path = Path(folder).absolute() / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    mine = path.with_name(f".{path.name}.tmp-{owner_tag()}")
    mine.write_text(json.dumps(_this_process()) + "\n")
    try:
        for _ in range(attempts):
            try:
                _create(mine, path)
                _held.add(path)
                return path
            except FileExistsError:
                holder = _read(path)
                if holder is not None and not (holder and _gone(holder, path)):
                    raise RunFolderInUseError(_refusal(path, holder)) from None
                if holder:
                    _remove_stale(path, holder)
        raise RunFolderInUseError(f"run folder {path.parent}: another job is taking its lock {path} right now")
    finally:
        mine.unlink(missing_ok=True)


def release(path: Path) -> None:
    """Remove the lock if it is still this process's."""
    _held.discard(path)
    holder = _read(path)
    if holder and holder["pid"] == os.getpid() and holder.get("host") == HOST:
        path.unlink(missing_ok=True)


def check_as_worker(folder: str | Path) -> None:
    """A DDP rank other than zero takes no lock. Started by SLURM like rank zero (srun), it refuses
    when rank zero does, so it does not wait for a rank zero that has left; the ranks Lightning
    starts itself, and those of other launchers, cannot tell rank zero's lock and never refuse."""
    job, step, restart = _slurm()
    path = Path(folder).absolute() / LOCK_NAME
    holder = _read(path)
    if not job or holder is None:
        return
    sibling = (holder.get("slurm_job"), holder.get("slurm_step"), holder.get("slurm_restart")) == (job, step, restart)
    if not sibling and not (holder and _gone(holder, path)):
        raise RunFolderInUseError(_refusal(path, holder))


@contextmanager
def run_lock(folder: str | Path, rank_zero: bool = True):
    """Hold ``<folder>/run.lock`` for the block (rank zero); other ranks only check (``check_as_worker``)."""
    if not rank_zero:
        check_as_worker(folder)
        yield None
        return
    path = acquire(folder)
    try:
        yield path
    finally:
        release(path)
