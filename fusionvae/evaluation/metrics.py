"""Evaluation maths as pure tensor functions (docs/design.md §3).

- ``log_mean_exp``: the importance-weighted estimate log (1/S) sum_s w_s from log-weights.
- ``IMAGE_METRICS``: per-image metrics ``[B]`` for images in [0, data_range] (MSE; PSNR and SSIM
  from ``torchmetrics.functional``). Add a metric here and every report shows it.
- ``sample_metrics``: best-of-N and mean-of-N of those metrics for N samples per item, and the
  samples' ``diversity`` (mean pairwise RMS distance; 0 for one sample or a deterministic net).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

# lower bound on the MSE inside PSNR: identical images give 10 log10(1 / 1e-10) = 100 dB, not inf
MSE_FLOOR = 1e-10
SSIM_WINDOW = 11  # torchmetrics' default Gaussian window


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
        raise ValueError(
            f"expected two [B, C, H, W] image batches of one shape, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error ``[B]`` of ``[B, C, H, W]`` images."""
    _check(pred, target)
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image peak signal-to-noise ratio in dB ``[B]`` (torchmetrics), at most
    10 log10(range^2 / ``MSE_FLOOR``) so identical images give 100 dB, not inf."""
    _check(pred, target)
    value = peak_signal_noise_ratio(
        pred.float(), target.float(), data_range=data_range, reduction="none", dim=(1, 2, 3)
    )
    return value.clamp_max(10.0 * math.log10(data_range**2 / MSE_FLOOR))


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image structural similarity ``[B]``: torchmetrics' default SSIM (Gaussian window 11x11,
    sigma 1.5, reflection padding), averaged over channels and pixels of each image."""
    _check(pred, target)
    if min(pred.shape[-2:]) <= SSIM_WINDOW // 2:
        raise ValueError(
            f"SSIM with a {SSIM_WINDOW}px window needs images larger than {SSIM_WINDOW // 2}px, "
            f"got {tuple(pred.shape[-2:])}"
        )
    return structural_similarity_index_measure(pred.float(), target.float(), data_range=data_range, reduction="none")


@dataclass(frozen=True)
class ImageMetric:
    fn: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]  # (pred, target, data_range) -> [B]
    higher_is_better: bool
    header: str  # column title in reports


# The one registry of per-image metrics: evaluation computes each as best-of-N and mean-of-N,
# reports and plots read their names, directions and headers from here.
IMAGE_METRICS = {
    "mse": ImageMetric(lambda pred, target, data_range: mse(pred, target), False, "MSE"),
    "psnr": ImageMetric(psnr, True, "PSNR"),
    "ssim": ImageMetric(ssim, True, "SSIM"),
}


def sample_metrics(
    samples: torch.Tensor, target: torch.Tensor, crop: int = 0, data_range: float = 1.0
) -> dict[str, torch.Tensor]:
    """Best-of-N and mean-of-N image metrics of ``samples [B, N, C, H, W]`` against ``target
    [B, C, H, W]`` over the central crop: ``{mse,psnr,ssim}_{best,mean}``, each ``[B]``.

    Best-of-N picks, per item and per metric, the best of the N samples (lowest MSE, highest PSNR
    and SSIM); mean-of-N averages the metric over the N samples.
    """
    if samples.dim() != 5 or samples.shape[0] != target.shape[0] or samples.shape[2:] != target.shape[1:]:
        raise ValueError(
            f"expected samples [B, N, C, H, W] and target [B, C, H, W], "
            f"got {tuple(samples.shape)} and {tuple(target.shape)}"
        )
    b, n = samples.shape[:2]
    flat = central_crop(samples.flatten(0, 1), crop)
    ref = central_crop(target, crop).repeat_interleave(n, dim=0)
    out = {}
    for name, metric in IMAGE_METRICS.items():
        values = metric.fn(flat, ref, data_range).view(b, n)
        best = values.amax(1) if metric.higher_is_better else values.amin(1)
        out[f"{name}_best"], out[f"{name}_mean"] = best, values.mean(1)
    out["diversity"] = diversity(flat.reshape(b, n, -1))
    return out


def diversity(samples: torch.Tensor) -> torch.Tensor:
    """Mean RMS distance ``[B]`` over the N (N - 1) ordered pairs of distinct samples ``[B, N, D]``
    (0 when N = 1): how different the N images drawn for one item are."""
    b, n, d = samples.shape
    if n < 2:
        return samples.new_zeros(b)
    distances = torch.cdist(samples.float(), samples.float())  # [B, N, N], zero diagonal
    return distances.sum((1, 2)) / (n * (n - 1) * math.sqrt(d))
