"""Distributions, always evaluated in fp32 (callers pass fp32 tensors).

``Normal`` is the latent distribution. ``Likelihood`` is the contract of an image likelihood
p(y | z); to add one, subclass it and register it in ``LIKELIHOODS`` (config ``model.likelihood``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)


def soft_clamp(x: torch.Tensor, bound: float = 5.0) -> torch.Tensor:
    return bound * torch.tanh(x / bound)


class Normal:
    """Diagonal Gaussian with effective std ``sigma``; ``from_params`` applies the NVAE
    parameterisation ``mu = 5 tanh(mu/5)``, ``sigma = exp(5 tanh(log_sigma/5)) + 0.01``."""

    def __init__(self, mu: torch.Tensor, sigma: torch.Tensor):
        self.mu = mu
        self.sigma = sigma

    @classmethod
    def from_params(cls, params: torch.Tensor, dim: int = 1) -> Normal:
        mu, log_sigma = params.float().chunk(2, dim=dim)
        return cls(soft_clamp(mu), soft_clamp(log_sigma).exp() + 1e-2)

    @classmethod
    def standard(cls, shape, device) -> Normal:
        return cls(torch.zeros(shape, device=device), torch.ones(shape, device=device))

    def params(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mu, self.sigma

    def sample(self, t: float = 1.0) -> torch.Tensor:
        return self.mu + t * self.sigma * torch.randn_like(self.mu)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Element-wise log density."""
        return -0.5 * ((z - self.mu) / self.sigma) ** 2 - self.sigma.log() - 0.5 * LOG_2PI

    def kl(self, other: Normal) -> torch.Tensor:
        """Element-wise analytic KL(self || other)."""
        var_ratio = (self.sigma / other.sigma) ** 2
        diff = (self.mu - other.mu) / other.sigma
        return 0.5 * (var_ratio + diff**2 - 1.0) - torch.log(self.sigma / other.sigma)


def _to_bins(x: torch.Tensor) -> torch.Tensor:
    """Integer pixel values 0..255 of images in [0, 1]."""
    return torch.round(x.float().clamp(0, 1) * 255.0)


