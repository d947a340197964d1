"""Evaluation maths as pure tensor functions (DESIGN.md section 3).

- ``log_mean_exp``: the importance-weighted estimate log (1/S) sum_s w_s from log-weights.
- ``mse`` / ``psnr`` / ``ssim``: per-image image metrics ``[B]`` for images in [0, data_range].
  ``ssim`` is a vectorised re-implementation of torchmetrics' default
  ``structural_similarity_index_measure`` (Gaussian window 11x11, sigma 1.5, K1 = 0.01,
  K2 = 0.03, reflection padding, mean over every pixel); tests check that they agree.
- ``sample_metrics``: best-of-N and mean-of-N of those metrics for N samples per item.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# lower bound on the MSE inside PSNR: identical images give 10 log10(1 / 1e-10) = 100 dB, not inf
MSE_FLOOR = 1e-10
IMAGE_METRICS = ("mse", "psnr", "ssim")
HIGHER_IS_BETTER = {"mse": False, "psnr": True, "ssim": True}


def log_mean_exp(log_w: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``log (1/S) sum_s exp(log_w_s)`` over ``dim`` (stable, fp32 or wider)."""
    return torch.logsumexp(log_w, dim=dim) - math.log(log_w.shape[dim])


def central_crop(images: torch.Tensor, crop: int) -> torch.Tensor:
    """Drop ``crop`` border pixels of ``[..., H, W]`` images (0: unchanged)."""
    if crop < 0 or 2 * crop >= min(images.shape[-2:]):
        raise ValueError(f"crop={crop} leaves no pixels of {tuple(images.shape[-2:])} images")
    return images[..., crop : images.shape[-2] - crop, crop : images.shape[-1] - crop] if crop else images


def _check(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape or pred.dim() != 4:
        raise ValueError(f"expected two [B, C, H, W] image batches of one shape, got {tuple(pred.shape)} and {tuple(target.shape)}")


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error ``[B]`` of ``[B, C, H, W]`` images."""
    _check(pred, target)
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image peak signal-to-noise ratio in dB ``[B]``: 10 log10(range^2 / MSE), MSE floored
    at ``MSE_FLOOR``."""
    return 10.0 * torch.log10(data_range**2 / mse(pred, target).clamp_min(MSE_FLOOR))


def gaussian_window(kernel_size: int = 11, sigma: float = 1.5, dtype=torch.float32, device=None) -> torch.Tensor:
    """Normalised 2-D Gaussian window ``[kernel_size, kernel_size]``."""
    if kernel_size < 1 or kernel_size % 2 == 0 or sigma <= 0:
        raise ValueError(f"need an odd kernel_size >= 1 and sigma > 0, got {kernel_size}, {sigma}")
    x = torch.arange(kernel_size, dtype=dtype, device=device) - (kernel_size - 1) / 2
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(
    pred: torch.Tensor,
    target: torch.Tensor,
    data_range: float = 1.0,
    kernel_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Per-image structural similarity ``[B]`` (mean SSIM map over channels and pixels).

    Local statistics come from a Gaussian window on the reflection-padded images (as torchmetrics);
    images must be larger than ``kernel_size // 2`` pixels on each side.
    """
    _check(pred, target)
    pred, target = pred.float(), target.float()
    c = pred.shape[1]
    pad = kernel_size // 2
    if min(pred.shape[-2:]) <= pad:
        raise ValueError(f"SSIM with a {kernel_size}px window needs images larger than {pad}px, got {tuple(pred.shape[-2:])}")
    window = gaussian_window(kernel_size, sigma, pred.dtype, pred.device).expand(c, 1, -1, -1)
    x = F.pad(torch.cat([pred, target]), (pad, pad, pad, pad), mode="reflect")
    y = x[pred.shape[0] :]
    x = x[: pred.shape[0]]
    stats = F.conv2d(torch.cat([x, y, x * x, y * y, x * y]), window, groups=c).chunk(5)
    mu_x, mu_y, xx, yy, xy = stats
    var_x = (xx - mu_x**2).clamp_min(0)
    var_y = (yy - mu_y**2).clamp_min(0)
    cov = xy - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)


METRIC_FNS = {"mse": mse, "psnr": psnr, "ssim": ssim}


def image_metrics(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> dict[str, torch.Tensor]:
    """MSE, PSNR and SSIM per image ``[B]``."""
    return {"mse": mse(pred, target), "psnr": psnr(pred, target, data_range), "ssim": ssim(pred, target, data_range)}


def sample_metrics(samples: torch.Tensor, target: torch.Tensor, crop: int = 0, data_range: float = 1.0) -> dict[str, torch.Tensor]:
    """Best-of-N and mean-of-N image metrics of ``samples [B, N, C, H, W]`` against ``target
    [B, C, H, W]`` over the central crop: ``{mse,psnr,ssim}_{best,mean}``, each ``[B]``.

    Best-of-N picks, per item and per metric, the best of the N samples (lowest MSE, highest PSNR
    and SSIM); mean-of-N averages the metric over the N samples.
    """
    if samples.dim() != 5 or samples.shape[0] != target.shape[0] or samples.shape[2:] != target.shape[1:]:
        raise ValueError(f"expected samples [B, N, C, H, W] and target [B, C, H, W], got {tuple(samples.shape)} and {tuple(target.shape)}")
    b, n = samples.shape[:2]
    flat = central_crop(samples.flatten(0, 1), crop)
    ref = central_crop(target, crop).repeat_interleave(n, dim=0)
    out = {}
    for name, values in image_metrics(flat, ref, data_range).items():
        values = values.view(b, n)
        best = values.amax(1) if HIGHER_IS_BETTER[name] else values.amin(1)
        out[f"{name}_best"], out[f"{name}_mean"] = best, values.mean(1)
    return out
