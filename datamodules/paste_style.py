"""Pasted occluders as a view style (``dataset/corruption=paste``): FusionT-LESS's corruption for a
folder of images, with the occluders taken from a second folder (docs/design.md §2).

Occluders: every image below ``occluders`` (as ``folder_scan`` lists them). With an alpha channel
(RGBA, LA, palette transparency) the alpha is the occluder's mask; without one the occluder is taken
to be on black and the mask is "any channel > 0" (the official T-LESS convention). Each is padded to
a square (transparent), area-resized to ``occluder_size`` and premultiplied, then converted to the
dataset's channels: the bank ``datamodules.paste`` pastes from, loaded once per process. Each view
pastes ``n_occluders_low..n_occluders_high`` of them (``datamodules.paste.compose_views``). The
occluder folder's fingerprint is part of ``params()``, so changed occluders make the stored views
stale.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from datamodules.batched import BatchedDataset
from datamodules.errors import DataError
from datamodules.folder_scan import UNREADABLE, FolderScan, describe_failures, scan_folder, why_unreadable
from datamodules.images import luminance
from datamodules.paste import PasteParams, compose_views
from datamodules.training_order import split_keys

_BANKS: dict[tuple, torch.Tensor] = {}  # (folder, fingerprint, size, channels) -> uint8 bank, per process


def occluder_tile(path: Path) -> torch.Tensor:
    """Float premultiplied RGBA ``[4, s, s]`` of one occluder file, padded to a square."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        has_alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255
    if not has_alpha:
        rgba[..., 3] = rgba[..., :3].max(-1) > 0
    rgba[..., :3] *= rgba[..., 3:]
    h, w = rgba.shape[:2]
    side = max(h, w)
    square = np.zeros((side, side, 4), np.float32)
    square[(side - h) // 2 : (side - h) // 2 + h, (side - w) // 2 : (side - w) // 2 + w] = rgba
    return torch.from_numpy(square).permute(2, 0, 1)


def load_bank(scan: FolderScan, size: int, channels: int) -> torch.Tensor:
    """uint8 ``[P, channels + 1, size, size]``: every occluder of ``scan`` (DataError naming the unreadable ones)."""
    tiles, failures = [], []
    for rel in scan.files:
        try:
            tile = occluder_tile(scan.root / rel)
        except UNREADABLE as exc:
            failures.append(f"{rel} ({why_unreadable(exc, scan.root / rel)})")
            continue
        tiles.append(F.interpolate(tile[None], size=(size, size), mode="area")[0])
    if failures:
        raise DataError(describe_failures(scan.root, failures, len(scan.files), "occluder images"))
    rgba = torch.stack(tiles)
    colour = luminance(rgba[:, :3]) if channels == 1 else rgba[:, :3]
    return torch.cat([colour, rgba[:, 3:]], 1).mul_(255).round_().to(torch.uint8)


class PastedViews(BatchedDataset):
    """Training items: clean images from ``fetch`` (flipped horizontally with p = 0.5 if ``flip``)
    and ``k_max`` views pasted with fresh occluders, drawn per item from its key's generator."""

    def __init__(self, fetch: Callable, length: int, k_max: int, style: PastedOccluders, flip: bool):
        self.fetch, self.length, self.k_max, self.style, self.flip = fetch, length, k_max, style, flip

    def __len__(self) -> int:
        return self.length

    def __getitems__(self, keys: list) -> list[torch.Tensor]:
        indices, generators = split_keys(keys)
        clean = self.fetch(indices)
        if self.flip:
            draws = [torch.rand((), generator=g) for g in generators] if generators else torch.rand(len(clean))
            flip = (torch.as_tensor(draws) < 0.5).view(-1, 1, 1, 1)
            clean = torch.where(flip, clean.flip(-1), clean)
        return list(self.style.stack(clean, self.k_max, generators).unbind(0))


@dataclass(frozen=True)
class PastedOccluders:
    """``occluders``: the folder of occluder images; the rest: ``datamodules.paste.PasteParams``."""

    occluders: str | None
    n_occluders_low: int
    n_occluders_high: int
    occluder_size: int
    scale_low: float
    scale_high: float
    max_shift: float
    max_rotation: float

    def __post_init__(self) -> None:
        self.paste()  # checks the numbers

    def paste(self) -> PasteParams:
        fields = {k: v for k, v in asdict(self).items() if k != "occluders"}
        return PasteParams(**fields)

    def scan(self) -> FolderScan:
        if not self.occluders:
            raise DataError(
                "dataset/corruption=paste needs the occluder images: add dataset.corruption.occluders=<folder>"
            )
        return scan_folder(self.occluders)

    def bank(self, channels: int) -> torch.Tensor:
        scan = self.scan()
        key = (str(scan.root), scan.fingerprint, self.occluder_size, channels)
        if key not in _BANKS:
            _BANKS[key] = load_bank(scan, self.occluder_size, channels)
        return _BANKS[key]

    def params(self) -> dict[str, Any]:
        return dict(style="paste", occluders=self.scan().fingerprint, **asdict(self.paste()))

    def stack(self, images: torch.Tensor, k_max: int, generator=None) -> torch.Tensor:
        """``[N, k_max + 1, C, H, W]``: pasted views, then the clean target."""
        views, _ = compose_views(images, self.bank(images.shape[1]), k_max, self.paste(), generator)
        return torch.cat([views, images.unsqueeze(1)], dim=1)

    def train_set(self, fetch: Callable, length: int, k_max: int, flip: bool) -> Dataset:
        return PastedViews(fetch, length, k_max, self, flip)
