"""Adamax with a linear warm-up then a cosine learning-rate schedule (docs/design.md §1.2)."""

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


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, lr: float, lr_min: float) -> float:
    """Multiplier for LambdaLR: linear warm-up, then cosine from ``lr`` to ``lr_min``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return (lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * progress))) / lr


def build_optimizer(params, settings: OptimSettings, total_steps: int, epochs: int) -> dict:
    """Lightning's ``configure_optimizers`` result: Adamax (foreach: one multi-tensor update per
    step) and the per-step warm-up + cosine schedule over ``total_steps``."""
    params = list(params)
    # capturable on CUDA: the step count stays on the device (no host read per step)
    cuda = all(p.is_cuda for p in params)
    opt = torch.optim.Adamax(
        params, lr=settings.lr, eps=settings.eps, weight_decay=settings.weight_decay, foreach=True, capturable=cuda
    )
    total = max(1, int(total_steps))
    warmup = max(1, int(settings.warmup_epochs * total / max(1, epochs)))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: warmup_cosine(step, warmup, total, settings.lr, settings.lr_min)
    )
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
