"""The objective, in one place (docs/design.md §1.2): what training, validation, evaluation and the
benchmarks all compute.

- ``split_views``: the last K views and the target of a sample stack;
- ``compute_terms``: per-item NLL on the central pixels and per-group KL, in fp32 (``Terms``);
- ``kl_warmup``, ``kl_balance_alpha``, ``balanced_kl``: the KL weighting while training;
- ``training_loss``: NLL + beta-weighted balanced KL + lambda * regulariser;
- ``to_units``: nats per image, or bits per dimension.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fusionvae.model.distributions import Likelihood
from fusionvae.settings import settings_from_dict


@dataclass(frozen=True)
class LossSettings:
    """``model.loss`` (values in conf/model/fusionvae.yaml; these defaults must agree with it)."""

    kl_warmup_portion: float = 0.3  # beta rises 1e-4 -> 1 over this share of all steps
    kl_min_beta: float = 1e-4
    kl_balance: bool = True
    weight_decay_norm: float = 1e-2  # lambda of the spectral + BN regularisers
    power_iter_init: int = 10
    power_iter: int = 1
    max_consecutive_skips: int | None = 50  # stop after more non-finite steps in a row

    @classmethod
    def from_dict(cls, values: dict | None, key: str = "model.loss") -> LossSettings:
        return settings_from_dict(cls, values, key)


@dataclass
class Terms:
    """Per-item terms of one batch: ``nll [B]`` = -log p(y|z) in nats over the central pixels,
    ``kl [B, L]`` = KL(q || p) per latent group (fp32), the ``target [B, C, H, W]`` and, when
    asked for, the prior's mean sigma ``[B]`` (the fusion diagnostic)."""

    nll: torch.Tensor
    kl: torch.Tensor
    target: torch.Tensor
    prior_sigma: torch.Tensor | None = None

    @property
    def nelbo(self) -> torch.Tensor:
        """The negative ELBO ``[B]`` in nats (beta = 1)."""
        return self.nll + self.kl.sum(dim=1)


def split_views(batch: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The last ``k`` views ``[B, k, C, H, W]`` and the target ``[B, C, H, W]`` of a stack
    ``[B, k_max + 1, C, H, W]`` (target last)."""
    available = batch.shape[1] - 1
    if not 0 <= k <= available:
        raise ValueError(f"K={k} views requested but the batch holds {available}; K must be in [0, {available}]")
    return batch[:, available - k : available], batch[:, -1]


def k_range(k_max: int, batch: torch.Tensor) -> range:
    """The K values a model with ``k_max`` can be evaluated on with this batch's views."""
    return range(min(k_max, batch.shape[1] - 1) + 1)


def log_likelihood(likelihood: Likelihood, target: torch.Tensor, crop: int) -> torch.Tensor:
    """log p(y | z) in nats ``[B]``, summed over the pixels left after removing ``crop`` borders."""
    lp = likelihood.log_prob(target)
    if crop:
        lp = lp[:, crop:-crop, crop:-crop]
    return lp.flatten(1).sum(1)


def compute_terms(net, views: torch.Tensor, target: torch.Tensor, crop: int, prior_sigma: bool = False) -> Terms:
    """One posterior draw through ``net``; the likelihood and KL in fp32 even under autocast
    (``prior_sigma``: also the prior's mean sigma, for validation)."""
    out = net(views, target)
    with torch.autocast(target.device.type, enabled=False):
        sigma = out.prior_sigma if prior_sigma else None
        return Terms(-log_likelihood(out.likelihood, target, crop), out.kl.float(), target, sigma)


def to_units(nats: torch.Tensor, image_shape: torch.Size, crop: int, bits_per_dim: bool) -> torch.Tensor:
    """Nats per image, or bits per dimension of the central ``[C, H - 2 crop, W - 2 crop]`` pixels."""
    if not bits_per_dim:
        return nats
    c, h, w = image_shape[-3:]
    return nats / (c * (h - 2 * crop) * (w - 2 * crop) * math.log(2))


def kl_warmup(step, total_steps: int, warmup_portion: float = 0.3, min_beta: float = 1e-4) -> torch.Tensor:
    """beta rises linearly from ``min_beta`` to 1 over the first ``warmup_portion`` of training;
    ``step`` is a number or the optimiser's step count on the device (float64 tensor ops: no host read)."""
    warm = max(1, int(warmup_portion * total_steps))
    return (torch.as_tensor(step, dtype=torch.float64) / warm).clamp(max=1.0).clamp(min=min_beta)


def kl_balance_alpha(groups_decoder_order: list[int]) -> torch.Tensor:
    """alpha_l = 4^i / (groups at scale i), i = 0 at the top scale, normalised to min 1."""
    alpha = torch.cat([torch.full((n,), 4.0**i / n) for i, n in enumerate(groups_decoder_order)])
    return alpha / alpha.min()


def balanced_kl(kl: torch.Tensor, alpha: torch.Tensor, beta, balance: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``beta *`` KL summed over groups ``[B, L] -> [B]``. While beta < 1 (and ``balance``), groups
    are reweighted by gamma_l ~ mean_batch|KL_l| / alpha_l (detached, mean 1) so that no group
    collapses early; from beta = 1 on gamma is 1 (chosen by ``torch.where``: ``beta`` may be a
    device tensor, and a Python branch on it would be a host read). Returns the weighted KL and
    the gammas."""
    if not balance:
        return beta * kl.sum(dim=1), torch.ones_like(alpha)
    per_group = kl.detach().abs().mean(dim=0) + 0.01
    gamma = per_group / alpha * per_group.sum()
    gamma = torch.where(torch.as_tensor(beta, device=kl.device) < 1.0, gamma / gamma.mean(), 1.0)
    return beta * (kl * gamma).sum(dim=1), gamma


def training_loss(
    terms: Terms, alpha: torch.Tensor, beta, settings: LossSettings, regulariser: torch.Tensor
) -> torch.Tensor:
    """The scalar minimised in training: mean(NLL + beta-weighted balanced KL) + lambda * reg."""
    kl_weighted, _ = balanced_kl(terms.kl, alpha, beta, settings.kl_balance)
    return (terms.nll + kl_weighted).mean() + settings.weight_decay_norm * regulariser
