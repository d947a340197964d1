"""Test-only callbacks that interrupt a training run at a chosen step or validation batch (added with
``+callbacks.<name>._target_=tests.long_run_helpers.<Class>`` on the command line)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import lightning as L
import torch

from fusionvae.training.resilience import stop_requested


class SignalAt(L.Callback):
    """At the start of the batch where ``global_step == step``: send ``signal`` to this process
    (``external=False``), or write ``marker`` and wait until someone else sends a signal. With
    ``rank``, only that DDP rank does."""

    def __init__(
        self,
        step: int,
        signal_name: str = "SIGTERM",
        external: bool = False,
        marker: str | None = None,
        timeout: float = 120.0,
        rank: int | None = None,
    ):
        self.step, self.signum, self.external = step, getattr(signal, signal_name), external
        self.marker, self.timeout, self.fired, self.rank = marker, timeout, False, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.fired or trainer.global_step != self.step or self.rank not in (None, trainer.global_rank):
            return
        self.fired = True
        signal_now(self.signum, self.external, self.marker, self.timeout)


def signal_now(signum: int, external: bool = False, marker: str | None = None, timeout: float = 120.0) -> None:
    """Send ``signum`` to this process, or (``external``) write ``marker`` and wait until someone
    else sends a signal (RunGuard's handler records it)."""
    if not external:
        os.kill(os.getpid(), signum)
        return
    Path(marker).write_text(str(os.getpid()))
    deadline = time.monotonic() + timeout
    while stop_requested() is None and time.monotonic() < deadline:
        time.sleep(0.02)


class SignalInValidation(L.Callback):
    """At the start of validation batch ``batch`` after training step ``step`` (not the sanity
    check): send ``signal`` to this process, or (``external``) write ``marker`` and wait until
    someone else sends one. Every validation batch that starts from then on is appended to ``record``."""

    def __init__(
        self,
        step: int,
        batch: int,
        record: str,
        signal_name: str = "SIGTERM",
        external: bool = False,
        marker: str | None = None,
    ):
        self.step, self.batch, self.record = step, batch, Path(record)
        self.signum, self.external, self.marker, self.fired = getattr(signal, signal_name), external, marker, False

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.fired:
            with self.record.open("a") as f:
                f.write(f"{batch_idx}\n")
        elif not trainer.sanity_checking and (trainer.global_step, batch_idx) == (self.step, self.batch):
            self.fired = True
            self.record.write_text(f"{batch_idx}\n")
            signal_now(self.signum, self.external, self.marker)


class Poison(L.Callback):
    """Non-finite values on the chosen training batches (1-based batch counts, ``batches`` or every
    batch from ``from_batch`` on): ``input`` puts NaN pixels into the batch, ``activation`` makes a
    decoder cell output NaN (mid-network, so the BN layers after it see it), ``overflow`` makes it
    inf, ``gradient`` turns one parameter's gradient to NaN while the loss stays finite."""

    def __init__(self, batches: list[int] | None = None, from_batch: int | None = None, kind: str = "activation"):
        self.batches, self.from_batch, self.kind = set(batches or []), from_batch, kind
        self.module = None

    def active(self) -> bool:
        n = int(self.module.train_batches)  # incremented before the forward pass
        return self.module.training and (n in self.batches or (self.from_batch is not None and n >= self.from_batch))

    def setup(self, trainer, pl_module, stage) -> None:
        self.module = pl_module
        cell = pl_module.net.latent_groups[1].cells[0]
        if self.kind == "input":
            pl_module.net.stem.register_forward_pre_hook(
                lambda mod, args: (args[0].index_fill(-1, torch.tensor([3]), float("nan")),) if self.active() else None
            )
        elif self.kind == "gradient":
            weight = cell.branch[1].weight
            weight.register_hook(lambda g: g * float("nan") if self.active() else g)
        else:
            bad = float("nan") if self.kind == "activation" else float("inf")
            cell.register_forward_hook(lambda mod, inputs, out: out * bad if self.active() else None)
