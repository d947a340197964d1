"""Permutation-invariant fusion of per-view Normal parameters.

Inputs are effective means and stds ``[B, K, ...]`` (sigma = exp(log_sigma) + 0.01 per view);
the result is one ``Normal`` or ``None`` for K = 0 (callers fall back to the unconditional prior).

- ``max``:   element-wise max of mu and of log sigma separately (paper default).
- ``mean``:  mean of mu and of log sigma (geometric mean of sigma).
- ``bayes``: precision-weighted product of the K Gaussians,
             1/sigma^2 = sum_k 1/sigma_k^2, mu = sigma^2 * sum_k mu_k / sigma_k^2.
- ``bayes_official``: the official code's sequential update, for reproducing the paper's
             ablation. It works on the raw head outputs (mu_k, l_k) before the soft clamp and
             treats exp(l_k) as a variance: m = mu_1, v = exp(l_1); for k = 2..K
             g = v / (v + exp(l_k)), m += g (mu_k - m), v *= 1 - g. The fused raw pair (m, log v)
             then goes through the usual parameterisation, where exp(log v) is used as a std.
             So K equal views of std s fuse to about s / K, not the product's s / sqrt(K).
"""
from __future__ import annotations

import torch

from .distributions import Normal

AGGREGATIONS = ("max", "mean", "bayes", "bayes_official")


def check_aggregation(name: str) -> str:
    if name not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation '{name}'; choose one of {', '.join(AGGREGATIONS)} (model.aggregation)")
    return name


def aggregate_params(params: torch.Tensor, mode: str) -> Normal:
    """Fuse raw per-view head outputs ``[B, K, 2 Z, ...]`` (K >= 1) into one prior ``Normal``."""
    if mode == "bayes_official":
        mu, log_var = params.float().chunk(2, dim=2)
        m, v = mu[:, 0], log_var[:, 0].exp()
        for k in range(1, mu.shape[1]):
            gain = v / (v + log_var[:, k].exp())
            m = m + gain * (mu[:, k] - m)
            v = (1 - gain) * v
        return Normal.from_params(torch.cat([m, v.log()], dim=1))
    mu, sigma = Normal.from_params(params, dim=2).params()
    return aggregate(mu, sigma, mode)


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
