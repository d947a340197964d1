"""The optimiser step of the LightningModule's manual optimisation, safe and cheap.

- Parameters and gradients live in one flat buffer (``fusionvae.training.flat``): zeroing, the gradient
  norm and clipping are one op each over every gradient.
- A step whose loss or gradient norm is non-finite on any rank is skipped: neither the optimiser
  nor the LR schedule steps (so ``global_step``, the schedule and the KL warm-up count successful
  steps only), the gradients are zeroed, and every buffer the forward pass changed (BN running
  statistics, power-iteration vectors) is restored from the copy ``begin`` made. Too many skips
  in a row stop the run (``TooManySkippedSteps``).
- ``clip``: the gradients are scaled to that norm when above it (Lightning's own clipping is not
  available under manual optimisation; ``trainer.gradient_clip_val`` is routed here).

The module keeps its state-dict keys: the engine holds no tensors of the checkpoint, only
references to the module's parameters and buffers and the copy of its buffers for a skip.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from fusionvae.errors import TooManySkippedSteps
from fusionvae.model.host_copy import HostCopy
from fusionvae.training.flat import flat_buffers, flat_parameters, is_flat, zero_gradients

COUNTERS = ("skipped_steps", "train_batches")  # buffers a skip must not restore


@dataclass
class StepContext:
    """What the step needs from Lightning: ``backward(loss)`` (``manual_backward``),
    ``all_ranks(ok) -> bool`` (``ok`` on every rank), the fp16 GradScaler or None, and
    ``where() -> (step, checkpoint folder)`` for the error after too many skips."""

    backward: Callable[[torch.Tensor], None]
    all_ranks: Callable[[torch.Tensor], bool]
    scaler: object | None
    where: Callable[[], tuple[int, str | None]]


class SkipSafeStep:
    """One per LightningModule: ``flat_parameters`` for the optimiser, ``begin`` before each forward
    pass, ``finish`` after it."""

    def __init__(self, module: nn.Module, max_consecutive_skips: int | None):
        self.module = module
        self.max_consecutive_skips = max_consecutive_skips
        self.clip: float | None = None  # trainer.gradient_clip_val (fusionvae.training.build.build)
        self.consecutive_skips = 0  # saved in checkpoints by the module
        self.flat: nn.Parameter | None = None  # backs every parameter and gradient
        self._flat_state: list[torch.Tensor] = []  # back the buffers a forward pass may change
        self._saved_state: list[torch.Tensor] = []  # their copies, restored on a skipped step

    def flat_parameters(self) -> nn.Parameter:
        """Move the module's parameters into one buffer (on their device) and return it for the
        optimiser."""
        self.flat = flat_parameters(self.module)
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

    def finish(self, loss: torch.Tensor, opt, sched, lightning: StepContext) -> torch.Tensor:
        """Backward and step, or skip; returns the gradient norm (NaN when skipped)."""
        grad_norm = self.optimise(loss, opt, sched, lightning)
        if grad_norm is None:
            self.skip(opt, *lightning.where())
            return torch.tensor(float("nan"))
        self.consecutive_skips = 0
        return grad_norm

    def optimise(self, loss: torch.Tensor, opt, sched, lightning: StepContext) -> torch.Tensor | None:
        """Backward and step; the gradient norm, or None when the step must be skipped. With a
        GradScaler (fp16) a non-finite gradient lowers the loss scale instead of stepping."""
        if not lightning.all_ranks(torch.isfinite(loss)):
            return None
        self.zero_grad(opt)
        lightning.backward(loss)
        grad_norm = self.grad_norm()
        scaler = lightning.scaler
        if not lightning.all_ranks(torch.isfinite(grad_norm)):
            if scaler is not None:  # records the inf, then backs the scale off (no step)
                scaler.unscale_(opt.optimizer)
                scaler.update()
            return None
        if scaler is not None:  # the gradients are scaled; Lightning unscales them in opt.step()
            grad_norm = grad_norm / scaler.get_scale()
        self.clip_gradients(grad_norm)  # a factor on the (scaled) gradients: the same either way
        opt.step()
        sched.step()
        return grad_norm

    def skip(self, opt, step: int, folder: str | None) -> None:
        """Undo what the skipped forward pass changed; stop after too many skips in a row."""
        torch._foreach_copy_(self._flat_state, self._saved_state)
        for module in self.module.modules():  # the restore went around the buffers' own tensors
            for value in vars(module).values():
                if isinstance(value, HostCopy):
                    value.forget()
        self.zero_grad(opt)
        self.module.skipped_steps += 1
        self.consecutive_skips += 1
        limit = self.max_consecutive_skips
        if limit is not None and self.consecutive_skips > limit:
            raise TooManySkippedSteps(
                f"{self.consecutive_skips} consecutive training steps had a non-finite loss or gradients "
                f"(limit model.loss.max_consecutive_skips={limit}) at step {step}; the checkpoints "
                f"in {folder or 'the checkpoints folder'} are from before them: lower model.optim.lr or check "
                f"the data, then resume"
            )

    # ---- gradients ----------------------------------------------------------------------------
    def zero_grad(self, opt) -> None:
        if self.flat is None:  # an optimiser not from flat_parameters
            opt.zero_grad(set_to_none=True)
        else:  # the gradients are views of one flat buffer: one op, and keep them linked
            zero_gradients(self.module, self.flat)

    def grad_norm(self) -> torch.Tensor:
        params = list(self.module.parameters())
        if self.flat is not None and is_flat(self.flat.grad, [p.grad for p in params]):
            return torch.linalg.vector_norm(self.flat.grad)  # one op over every gradient
        return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])

    def clip_gradients(self, grad_norm: torch.Tensor) -> None:
        """Scale all gradients to norm ``clip`` when above it."""
        if not self.clip:
            return
        scale = (self.clip / (grad_norm + 1e-6)).clamp(max=1.0)
        if self.flat is not None:
            self.flat.grad.mul_(scale)  # one op for every gradient
        else:
            torch._foreach_mul_([p.grad for p in self.module.parameters() if p.grad is not None], scale)
