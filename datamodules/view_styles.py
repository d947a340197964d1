"""How the views of a folder dataset are corrupted: the ``dataset/corruption`` config choice.

A style turns clean images into ``k_max`` views, the same way for the stored validation / test
views (one generator per record) and for training (``train_set``: fresh views at every fetch, drawn
from (seed, epoch, index)). ``params()`` is recorded in the metadata of the stored views, so a
changed setting is detected. Styles are built by Hydra from ``conf/dataset/corruption/<style>.yaml``
(its ``_target_``); a new style is a class with these three methods and a config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from datamodules.batched import CorruptedImages
from datamodules.corruption import check_corruption, make_stack


@dataclass(frozen=True)
class EllipseWindows:
    """FusionMNIST / FusionCelebA views (docs/design.md §2): ``n_ellipses`` windows with radius in
    [r_low, r_high) px, then Gaussian noise of std ``noise_std`` on every pixel, clipped to [0, 1]."""

    n_ellipses: int
    r_low: int
    r_high: int
    noise_std: float

    def __post_init__(self) -> None:
        check_corruption(self.n_ellipses, self.r_low, self.r_high, self.noise_std)

    def knobs(self) -> dict[str, Any]:
        return check_corruption(self.n_ellipses, self.r_low, self.r_high, self.noise_std)

    def params(self) -> dict[str, Any]:
        return dict(style="ellipses", **self.knobs())

    def stack(self, images: torch.Tensor, k_max: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``[N, k_max + 1, C, H, W]``: views, then the clean target."""
        return make_stack(images, k_max, generator=generator, **self.knobs())

    def train_set(self, fetch: Callable[[list[int]], torch.Tensor], length: int, k_max: int, flip: bool) -> Dataset:
        return CorruptedImages(fetch, length, k_max, self.knobs(), flip)
