"""Image grids: inputs, target, mean image (t = 0) and samples at several temperatures."""
from __future__ import annotations

import torch
from torchvision.utils import make_grid


@torch.no_grad()
def fusion_grid(module, batch: torch.Tensor, k: int, temperatures=(0.6, 0.8, 1.0), n: int = 8) -> torch.Tensor:
    """One row per item: the k_max input slots (unused ones blank), target, mean, samples.
    Returns a ``[3, H', W']`` grid in [0, 1]."""
    batch = batch[:n]
    views, target = module.split(batch, k)
    slots = batch.shape[1] - 1
    blank = torch.zeros_like(batch[:, : slots - k])
    cols = [blank, views, target.unsqueeze(1), module.sample(views, t=0.0, mean_image=True).unsqueeze(1)]
    cols += [module.sample(views, t=t).unsqueeze(1) for t in temperatures]
    rows = torch.cat([c.float().cpu() for c in cols], dim=1)  # [n, columns, C, H, W]
    return make_grid(rows.flatten(0, 1), nrow=rows.shape[1], padding=1, pad_value=0.5)
