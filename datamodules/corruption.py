"""Vectorised "ellipse window" corruption, as the official FusionVAE data code makes it.

For each view, ``n_ellipses`` ellipses with integer radius r in [r_low, r_high), integer
centre in [1, res - 2) and elongation e ~ U[0.5, 1.5) are drawn; pixel (i, j) is visible if
sqrt(e (i - cx)^2 + (j - cy)^2 / e) <= r. A view is ``clamp(img * mask + std * N(0, 1), 0, 1)``:
the noise covers the whole image, so a pixel outside the windows (and in MNIST's padding) is
``max(0, std * N(0, 1))``, not 0 (mean ~0.0997 for std 0.25). Mask and noise are shared across
colour channels.
"""

from __future__ import annotations

import torch


def ellipse_masks(
    n: int,
    k_max: int,
    height: int,
    width: int,
    n_ellipses: int,
    r_low: int,
    r_high: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Boolean visibility masks ``[n, k_max, 1, height, width]``."""
    if r_high <= r_low:
        raise ValueError(f"ellipse radius range [r_low={r_low}, r_high={r_high}) is empty; need r_high > r_low")
    if min(height, width) < 4:
        raise ValueError(f"image {height}x{width} is too small for ellipse windows (need >= 4x4)")
    shape = (n, k_max, n_ellipses, 1, 1)
    g = generator
    r = torch.randint(r_low, r_high, shape, generator=g).float()
    cx = torch.randint(1, height - 2, shape, generator=g).float()  # row centre (i)
    cy = torch.randint(1, width - 2, shape, generator=g).float()  # column centre (j)
    e = torch.rand(shape, generator=g) + 0.5
    i = torch.arange(height, dtype=torch.float32).view(height, 1)
    j = torch.arange(width, dtype=torch.float32).view(1, width)
    dist2 = e * (i - cx) ** 2 + (j - cy) ** 2 / e  # [n, k_max, n_ellipses, H, W]
    return (dist2 <= r * r).any(dim=2, keepdim=True)


def corrupt(
    images: torch.Tensor,
    k_max: int,
    n_ellipses: int,
    r_low: int,
    r_high: int,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``k_max`` corrupted views ``[N, k_max, C, H, W]`` of clean ``images [N, C, H, W]`` in [0, 1]."""
    if images.dim() != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {tuple(images.shape)}")
    n, _, h, w = images.shape
    mask = ellipse_masks(n, k_max, h, w, n_ellipses, r_low, r_high, generator)
    out = images.unsqueeze(1) * mask
    if noise_std > 0:
        noise = torch.randn((n, k_max, 1, h, w), generator=generator)
        out = out.add_(noise_std * noise).clamp_(0.0, 1.0)
    return out


def make_stack(
    images: torch.Tensor, k_max: int, generator: torch.Generator | None = None, **corruption
) -> torch.Tensor:
    """``[N, k_max + 1, C, H, W]``: ``k_max`` corrupted views followed by the clean target."""
    noisy = corrupt(images, k_max, generator=generator, **corruption)
    return torch.cat([noisy, images.unsqueeze(1)], dim=1)


def check_corruption(n_ellipses: int, r_low: int, r_high: int, noise_std: float) -> dict:
    """Validated corruption settings (config keys ``dataset.*``) as ``corrupt`` keyword arguments."""
    if n_ellipses < 1:
        raise ValueError(f"dataset.n_ellipses must be >= 1, got {n_ellipses}")
    if not 0 <= r_low < r_high:
        raise ValueError(f"need 0 <= dataset.r_low < dataset.r_high, got r_low={r_low}, r_high={r_high}")
    if noise_std < 0:
        raise ValueError(f"dataset.noise_std must be >= 0, got {noise_std}")
    return dict(n_ellipses=n_ellipses, r_low=r_low, r_high=r_high, noise_std=noise_std)
