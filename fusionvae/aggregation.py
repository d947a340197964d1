"""Permutation-invariant fusion of per-view Normal parameters (docs/design.md §1.1).

Every aggregation maps the raw head outputs ``[B, K, 2 Z, ...]`` of K >= 1 views to one prior
``Normal``; K = 0 never gets here (the network uses the unconditional prior). To add one, write a
function ``(params) -> Normal`` and register it in ``AGGREGATIONS`` (config ``model.aggregation``).

- ``max``:   element-wise max of mu and of sigma separately (paper default);
- ``mean``:  mean of mu and of log sigma (geometric mean of sigma);
- ``bayes``: precision-weighted product of the K Gaussians,
             1/sigma^2 = sum_k 1/sigma_k^2, mu = sigma^2 * sum_k mu_k / sigma_k^2;
- ``bayes_official``: the official code's sequential update, for reproducing the paper's
             ablation. It works on the raw head outputs (mu_k, l_k) before the soft clamp and
             treats exp(l_k) as a variance: m = mu_1, v = exp(l_1); for k = 2..K
             g = v / (v + exp(l_k)), m += g (mu_k - m), v *= 1 - g. The fused raw pair (m, log v)
             then goes through the usual parameterisation, where exp(log v) is used as a std.
             So K equal views of std s fuse to about s / K, not the product's s / sqrt(K).

``max``, ``mean`` and ``bayes`` work on the effective parameters mu = 5 tanh(mu / 5),
sigma = exp(5 tanh(l / 5)) + 0.01 of each view.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .distributions import Normal


def _views(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Effective per-view mu and sigma ``[B, K, Z, ...]``."""
    return Normal.from_params(params, dim=2).params()


def fuse_max(params: torch.Tensor) -> Normal:
    mu, sigma = _views(params)
    return Normal(mu.amax(dim=1), sigma.amax(dim=1))


def fuse_mean(params: torch.Tensor) -> Normal:
    mu, sigma = _views(params)
    return Normal(mu.mean(dim=1), sigma.log().mean(dim=1).exp())


def fuse_bayes(params: torch.Tensor) -> Normal:
    mu, sigma = _views(params)
    precision = sigma.pow(-2)
    total = precision.sum(dim=1)
    return Normal((mu * precision).sum(dim=1) / total, total.rsqrt())


def fuse_bayes_official(params: torch.Tensor) -> Normal:
    mu, log_var = params.float().chunk(2, dim=2)
    m, v = mu[:, 0], log_var[:, 0].exp()
    for k in range(1, mu.shape[1]):
        gain = v / (v + log_var[:, k].exp())
        m = m + gain * (mu[:, k] - m)
        v = (1 - gain) * v
    return Normal.from_params(torch.cat([m, v.log()], dim=1))


AGGREGATIONS: dict[str, Callable[[torch.Tensor], Normal]] = {
    "max": fuse_max,
    "mean": fuse_mean,
    "bayes": fuse_bayes,
    "bayes_official": fuse_bayes_official,
}


def check_aggregation(name: str) -> str:
    if name not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation '{name}'; choose one of {', '.join(AGGREGATIONS)} (model.aggregation)")
    return name


def aggregate_params(params: torch.Tensor, mode: str) -> Normal:
    """Fuse raw per-view head outputs ``[B, K, 2 Z, ...]`` (K >= 1) into one prior ``Normal``."""
    return AGGREGATIONS[mode](params)


def aggregate_features(x: torch.Tensor, mode: str) -> torch.Tensor:
    """Fuse deterministic ``[B, K, C, H, W]`` features (K >= 1; skip connections): max or mean."""
    return x.amax(dim=1) if mode == "max" else x.mean(dim=1)
