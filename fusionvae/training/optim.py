"""Adamax with a linear warm-up then a cosine learning-rate schedule (docs/design.md §1.2), all on
the device: a step reads nothing back to the host."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fusionvae.errors import BadInputError
from fusionvae.settings import settings_from_dict

# (setting, a value the optimiser can use, the bound in words): checked up front because a bad
# one trains silently wrong (lr <= 0 walks uphill) or fails only after the data is prepared
_BOUNDS = (
    ("lr", lambda v: v > 0, "> 0"),
    ("lr_min", lambda v: v >= 0, ">= 0"),
    ("eps", lambda v: v > 0, "> 0"),
    ("weight_decay", lambda v: v >= 0, ">= 0"),
    ("warmup_epochs", lambda v: v >= 0, ">= 0"),
)


@dataclass(frozen=True)
class OptimSettings:
    """``model.optim`` (values in conf/model/fusionvae.yaml; these defaults must agree with it)."""

    lr: float = 1e-2
    lr_min: float = 1e-4  # the cosine decays to this
    eps: float = 1e-3
    weight_decay: float = 3e-4
    warmup_epochs: float = 5  # linear warm-up, converted to steps

    def __post_init__(self) -> None:
        for name, ok, bound in _BOUNDS:
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and ok(value)):
                raise BadInputError(
                    f"model.optim.{name} must be a finite number {bound}, got {value!r} "
                    f"(the default is model.optim.{name}={getattr(type(self), name)})"
                )
        if self.lr_min > self.lr:  # the cosine would end above where it starts
            raise BadInputError(f"model.optim.lr_min ({self.lr_min}) must be <= model.optim.lr ({self.lr})")

    @classmethod
    def from_dict(cls, values: dict | None, key: str = "model.optim") -> OptimSettings:
        return settings_from_dict(cls, values, key)


def warmup_cosine(step, warmup_steps: int, total_steps: int, lr: float, lr_min: float) -> torch.Tensor:
    """The learning rate's multiplier at ``step`` (a number, or the optimiser's step count on its
    device): linear warm-up, then cosine from ``lr`` to ``lr_min``. Tensor ops in float64, so the
    schedule needs no host read of the step count."""
    step = torch.as_tensor(step, dtype=torch.float64)
    warm = (step + 1) / warmup_steps
    progress = ((step - warmup_steps) / max(1, total_steps - warmup_steps)).clamp(max=1.0)
    cosine = (lr_min + 0.5 * (lr - lr_min) * (1 + torch.cos(math.pi * progress))) / lr
    return torch.where(step < warmup_steps, warm, cosine)


class ScheduledAdamax(torch.optim.Adamax):
    """torch's Adamax update and state-dict format, with two changes that keep a training step free
    of host reads (a GPU never waits for Python):

    - ``step(ok=...)``: ``ok`` is a 0-dim bool tensor; where it is False the update is discarded by
      ``torch.where`` (parameters, moments and step count keep their values, also when the
      gradients are NaN), so skipping a non-finite step needs no Python branch on a device value;
    - the learning rate is ``warmup_cosine`` of the step count, computed on the device; the count
      advances with successful steps only, so a skipped step leaves the schedule where it was.

    ``steps_done()`` is that count (a 0-dim tensor on the parameters' device), ``last_lr`` the rate
    of the last step. ``param_groups[i]["lr"]`` keeps the base rate (or a loaded checkpoint's)."""

    def __init__(self, params, settings: OptimSettings, warmup_steps: int, total_steps: int):
        super().__init__(params, lr=settings.lr, eps=settings.eps, weight_decay=settings.weight_decay, foreach=True)
        self.schedule = (warmup_steps, total_steps, settings.lr, settings.lr_min)
        self.last_lr = torch.tensor(float("nan"))

    def _state(self, p: torch.Tensor) -> dict:
        """``p``'s state, made on first use as torch's Adamax makes it (zeros), with the step count
        on ``p``'s device: a checkpoint loaded by Lightning leaves it on the CPU (Lightning moves
        every state tensor but ``step``), and a CPU count would be read back every step."""
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_inf"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif state["step"].device != p.device:
            state["step"] = state["step"].to(p.device, torch.float32)
        return state

    def steps_done(self) -> torch.Tensor:
        """Successful steps so far (the schedule's and the KL warm-up's count)."""
        return self._state(self.param_groups[0]["params"][0])["step"]

    @torch.no_grad()
    def step(self, closure=None, ok: torch.Tensor | None = None, update: bool = True):
        """``update=False``: only the closure, for a step whose update already ran in a CUDA graph
        (``fusionvae.training.step_graph``), so that Lightning still counts it."""
        loss = None
        if closure is not None:  # Lightning's closure runs its hooks
            with torch.enable_grad():
                loss = closure()
        if not update:
            return loss
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state(p)
                keep = torch.ones((), dtype=torch.bool, device=p.device) if ok is None else ok
                self._update(p, state, keep, beta1, beta2, group["eps"], group["weight_decay"])
        return loss

    def _update(self, p, state, ok, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
        """torch's capturable Adamax for one tensor, kept only where ``ok``."""
        step, exp_avg, exp_inf = state["step"], state["exp_avg"], state["exp_inf"]
        lr = self.schedule[2] * warmup_cosine(step, *self.schedule)
        self.last_lr = lr
        new_step = step + ok
        grad = p.grad if weight_decay == 0 else p.grad.add(p, alpha=weight_decay)
        new_avg = torch.lerp(exp_avg, grad, 1 - beta1)
        new_inf = torch.maximum(exp_inf * beta2, grad.abs().add_(eps))
        bias_correction = (torch.pow(beta1, new_step) - 1) / lr  # -(1 - beta1^t) / lr
        new_p = torch.addcdiv(p, new_avg, new_inf * bias_correction)
        torch.where(ok, new_p, p, out=p)  # a skipped step: NaN or not, the old values stay
        torch.where(ok, new_avg, exp_avg, out=exp_avg)
        torch.where(ok, new_inf, exp_inf, out=exp_inf)
        step.copy_(new_step)


def build_optimizer(params, settings: OptimSettings, total_steps: int, epochs: int) -> ScheduledAdamax:
    """Lightning's ``configure_optimizers`` result: Adamax with its per-step warm-up + cosine
    schedule over ``total_steps`` (warm-up: ``warmup_epochs`` of ``epochs``)."""
    total = max(1, int(total_steps))
    warmup = max(1, int(settings.warmup_epochs * total / max(1, epochs)))
    return ScheduledAdamax(params, settings, warmup, total)
