"""The optimiser step of the LightningModule's manual optimisation: safe, and without a host read.

- Parameters and gradients live in one flat buffer (``fusionvae.training.flat``): gathering the
  gradients, their norm and clipping are one op each over every gradient.
- A step whose loss or gradient norm is non-finite on any rank changes nothing: the optimiser
  (``ScheduledAdamax``) discards its update with ``torch.where``, so parameters, moments and the
  step count that drives the LR schedule and the KL warm-up keep their values; every buffer the
  forward pass changed (BN running statistics, power-iteration vectors) is put back from the copy
  ``begin`` made, masked the same way. The decision stays on the device: no Python branch on a
  device value, so a GPU never waits for the host (also what a CUDA-graph capture needs). Lightning's
  ``global_step`` counts batches, skipped ones included; ``skipped_steps`` counts the skips.
- Too many skips in a row stop the run (``TooManySkippedSteps``). The run of skips is counted on
  the device and read by ``check_skips``, which the module calls at logging steps and before a
  checkpoint is written, so no checkpoint holds a state after the limit was passed.
- ``clip``: the gradients are scaled to that norm when above it (Lightning's own clipping is not
  available under manual optimisation; ``trainer.gradient_clip_val`` is routed here).

The module keeps its state-dict keys: the engine holds no tensors of the checkpoint, only
references to the module's parameters and buffers and the copy of its buffers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from fusionvae.errors import TooManySkippedSteps
from fusionvae.training.flat import FlatGradients, flat_buffers, flat_parameters, is_flat

COUNTERS = ("skipped_steps", "train_batches")  # buffers a skip must not restore


@dataclass
class StepContext:
    """What the step needs from Lightning: ``backward(loss)`` (``manual_backward``),
    ``all_ranks(ok) -> ok`` (a 0-dim bool tensor: True where every rank's is, without a host
    read) and the fp16 GradScaler or None."""

    backward: Callable[[torch.Tensor], None]
    all_ranks: Callable[[torch.Tensor], torch.Tensor]
    scaler: object | None


class SkipSafeStep:
    """One per LightningModule: ``flat_parameters`` for the optimiser, ``begin`` before each forward
    pass, ``finish`` after it, ``check_skips`` whenever the host may read."""

    def __init__(self, module: nn.Module, max_consecutive_skips: int | None):
        self.module = module
        self.max_consecutive_skips = max_consecutive_skips
        self.clip: float | None = None  # trainer.gradient_clip_val (fusionvae.training.build.build)
        self.flat: nn.Parameter | None = None  # backs every parameter and gradient
        self.gradients: FlatGradients | None = None
        self._flat_state: list[torch.Tensor] = []  # back the buffers a forward pass may change
        self._saved_state: list[torch.Tensor] = []  # their copies, put back on a skipped step
        # skips in a row now, and the longest run since the last check (device counters)
        self._run = torch.zeros((), dtype=torch.long)
        self._longest = torch.zeros((), dtype=torch.long)

    @property
    def consecutive_skips(self) -> int:
        """Skips in a row now (a host read: for checkpoints and tests, not for every step)."""
        return int(self._run)

    @consecutive_skips.setter
    def consecutive_skips(self, value: int) -> None:
        self._run = torch.full((), int(value), dtype=torch.long, device=self._run.device)
        self._longest = self._run.clone()

    def flat_parameters(self) -> nn.Parameter:
        """Move the module's parameters into one buffer (on their device) and return it for the
        optimiser."""
        self.flat = flat_parameters(self.module)
        self.gradients = FlatGradients(self.module, self.flat)
        self._run, self._longest = self._run.to(self.flat.device), self._longest.to(self.flat.device)
        return self.flat

    # ---- the step -----------------------------------------------------------------------------
    def begin(self) -> list[torch.Tensor]:
        """Copy every buffer a forward pass may change (not the counters), kept in one flat buffer
        per dtype, so saving is a copy or two; returns those flat buffers."""
        state = [b for name, b in self.module.named_buffers() if name not in COUNTERS]
        if not self._flat_state or not all(any(is_flat(f, [b]) for f in self._flat_state) for b in state):
            self._flat_state = flat_buffers(state)
            self._saved_state = [torch.empty_like(f) for f in self._flat_state]
        torch._foreach_copy_(self._saved_state, self._flat_state)
        return self._flat_state

    def finish(self, loss: torch.Tensor, opt, lightning: StepContext) -> torch.Tensor:
        """Backward and step, kept only if the loss and the gradients are finite on every rank;
        returns the gradient norm (NaN for a skipped step)."""
        self.gradients.release()
        lightning.backward(loss)
        grad_norm = torch.linalg.vector_norm(self.gradients.gather())  # one op over every gradient
        ok = lightning.all_ranks(torch.isfinite(loss) & torch.isfinite(grad_norm))
        scaler = lightning.scaler
        if scaler is not None:  # fp16: the gradients are scaled (the scaler reads the scale on the host)
            grad_norm = grad_norm / scaler.get_scale()
        self.clip_gradients(grad_norm)  # a factor on the (scaled) gradients: the same either way
        opt.step(ok=ok)  # a GradScaler that finds an inf does not call the optimiser at all
        for current, saved in zip(self._flat_state, self._saved_state):
            torch.where(ok, current, saved, out=current)
        self.count(ok)
        return torch.where(ok, grad_norm, float("nan"))

    def count(self, ok: torch.Tensor) -> None:
        skipped = ~ok
        self.module.skipped_steps.add_(skipped)
        self._run.add_(1).mul_(skipped)  # 0 after a good step, one more after a skip
        torch.maximum(self._longest, self._run, out=self._longest)

    def check_skips(self, step: int, folder: str | None) -> None:
        """Stop if a run of skips since the last check was longer than the limit (one host read)."""
        limit = self.max_consecutive_skips
        if limit is None:
            return
        longest = int(self._longest)
        self._longest.copy_(self._run)
        if longest > limit:
            raise TooManySkippedSteps(
                f"{longest} consecutive training steps had a non-finite loss or gradients "
                f"(limit model.loss.max_consecutive_skips={limit}), found at step {step}; the checkpoints "
                f"in {folder or 'the checkpoints folder'} are from before them: lower model.optim.lr or check "
                f"the data, then resume"
            )

    # ---- gradients ----------------------------------------------------------------------------
    def clip_gradients(self, grad_norm: torch.Tensor) -> None:
        """Scale all gradients to norm ``clip`` when above it."""
        if not self.clip:
            return
        scale = (self.clip / (grad_norm + 1e-6)).clamp(max=1.0)
        self.flat.grad.mul_(scale)  # one op for every gradient
