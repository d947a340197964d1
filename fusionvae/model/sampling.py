"""Drawing fused images and the image grid: one path for the training callback, evaluation and
``fuse``, and the single place where sampling leaves autocast (the likelihood runs in fp32).

- ``draw``: N images per item from p(y | x) at temperature t (``decode``: the likelihood's
  "mean" image of each z, or a pixel "sample" of it); t = 0 with "mean" is the mean image;
- ``fusion_grid``: one labelled row per item: the k_max input slots (unused ones crossed out),
  the target, then a column per temperature (the mean image at t = 0);
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torchvision.utils import make_grid

DECODE_MODES = ("mean", "sample")
MIN_CELL = 64  # smaller images are enlarged (nearest) to at least this many pixels per side
PAD = 2


@torch.no_grad()
def draw(
    net, views: torch.Tensor, n: int = 1, t: float = 1.0, decode: str = "sample", chunk: int | None = None
) -> torch.Tensor:
    """``[B, n, C, H, W]`` images in [0, 1] decoded from z ~ p(z | x) at temperature ``t``, ``chunk``
    z per item and forward pass (one encoder pass each)."""
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got '{decode}'")
    b, parts = views.shape[0], []
    with torch.autocast(views.device.type, enabled=False):
        for start in range(0, n, chunk or n):
            c = min(chunk or n, n - start)
            likelihood = net(views.float(), None, t=t, repeats=c).likelihood
            images = likelihood.mean() if decode == "mean" else likelihood.sample()
            parts.append(images.view(b, c, *images.shape[1:]))
    return torch.cat(parts, dim=1)


def mean_image(net, views: torch.Tensor) -> torch.Tensor:
    """The mean prediction ``[B, C, H, W]``: the likelihood's mean at z = the prior means (t = 0)."""
    return draw(net, views, 1, 0.0, "mean")[:, 0]


def input_columns(views: torch.Tensor, k_max: int) -> tuple[torch.Tensor, list[str]]:
    """The k_max input slots ``[B, k_max, C, H, W]``: crossed-out blanks for the missing views,
    then the K views (the model uses the last K slots), with their labels."""
    k = views.shape[1]
    blank = _crossed_out(views.new_zeros(views.shape[0], k_max - k, *views.shape[2:]))
    return torch.cat([blank, views], dim=1), ["no view"] * (k_max - k) + [f"view {i + 1}" for i in range(k)]


def _crossed_out(like: torch.Tensor) -> torch.Tensor:
    """Grey images with an X: an input slot without a view (K < k_max)."""
    size = like.shape[-1]
    blank = torch.full_like(like, 0.35)
    idx = torch.arange(size)
    blank[..., idx, idx] = 0.8
    blank[..., idx, size - 1 - idx] = 0.8
    return blank


def grid_columns(
    nets: Mapping[float, torch.nn.Module],
    views: torch.Tensor,
    target: torch.Tensor | None,
    k_max: int,
    samples_per_t: int = 1,
) -> tuple[torch.Tensor, list[str]]:
    """``[B, columns, C, H, W]`` and the column labels: k_max input slots, the target (if given),
    then for each temperature t of ``nets`` (t -> network, e.g. BN re-adjusted for t) the mean
    image (t = 0) or ``samples_per_t`` samples."""
    inputs, labels = input_columns(views, k_max)
    cols = [inputs]
    if target is not None:
        cols.append(target.unsqueeze(1))
        labels.append("target")
    for t, net in nets.items():
        if t == 0:
            cols.append(draw(net, views, 1, 0.0, "mean"))
            labels.append("mean")
        else:
            cols.append(draw(net, views, samples_per_t, t, "sample"))
            labels += [f"t={t:g}"] * samples_per_t
    images = torch.cat([c.float().cpu() for c in cols], dim=1)
    if not torch.isfinite(images).all():
        raise FloatingPointError(f"non-finite pixels in the K={views.shape[1]} grid (temperatures {list(nets)})")
    return images, labels


def fusion_grid(
    nets: Mapping[float, torch.nn.Module],
    views: torch.Tensor,
    target: torch.Tensor | None,
    k_max: int,
    samples_per_t: int = 1,
) -> torch.Tensor:
    """A labelled ``[3, H', W']`` grid in [0, 1] of ``grid_columns`` (small images enlarged)."""
    return render_grid(*grid_columns(nets, views, target, k_max, samples_per_t))


def render_grid(images: torch.Tensor, labels: Sequence[str]) -> torch.Tensor:
    """Rows of ``images [B, columns, C, H, W]`` under a header of column ``labels``: ``[3, H', W']``."""
    size = images.shape[-1]
    scale = max(1, -(-MIN_CELL // size))
    if scale > 1:
        images = images.repeat_interleave(scale, dim=-1).repeat_interleave(scale, dim=-2)
    grid = make_grid(images.flatten(0, 1), nrow=images.shape[1], padding=PAD, pad_value=0.5)
    return add_header(grid, labels, images.shape[-1])


def add_header(grid: torch.Tensor, labels: Sequence[str], cell: int) -> torch.Tensor:
    """``grid`` with a strip of column labels on top (PIL's built-in font)."""
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (grid.shape[-1], 14), (255, 255, 255))
    pen = ImageDraw.Draw(strip)
    for i, label in enumerate(labels):
        pen.text((PAD + i * (cell + PAD) + 2, 1), label, fill=(0, 0, 0))
    header = torch.from_numpy(np.array(strip)).permute(2, 0, 1).float() / 255
    return torch.cat([header, grid.expand(3, -1, -1)], dim=1)
