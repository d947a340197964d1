"""Batch-norm statistics re-adjustment for sampling (NVAE's "readjust BN").

Sampling at a reduced temperature changes the activation statistics in the decoder, so the
running statistics gathered in training no longer fit. Before drawing samples at temperature t,
the BN layers are put in train mode with a cumulative moving average (``momentum=None``), their
statistics are reset, and a few batches are sampled from p(z | x) at that temperature; no
parameter changes. The input views come from data batches (K cycles through 0..k_max so every
number of views contributes, K = k_max first); targets are never used. Layers that no batch
reached keep their trained statistics. Everything runs in fp32 with autocast off.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from fusionvae.model.objective import split_views


def batchnorm_layers(module: nn.Module) -> list[_BatchNorm]:
    return [m for m in module.modules() if isinstance(m, _BatchNorm)]


@torch.no_grad()
def readjust_bn(
    module,
    batches: Iterable[torch.Tensor],
    t: float = 1.0,
    num_batches: int = 20,
    device: torch.device | str | None = None,
    inplace: bool = False,
):
    """A copy of ``module`` (a ``FusionVAEModule``; the module itself when ``inplace``) in eval mode
    whose BN running statistics are re-estimated from ``num_batches`` batches ``[B, V + 1, C, H, W]``
    sampled at temperature ``t``. Raises ``FloatingPointError`` if a statistic becomes non-finite."""
    if num_batches < 1:
        raise ValueError(f"bn_readjust_batches must be >= 1, got {num_batches}")
    target = module if inplace else copy.deepcopy(module)
    device = torch.device(device) if device is not None else next(target.parameters()).device
    target.to(device).eval()
    layers = batchnorm_layers(target)
    momenta = [bn.momentum for bn in layers]
    saved = [(bn.running_mean.clone(), bn.running_var.clone()) if bn.track_running_stats else None for bn in layers]
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the re-adjustment batches
        bn.train()
    k_max = target.hparams.k_max
    used = 0
    try:
        with torch.autocast(device.type, enabled=False):
            for batch in batches:
                if used >= num_batches:
                    break
                batch = batch.to(device, torch.float32)
                k_top = min(k_max, batch.shape[1] - 1)
                k = k_top - used % (k_top + 1)  # K = k_top first: the encoder sees data from batch 1
                views, _ = split_views(batch, k)
                target.net(views, None, t=t)
                used += 1
    finally:
        for bn, momentum, stats in zip(layers, momenta, saved):
            bn.momentum = momentum
            if stats is not None and int(bn.num_batches_tracked) == 0:  # never ran: keep the trained statistics
                bn.running_mean.copy_(stats[0])
                bn.running_var.copy_(stats[1])
        target.eval()
    if used == 0:
        raise ValueError("BN re-adjustment got no batches")
    for bn in layers:
        if bn.track_running_stats and not (
            torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all()
        ):
            raise FloatingPointError(f"BN re-adjustment at t={t} gave non-finite running statistics")
    return target
