"""Permutation-invariant fusion of K >= 1 views (docs/design.md §1.1); K = 0 never gets here.

Where the views are combined is ``model.aggregation_level`` (``AGGREGATION_LEVELS``):

- ``features`` (default): ``pool_features`` takes the element-wise max / mean of the per-view
  features f_k = e_k + Conv1x1(s) ``[B, K, C, ...]``; the group's head then maps the pooled
  features to the prior's parameters once. Only ``max`` and ``mean`` pool features.
- ``params``: the head runs on every view and ``aggregate_params`` fuses the K raw head outputs
  ``[B, K, 2 Z, ...]`` into one prior ``Normal`` with one of ``AGGREGATIONS`` (config
  ``model.aggregation``). To add one, write a function ``(params) -> Normal`` and register it.

``features`` is our reading of the official final configuration (``encComb='multiAdd'``,
``agg='maxAg'``, ``convPBefAg=False``; its README: ``aggregate`` combines features,
``aggregate_dist`` means and variances); the modified NVAE model file was never published, so it
is an inference, not a copy. The aggregations on parameters:

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

from fusionvae.errors import BadInputError
from fusionvae.model.distributions import Normal


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
        raise BadInputError(
            f"unknown aggregation '{name}'; choose one of {', '.join(AGGREGATIONS)} (model.aggregation)"
        )
    return name


def aggregate_params(params: torch.Tensor, mode: str) -> Normal:
    """Fuse raw per-view head outputs ``[B, K, 2 Z, ...]`` (K >= 1) into one prior ``Normal``."""
    return AGGREGATIONS[mode](params)


FEATURE_POOLS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "max": lambda x: x.amax(dim=1),
    "mean": lambda x: x.mean(dim=1),
}
AGGREGATION_LEVELS = ("features", "params")


def check_aggregation_level(level: str, aggregation: str) -> str:
    """``level`` if ``aggregation`` can work there; one line naming the fix otherwise."""
    if level not in AGGREGATION_LEVELS:
        raise BadInputError(
            f"unknown aggregation level '{level}'; choose one of {', '.join(AGGREGATION_LEVELS)} "
            "(model.aggregation_level)"
        )
    if level == "features" and aggregation not in FEATURE_POOLS:
        raise BadInputError(
            f"model.aggregation={aggregation} combines distributions, so it needs their parameters: "
            f"use model.aggregation_level=params (features pool only with {' or '.join(FEATURE_POOLS)})"
        )
    return level


def pool_features(x: torch.Tensor, mode: str) -> torch.Tensor:
    """Fuse features ``[B, K, C, H, W]`` (K >= 1) over the views: element-wise max or mean."""
    return FEATURE_POOLS[mode](x)
