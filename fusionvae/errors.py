"""Errors a user can fix, reported by the entry points as one line (no traceback).

The entry points (``fusionvae.jobs.reporting.reported``) print ``error: <message>`` for these; set
``HYDRA_FULL_ERROR=1`` to see the traceback instead. The subclasses also derive from the
built-in type a caller would expect (FileNotFoundError, ValueError, ...). This module is the
base of the package: it imports nothing of it, nor of ``datamodules``.
"""

from __future__ import annotations

import errno
import os
import signal


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
    """Another training job holds the run folder's lock (``fusionvae.training.run_lock``)."""


# the OS errors of writing files that the user fixes, not the code, and how
_WRITE_FIXES = {
    errno.ENOSPC: "free space there",
    errno.EDQUOT: "free space (disk quota) there",
    errno.EROFS: "",
    errno.EACCES: "make it writable",
    errno.ENOTDIR: "a file stands where a folder belongs",
}


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
