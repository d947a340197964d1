"""KL warm-up, KL balancing and the learning-rate schedule."""
from __future__ import annotations

import math

import torch


def kl_warmup(step: int, total_steps: int, warmup_portion: float = 0.3, min_beta: float = 1e-4) -> float:
    """beta rises linearly from ``min_beta`` to 1 over the first ``warmup_portion`` of training."""
    warm = max(1, int(warmup_portion * total_steps))
    return max(min(step / warm, 1.0), min_beta)


def kl_balance_alpha(groups_decoder_order: list[int]) -> torch.Tensor:
    """alpha_l = 4^i / (groups at scale i), i = 0 at the top scale, normalised to min 1."""
    alpha = torch.cat([torch.full((n,), 4.0**i / n) for i, n in enumerate(groups_decoder_order)])
    return alpha / alpha.min()


def balanced_kl(kl: torch.Tensor, alpha: torch.Tensor, beta: float, balance: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``beta *`` KL summed over groups ``[B, L] -> [B]``. While beta < 1 (and ``balance``), groups
    are reweighted by gamma_l ~ mean_batch|KL_l| / alpha_l (detached, mean 1) so that no group
    collapses early. Returns the weighted KL and the gammas."""
    if not balance or beta >= 1.0:
        return beta * kl.sum(dim=1), torch.ones_like(alpha)
    per_group = kl.detach().abs().mean(dim=0) + 0.01
    gamma = per_group / alpha * per_group.sum()
    gamma = gamma / gamma.mean()
    return beta * (kl * gamma).sum(dim=1), gamma


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, lr: float, lr_min: float) -> float:
    """Multiplier for LambdaLR: linear warm-up, then cosine from ``lr`` to ``lr_min``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return (lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * progress))) / lr
