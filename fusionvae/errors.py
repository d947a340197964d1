"""Errors a user can fix, reported by the entry points as one line (no traceback).

``train.py`` / ``fusionvae-train``, ``evaluate.py`` / ``fusionvae-evaluate`` and ``python -m
fusionvae.fuse`` catch ``FusionVAEError`` and print ``error: <message>``; set
``HYDRA_FULL_ERROR=1`` to see the traceback instead. The subclasses also derive from the
built-in type a caller would expect (FileNotFoundError, ValueError, ...).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import traceback
from contextlib import contextmanager


class FusionVAEError(Exception):
    """A problem the user can fix; ``exit_code`` is the process exit status at the entry points."""

    exit_code = 1


class CheckpointNotFoundError(FusionVAEError, FileNotFoundError):
    """The checkpoint file does not exist."""


class CheckpointError(FusionVAEError, ValueError):
    """The checkpoint is damaged, not a FusionVAE checkpoint, or does not match the config."""


class BadInputError(FusionVAEError, ValueError):
    """An input (image file, tensor, config value) is not what the command needs."""


class TooManySkippedSteps(FusionVAEError, FloatingPointError):
    """Too many consecutive training steps had a non-finite loss or gradients."""


class Preempted(FusionVAEError):
    """SIGTERM / SIGUSR1 / SIGINT arrived: the checkpoint was saved (``path``) and the run stops with
    128 + signal; ``step`` None: it came outside training, where there is nothing to save."""

    def __init__(self, signum: int, step: int | None, path: str | None):
        self.signum, self.step, self.path = int(signum), step, path
        self.exit_code = 128 + int(signum)
        self.prefix = "interrupted" if self.signum == signal.SIGINT else "preempted"  # Ctrl-C is the user's
        if path:
            saved = f"checkpoint saved to {path} (resume with ckpt_path={path} or ckpt_path=last)"
        elif step is not None:
            saved = "no checkpoint written at this step (resume from the run's last.ckpt)"
        else:
            saved = "nothing to save there (resume from the run's last.ckpt, if it has one)"
        where = f"at step {step}" if step is not None else "before or after the training loop"
        super().__init__(f"stopped by signal {self.signum} {where}; {saved}")


class RunFolderInUseError(FusionVAEError, FileExistsError):
    """Another training job holds the run folder's lock (``fusionvae.run_lock``)."""


@contextmanager
def reported(prefix: str = "error"):
    """Turn an error the user can fix (``user_error``) into one line on stderr and
    ``sys.exit(exit_code)``.

    With ``HYDRA_FULL_ERROR=1`` errors propagate with their traceback; a preemption always
    exits with its code (it is not a failure of the code)."""
    try:
        yield
    except Preempted as stop:
        print(f"{stop.prefix}: {stop}", file=sys.stderr, flush=True)
        _to_log_files(f"{stop.prefix}: {stop}")
        sys.exit(stop.exit_code)
    except Exception as err:
        fixable = user_error(err)
        if fixable is None:  # a bug: Hydra prints the traceback; keep it in the run's log file too
            _to_log_files(f"{prefix}: unexpected failure\n{traceback.format_exc()}")
            raise
        _to_log_files(f"{prefix}: {fixable}")
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"{prefix}: {fixable}", file=sys.stderr, flush=True)
        sys.exit(getattr(fixable, "exit_code", 1))


# the OS errors of writing files that the user fixes, not the code, and how
_WRITE_FIXES = {
    errno.ENOSPC: "free space there",
    errno.EDQUOT: "free space (disk quota) there",
    errno.EROFS: "",
    errno.EACCES: "make it writable",
    errno.ENOTDIR: "a file stands where a folder belongs",
}


def user_error(err: BaseException) -> BaseException | None:
    """The error a user can fix behind ``err``, or None for a bug: ``err`` itself (a
    ``FusionVAEError``, a missing file, a stale or damaged LMDB, an unusable image folder), the
    cause Hydra wrapped in an ``InstantiationException`` (a constructor's ``ValueError`` included),
    or a ``WriteError`` for a full disk or
    read-only folder found anywhere in the chain (``torch.save`` turns ENOSPC into a RuntimeError)."""
    from hydra.errors import InstantiationException

    if isinstance(err, (FusionVAEError, FileNotFoundError, *_data_errors())):
        return err
    if isinstance(err, InstantiationException) and err.__cause__ is not None:
        # a constructor's ValueError is its check of a config value (the datamodules' own checks)
        cause = err.__cause__
        return cause if isinstance(cause, ValueError) else user_error(cause)
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _WRITE_FIXES:
            return WriteError(seen)
        seen = seen.__cause__ or seen.__context__
    return None


class WriteError(FusionVAEError, OSError):
    """A run cannot write its files: full disk, read-only folder, a file where a folder belongs."""

    def __init__(self, err: OSError, where=None):
        where = err.filename or where
        reason = os.strerror(err.errno) if err.errno else str(err)
        fix = _WRITE_FIXES.get(err.errno, "check that folder")
        super().__init__(
            f"{f'cannot write {where}' if where else 'a file write failed'}: {reason}; "
            f"{fix + ', or ' if fix else ''}point paths.log_dir "
            f"(FUSIONVAE_LOG_DIR) at another disk (a started run resumes with ckpt_path=last)"
        )


def _to_log_files(message: str) -> None:
    """Write ``message`` to the file handlers of the root logger (the run's train.log / evaluate.log),
    not to the console, which gets the one clean line."""
    record = logging.LogRecord("fusionvae", logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _data_errors() -> tuple[type[Exception], ...]:
    """Data problems the user fixes (missing files are FileNotFoundError; stale or damaged LMDBs;
    unusable image folders)."""
    from datamodules.errors import DataError
    from datamodules.lmdb_store import LMDBMetadataError, LMDBRecordError

    return LMDBMetadataError, LMDBRecordError, DataError
