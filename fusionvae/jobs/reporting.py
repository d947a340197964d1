"""How an entry point ends on an error: one ``error: <message>`` line on stderr (the traceback with
``HYDRA_FULL_ERROR=1``) and the error's exit code for what a user can fix, Hydra's traceback for a
bug; and a refused start leaves no empty run folder. The one place that knows the data package's
error types besides the package itself."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path

from fusionvae.errors import FusionVAEError, Preempted, WriteError

# OS errors that only a write gives (a denied read or a file in a path's way can also be the data's)
_ONLY_WRITES_FAIL_SO = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


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
        _to_log_files(f"{prefix}: {one_line(fixable)}")
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"{prefix}: {one_line(fixable)}", file=sys.stderr, flush=True)
        sys.exit(getattr(fixable, "exit_code", 1))


def user_error(err: BaseException) -> BaseException | None:
    """The error a user can fix behind ``err``, or None for a bug: ``err`` itself (a
    ``FusionVAEError``, a missing file, a stale or damaged LMDB, an unusable image folder), the
    cause Hydra wrapped in an ``InstantiationException`` (a constructor's ``ValueError`` included),
    or a ``WriteError`` for a full disk or read-only folder found anywhere in the chain
    (``torch.save`` turns ENOSPC into a RuntimeError)."""
    from hydra.errors import InstantiationException

    if isinstance(err, (FusionVAEError, FileNotFoundError, *_data_errors())):
        return err
    if isinstance(err, InstantiationException) and err.__cause__ is not None:
        # a constructor's ValueError is its check of a config value (the datamodules' own checks)
        cause = err.__cause__
        return cause if isinstance(cause, ValueError) else user_error(cause)
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _ONLY_WRITES_FAIL_SO:
            return WriteError(seen)
        seen = seen.__cause__ or seen.__context__
    return None


def one_line(err: BaseException) -> str:
    """The message of ``err``; for an error raised in a DataLoader worker (torch re-raises it with
    "Caught X in DataLoader worker process N" and the worker's traceback), the original message,
    the traceback's last line after the exception name."""
    text = str(err)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text


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


@contextmanager
def unused_run_folder_removed():
    """On a refused start (an error the user fixes, ``user_error``), delete the Hydra job's
    output folder if it holds only what Hydra wrote before the job (``.hydra/`` and the job's log):
    an early failure leaves no empty run folder."""
    try:
        yield
    except Exception as err:
        if user_error(err) is None:
            raise
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
        folder, job_log = Path(hydra_cfg.runtime.output_dir), f"{hydra_cfg.job.name}.log"
        if folder.is_dir() and {p.name for p in folder.iterdir()} <= {".hydra", job_log}:
            shutil.rmtree(folder, ignore_errors=True)
        raise
