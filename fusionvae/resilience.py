"""Preemption-safe training: periodic ``last.ckpt`` and a clean stop on SIGTERM / SIGUSR1.

``RunGuard`` (configured in conf/callbacks/default.yaml as ``run_guard``):

- writes ``<dirpath>/last.ckpt`` at the end of a training batch once ``every_minutes`` of wall
  clock have passed since the last write (default 30) and/or every ``every_n_steps`` optimiser
  steps; ModelCheckpoint still writes it (and the best one) after each validation;
- on SIGTERM or SIGUSR1 only sets a flag (no work inside the handler); at the end of the current
  training batch it writes ``last.ckpt`` at that step, mid-epoch, and raises ``Preempted``:
  the entry point exits with 128 + the signal number (143 for SIGTERM, 138 for SIGUSR1). Under
  Lightning's SLURM auto-requeue, SIGUSR1 stays with Lightning (HPC checkpoint + requeue);
- deletes temporary checkpoint files left by killed runs in ``dirpath`` when fitting starts.

Under DDP the decision to save or stop is all-reduced, so every rank saves and stops together.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from .checkpoint_io import remove_stale_temps
from .errors import Preempted

_requested: list[int] = []  # signals received; appended by the handler, read at batch ends


def stop_requested() -> int | None:
    """The signal that asked this process to stop, if any."""
    return _requested[0] if _requested else None


def _on_signal(signum, frame) -> None:
    _requested.append(signum)


class RunGuard(L.Callback):
    """Periodic ``last.ckpt``, SIGTERM / SIGUSR1 -> checkpoint + ``Preempted``, stale-temp cleanup."""

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str = "last",
        every_minutes: float | None = 30.0,
        every_n_steps: int | None = None,
        signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1"),
    ):
        if every_minutes is not None and every_minutes <= 0:
            raise ValueError(f"callbacks.run_guard.every_minutes must be > 0 or null, got {every_minutes}")
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"callbacks.run_guard.every_n_steps must be >= 1 or null, got {every_n_steps}")
        self.dirpath, self.filename = dirpath, filename
        self.every_minutes, self.every_n_steps = every_minutes, every_n_steps
        self.signals = tuple(getattr(signal, name) for name in signals if hasattr(signal, name))
        self._previous: dict[int, object] = {}
        self._last_time, self._last_step = time.monotonic(), -1

    def path(self, trainer: L.Trainer) -> Path:
        if self.dirpath:
            folder = Path(self.dirpath)
        elif getattr(trainer.checkpoint_callback, "dirpath", None):
            folder = Path(trainer.checkpoint_callback.dirpath)
        else:
            folder = Path(trainer.default_root_dir) / "checkpoints"
        return folder / f"{self.filename}.ckpt"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.is_global_zero:
            remove_stale_temps(self.path(trainer).parent)

    # ---- signals ----------------------------------------------------------------------------
    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_time, self._last_step = time.monotonic(), trainer.global_step
        self._install()

    def _install(self) -> None:
        """Our flag-only handlers, after Lightning registered its own (they run from here on)."""
        if self._previous or threading.current_thread() is not threading.main_thread():
            return  # installed already, or not allowed (signal handlers live in the main thread)
        _requested.clear()
        for signum in self.signals:
            current = signal.getsignal(signum)
            if signum != signal.SIGTERM and current not in (None, signal.SIG_DFL, signal.SIG_IGN):
                continue  # e.g. Lightning's SLURM requeue handler on SIGUSR1: keep it
            # replaces Lightning's SIGTERM notifier, which would stop mid-validation without a checkpoint
            self._previous[signum] = current
            signal.signal(signum, _on_signal)

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()  # a failed run writes nothing: the last good checkpoint stays

    # ---- saving -----------------------------------------------------------------------------
    def _due(self, trainer: L.Trainer) -> bool:
        step = trainer.global_step
        if step == self._last_step:
            return False  # nothing new (e.g. skipped steps)
        if self.every_n_steps and step % self.every_n_steps == 0:
            return True
        return bool(self.every_minutes) and time.monotonic() - self._last_time >= 60 * self.every_minutes

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        signum = stop_requested() or (signal.SIGTERM if trainer.received_sigterm else None)
        flags = torch.tensor([signum is not None, self._due(trainer)], dtype=torch.float32)
        if trainer.world_size > 1:  # one decision for all ranks: saving is collective
            flags = trainer.strategy.reduce(flags.to(trainer.strategy.root_device), reduce_op="sum").cpu()
        stop, due = bool(flags[0] > 0), bool(flags[1] > 0)
        if not (stop or due):
            return
        path = self.path(trainer)
        for callback in trainer.checkpoint_callbacks:  # their `last` is this file: keep their state in step
            if (
                isinstance(callback, ModelCheckpoint)
                and callback.save_last
                and callback.dirpath
                and Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}" == path
            ):
                callback.last_model_path = str(path)  # before saving: it is part of the saved state
        trainer.save_checkpoint(path, weights_only=False)
        self._last_time, self._last_step = time.monotonic(), trainer.global_step
        if stop:
            raise Preempted(signum or signal.SIGTERM, trainer.global_step, str(path))
