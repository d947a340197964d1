"""Preemption-safe training: periodic ``last.ckpt`` and a clean stop on SIGTERM / SIGUSR1 / SIGINT.

``RunGuard`` (configured in conf/callbacks/default.yaml as ``run_guard``):

- writes ``<dirpath>/last.ckpt`` at the end of a training batch once ``every_minutes`` of wall
  clock have passed since the last write (default 30) and/or every ``every_n_steps`` optimiser
  steps; ModelCheckpoint still writes it (and the best one) after each validation;
- on SIGTERM, SIGUSR1 or SIGINT (Ctrl-C) only sets a flag (no work inside the handler); at the end
  of the current training batch, or of the current validation batch, it writes ``last.ckpt`` at
  that step, mid-epoch, and raises ``Preempted``: the entry point exits with 128 + the signal
  number (143 for SIGTERM, 138 for SIGUSR1, 130 for SIGINT). A validation stopped this way is run
  again, whole, when the run resumes. A second Ctrl-C stops at once, without a checkpoint. Under
  Lightning's SLURM auto-requeue, SIGUSR1 stays with Lightning (HPC checkpoint + requeue);
- gives each validation its own random draws, from (seed, step, rank), and puts the training's
  random state back after it: a validation run again after a resume logs what the uninterrupted
  run logged, and ModelCheckpoint picks the same best checkpoint;
- deletes temporary checkpoint files left by killed runs in ``dirpath`` when fitting starts.

Under DDP the decision to save or stop is all-reduced, so every rank saves and stops together; in
training, one batch after a rank asked (``fusionvae.training.rank_flags.LaggedFlags``: the host
never waits for the GPU to finish a step).
``stop_outside_training`` covers the time before RunGuard's handlers and after them (data
preparation, the test loop): SIGTERM / SIGINT stop at once there, as ``Preempted`` without a
checkpoint, so the run's lock and logs are closed as after any other stop.
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from datamodules.training_order import mix
from fusionvae.errors import Preempted
from fusionvae.training.checkpoint_io import remove_stale_temps
from fusionvae.training.rank_flags import LaggedFlags, agree_now

_requested: list[int] = []  # signals received; appended by the handler, read at batch ends
_VALIDATION = 1  # in validation's seed, so it never equals a training batch's (lit_module: seed, batch, rank)


def stop_requested() -> int | None:
    """The signal that asked this process to stop, if any."""
    return _requested[0] if _requested else None


def _on_signal(signum, frame) -> None:
    if signum == signal.SIGINT and signal.SIGINT in _requested:
        raise KeyboardInterrupt  # Ctrl-C twice: the user wants out now, checkpoint or not
    _requested.append(signum)


def _stop_now(signum, frame) -> None:
    raise Preempted(signum, None, None)


@contextmanager
def stop_outside_training(signals=(signal.SIGTERM, signal.SIGINT)):
    """SIGTERM / SIGINT raise ``Preempted`` (no checkpoint) where RunGuard's handlers are not
    installed: there is no training state to save there (data is written atomically), and the
    exception runs every cleanup on its way out, the run's lock included (Lightning would turn
    Ctrl-C into exit 1; SIGTERM would end the process without any)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    ignored = signal.SIGINT if signal.getsignal(signal.SIGINT) == signal.SIG_IGN else None  # as in _install
    previous = {signum: signal.signal(signum, _stop_now) for signum in signals if signum != ignored}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