class Likelihood(ABC):
    """p(y | z) over images with 8-bit pixels, built from the network's output ``params
    [B, num_params(channels, num_mix), H, W]``. ``log_prob`` is in nats per pixel of a discrete
    distribution (reports convert nats to bits/dim, which is only right for discrete pixels)."""

    @abstractmethod
    def __init__(self, params: torch.Tensor, channels: int, num_mix: int):
        """``params`` as produced by the image head (cast to fp32 here)."""

    @staticmethod
    @abstractmethod
    def num_params(channels: int, num_mix: int) -> int:
        """Output channels the image head must produce."""

    @abstractmethod
    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, W]`` log-probability of images ``x [B, C, H, W]`` in [0, 1], summed over channels."""

    @abstractmethod
    def sample(self) -> torch.Tensor:
        """A sample image ``[B, C, H, W]`` in [0, 1]."""

    @abstractmethod
    def mean(self) -> torch.Tensor:
        """The mean image ``[B, C, H, W]`` in [0, 1] (the "mean image" of grids and evaluation)."""


class DiscMixLogistic(Likelihood):
    """Discretised mixture of logistics (PixelCNN++) over 256 levels, any number of channels.

    ``params`` is ``[B, M * (1 + 2C + C(C-1)/2), H, W]``: mixture logits, per-channel means,
    log-scales, then the autoregressive channel coefficients (tanh); channel c's mean is shifted
    by ``sum_{j<c} coeff_cj * x_j``. Edge bins (value 0 or 255) are chosen on the integer value.
    """

    def __init__(self, params: torch.Tensor, channels: int, num_mix: int = 10):
        params = params.float()
        b, _, h, w = params.shape
        m, c = num_mix, channels
        self.c, self.m = c, m
        # splits, not slices: one backward op (a cat) instead of zeros + copy per slice
        self.logits, rest = params.split([m, params.shape[1] - m], dim=1)  # logits [B, M, H, W]
        rest = rest.view(b, -1, m, h, w)
        self.means, log_scales, coeffs = rest.split([c, c, rest.shape[1] - 2 * c], dim=1)  # [B, C, M, H, W]
        self.log_scales = log_scales.clamp(min=-7.0)
        self.coeffs = torch.tanh(coeffs)  # [B, C(C-1)/2, M, H, W]

    @staticmethod
    def num_params(channels: int, num_mix: int = 10) -> int:
        return num_mix * (1 + 2 * channels + channels * (channels - 1) // 2)

    def _coupled_means(self, x: torch.Tensor) -> torch.Tensor:
        """Means with channel coupling, given x in [-1, 1] as [B, C, 1, H, W]."""
        means = [self.means[:, 0]]
        k = 0
        for ch in range(1, self.c):
            mu = self.means[:, ch]
            for prev in range(ch):
                mu = mu + self.coeffs[:, k] * x[:, prev]
                k += 1
            means.append(mu)
        return torch.stack(means, dim=1)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel log-probability ``[B, H, W]`` of images ``x [B, C, H, W]`` in [0, 1]."""
        bins = _to_bins(x).unsqueeze(2)  # [B, C, 1, H, W]
        xs = bins / 127.5 - 1.0
        centered = xs - self._coupled_means(xs)
        inv_s = torch.exp(-self.log_scales)
        plus_in = inv_s * (centered + 1.0 / 255.0)
        min_in = inv_s * (centered - 1.0 / 255.0)
        log_cdf_plus = plus_in - F.softplus(plus_in)  # log sigmoid(plus_in), for bin 0
        log_one_minus_cdf_min = -F.softplus(min_in)  # log (1 - sigmoid(min_in)), for bin 255
        cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
        mid_in = inv_s * centered
        log_pdf_mid = mid_in - self.log_scales - 2.0 * F.softplus(mid_in) - math.log(127.5)
        # tiny bins (far tails) fall back to the density at the bin centre times its width
        log_mid = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp_min(1e-12)), log_pdf_mid)
        log_probs = torch.where(bins == 0, log_cdf_plus, torch.where(bins == 255, log_one_minus_cdf_min, log_mid))
        return torch.logsumexp(log_probs.sum(dim=1) + F.log_softmax(self.logits, dim=1), dim=1)

    def _mixture_index(self) -> torch.Tensor:
        gumbel = -torch.log(-torch.log(torch.rand_like(self.logits).clamp(1e-5, 1 - 1e-5)))
        return torch.argmax(self.logits + gumbel, dim=1, keepdim=True)  # [B, 1, H, W]

    def sample(self) -> torch.Tensor:
        """Images in [0, 1], quantised to 256 levels."""
        idx = self._mixture_index().unsqueeze(1)  # [B, 1, 1, H, W]
        pick = lambda t: torch.gather(t, 2, idx.expand(-1, t.shape[1], -1, -1, -1))  # noqa: E731
        means, log_s, coeffs = pick(self.means), pick(self.log_scales), pick(self.coeffs)
        u = torch.rand_like(means).clamp(1e-5, 1 - 1e-5)
        noise = log_s.exp() * (torch.log(u) - torch.log1p(-u))
        xs, k = [], 0
        for ch in range(self.c):
            mu = means[:, ch]
            for prev in range(ch):
                mu = mu + coeffs[:, k] * xs[prev]
                k += 1
            xs.append((mu + noise[:, ch]).clamp(-1, 1))
        return torch.round((torch.cat(xs, dim=1) + 1) * 127.5) / 255.0

    def mean(self) -> torch.Tensor:
        """Mean image in [0, 1]: E[v] / 255 of the discretised mixture, via E[v] = sum_{v=1}^{255}
        P(v' >= v) per component. Exact for grey images; for RGB each component couples its
        channels to its own expected previous channels, exact up to the edge bins' non-linearity
        (the exact coupled mean would need 256^C terms per pixel)."""
        w = F.softmax(self.logits, dim=1)  # [B, M, H, W]
        xs, k = [], 0  # per-component expected values in [-1, 1], [B, M, H, W] each
        for ch in range(self.c):
            mu = self.means[:, ch]
            for prev in range(ch):
                mu = mu + self.coeffs[:, k] * xs[prev]
                k += 1
            xs.append(_expected_level(mu, self.log_scales[:, ch]) / 127.5 - 1.0)
        return (torch.stack([(w * x).sum(dim=1) for x in xs], dim=1) + 1) / 2


def _expected_level(mu: torch.Tensor, log_scale: torch.Tensor, max_elements: int = 1 << 26) -> torch.Tensor:
    """E[v] in 0..255 of a discretised logistic with location ``mu`` (in [-1, 1] units): the sum of
    P(v' >= v) = sigmoid((mu - b_v) / s) over the 255 bin boundaries b_v, in chunks of boundaries
    that keep the temporary below ``max_elements`` floats."""
    chunk = max(1, min(255, max_elements // max(1, mu.numel())))
    inv_s = torch.exp(-log_scale).unsqueeze(-1)
    bounds = torch.arange(1, 256, device=mu.device, dtype=mu.dtype) / 127.5 - 1.0 - 1.0 / 255.0
    total = torch.zeros_like(mu)
    for start in range(0, 255, chunk):
        b = bounds[start : start + chunk]
        total = total + torch.sigmoid((mu.unsqueeze(-1) - b) * inv_s).sum(-1)
    return total


class Bernoulli(Likelihood):
    """Per-pixel Bernoulli for binarised images (targets binarised at 0.5)."""

    def __init__(self, params: torch.Tensor, channels: int, num_mix: int = 0):
        self.logits = params.float()

    @staticmethod
    def num_params(channels: int, num_mix: int = 0) -> int:
        return channels

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        target = (x.float() > 0.5).float()
        return -F.binary_cross_entropy_with_logits(self.logits, target, reduction="none").sum(dim=1)

    def sample(self) -> torch.Tensor:
        return torch.bernoulli(torch.sigmoid(self.logits))

    def mean(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)


LIKELIHOODS = {"logistic_mixture": DiscMixLogistic, "bernoulli": Bernoulli}
