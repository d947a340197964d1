"""Activation checkpointing that keeps BatchNorm statistics exact.

``torch.utils.checkpoint`` runs a segment's forward a second time in backward. A BatchNorm in
training mode would then update its running statistics twice per step; during that recompute we
set its momentum to 0 (the batch statistics used for normalising, and so the activations, are
unchanged) and restore ``num_batches_tracked`` afterwards, so the state after a step is the same
as without checkpointing. Only cells are checkpointed, and they draw no random numbers (the
latent draws happen outside them), so no RNG state is saved for the recompute.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


@contextmanager
def _frozen_batch_norm_stats(module: nn.Module):
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def run(module: nn.Module, x: torch.Tensor, enabled: bool) -> torch.Tensor:
    """``module(x)``; with ``enabled`` (and gradients on), its activations are recomputed in backward
    instead of being kept."""
    if not (enabled and torch.is_grad_enabled()):
        return module(x)
    # preserve_rng_state=False: a cell draws no random numbers, so there is no RNG state to replay;
    # reading the CUDA generator's state is also forbidden inside a CUDA-graph capture (the step
    # graphs of fusionvae.training.step_graph)
    return checkpoint(
        module,
        x,
        use_reentrant=False,
        preserve_rng_state=False,
        context_fn=lambda: (nullcontext(), _frozen_batch_norm_stats(module)),
    )
