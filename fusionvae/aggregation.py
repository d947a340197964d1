"""Permutation-invariant fusion of per-view Normal parameters.

Inputs are effective means and stds ``[B, K, ...]`` (sigma = exp(log_sigma) + 0.01 per view);
the result is one ``Normal`` or ``None`` for K = 0 (callers fall back to the unconditional prior).

- ``max``:   element-wise max of mu and of log sigma separately (paper default).
- ``mean``:  mean of mu and of log sigma (geometric mean of sigma).
- ``bayes``: precision-weighted product of the K Gaussians,
             1/sigma^2 = sum_k 1/sigma_k^2, mu = sigma^2 * sum_k mu_k / sigma_k^2.
"""
from __future__ import annotations

import torch

from .distributions import Normal

AGGREGATIONS = ("max", "mean", "bayes")


def check_aggregation(name: str) -> str:
    if name not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation '{name}'; choose one of {', '.join(AGGREGATIONS)} (model.aggregation)")
    return name


def aggregate(mu: torch.Tensor, sigma: torch.Tensor, mode: str) -> Normal | None:
    """Fuse ``[B, K, ...]`` view parameters over dim 1."""
    if mu.shape[1] == 0:
        return None
    if mode == "max":
        return Normal(mu.amax(dim=1), sigma.amax(dim=1))
    if mode == "mean":
        return Normal(mu.mean(dim=1), sigma.log().mean(dim=1).exp())
    if mode == "bayes":
        precision = sigma.pow(-2)
        total = precision.sum(dim=1)
        return Normal((mu * precision).sum(dim=1) / total, total.rsqrt())
    raise ValueError(f"unknown aggregation '{mode}'")


def aggregate_features(x: torch.Tensor, mode: str) -> torch.Tensor | None:
    """Fuse deterministic ``[B, K, C, H, W]`` features (skip connections): max or mean."""
    if x.shape[1] == 0:
        return None
    return x.amax(dim=1) if mode == "max" else x.mean(dim=1)