class RunGuard(L.Callback):
    """Periodic ``last.ckpt``, SIGTERM / SIGUSR1 / SIGINT -> checkpoint + ``Preempted``, stale-temp cleanup."""

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str = "last",
        every_minutes: float | None = 30.0,
        every_n_steps: int | None = None,
        signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1", "SIGINT"),
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
        self._val_start: dict | None = None  # the validation progress when the running validation began
        self._rng: tuple | None = None  # the random state validation put aside
        self._ranks: LaggedFlags | None = None  # under DDP (on_train_start)

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
        self._ranks = LaggedFlags(trainer.strategy.root_device, 2) if trainer.world_size > 1 else None
        self._install()

    def _install(self) -> None:
        """Our flag-only handlers, after Lightning registered its own (they run from here on)."""
        if self._previous or threading.current_thread() is not threading.main_thread():
            return  # installed already, or not allowed (signal handlers live in the main thread)
        _requested.clear()
        for signum in self.signals:
            current = signal.getsignal(signum)
            if signum == signal.SIGINT and current == signal.SIG_IGN:
                continue  # started to ignore Ctrl-C (e.g. `cmd &` in a script): keep it so
            ours = signum in (signal.SIGTERM, signal.SIGINT)
            if not ours and current not in (None, signal.SIG_DFL, signal.SIG_IGN):
                continue  # e.g. Lightning's SLURM requeue handler on SIGUSR1: keep it
            # replaces Lightning's SIGTERM notifier, which would stop mid-validation without a checkpoint,
            # and Python's KeyboardInterrupt, which Lightning turns into exit 1 without one
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
        self._restore_rng()

    # ---- saving -----------------------------------------------------------------------------
    def _due(self, trainer: L.Trainer) -> bool:
        step = trainer.global_step
        if step == self._last_step:
            return False  # nothing new (e.g. skipped steps)
        if self.every_n_steps and step % self.every_n_steps == 0:
            return True
        return bool(self.every_minutes) and time.monotonic() - self._last_time >= 60 * self.every_minutes

    def _wanted(self, trainer: L.Trainer) -> tuple[bool, bool]:
        """This rank's (stop requested, checkpoint due)."""
        return stop_requested() is not None or trainer.received_sigterm, self._due(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        # one process: this batch's wishes; DDP: those all ranks sent after the previous batch
        # (LaggedFlags: the host does not wait for the step it has just queued)
        ranks = self._ranks
        stop, due = self._wanted(trainer) if ranks is None else ranks.received()
        if stop or due:
            self._save(trainer)
        if stop:
            raise Preempted(stop_requested() or signal.SIGTERM, trainer.global_step, str(self.path(trainer)))
        if ranks is not None:  # after acting: a checkpoint just written is not due again
            ranks.send(*self._wanted(trainer))

    # ---- validation: its own random draws, and a stop at the end of its current batch -------
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return
        progress = trainer.fit_loop.epoch_loop.val_loop.batch_progress
        # the batch a stop in validation left "started" (below) was run again from the start: count it once
        progress.total.ready = progress.total.started = progress.total.processed = progress.total.completed
        self._val_start = progress.state_dict()
        self._use_validation_rng(trainer, pl_module)

    def _use_validation_rng(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Validation's random draws (the posterior samples) come from (seed, step, rank), not from
        whatever the run drew before it: a validation run again after a resume draws what the
        stopped one did; the training's random state is put back at its end (``_restore_rng``)."""
        device = trainer.strategy.root_device
        cuda = device if device.type == "cuda" else None
        self._rng = (torch.get_rng_state(), torch.cuda.get_rng_state(cuda) if cuda else None, cuda)
        seed = int(pl_module.hparams.get("seed", 0)) if hasattr(pl_module, "hparams") else 0
        torch.manual_seed(mix(seed, trainer.global_step, trainer.global_rank, _VALIDATION))

    def _restore_rng(self) -> None:
        if self._rng is not None:
            cpu, gpu, device = self._rng
            torch.set_rng_state(cpu)
            if device is not None:
                torch.cuda.set_rng_state(gpu, device)
            self._rng = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_rng()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        signum = stop_requested()
        if not self._previous:
            return  # not fitting under our handlers (e.g. trainer.validate)
        if trainer.world_size > 1:  # validation reads its metrics anyway: waiting here costs little
            (stop,) = agree_now(trainer.strategy.root_device, signum is not None)
        else:
            stop = signum is not None
        if not stop:
            return
        signum = signum or signal.SIGTERM  # another rank got it
        if trainer.sanity_checking:  # nothing trained since the start or the resumed checkpoint
            raise Preempted(signum, None, None)
        # Saved as if stopped inside the first validation batch: Lightning resumes such a checkpoint
        # by running this validation again from its first batch (its metrics were not kept), then
        # ModelCheckpoint sees the same val/nelbo as an uninterrupted run would
        progress = trainer.fit_loop.epoch_loop.val_loop.batch_progress
        progress.load_state_dict(self._val_start)
        progress.increment_ready()
        progress.increment_started()
        self._save(trainer)
        raise Preempted(signum, trainer.global_step, str(self.path(trainer)))

    def _save(self, trainer: L.Trainer) -> None:
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
