"""Occluder pasting for FusionT-LESS (docs/design.md §2), vectorised over a whole batch.

Images are premultiplied RGBA (colour already multiplied by alpha; black where alpha is 0), as
stored by ``datamodules.make_tless``. Each view gets ``n`` occluders, n uniform in
[n_occluders_low, n_occluders_high], composited in slot order with the "over" operator. Occluder
j is pasted as an ``occluder_size * s`` pixel square (s ~ U[scale_low, scale_high]) rotated by U[-max_rotation,
max_rotation] degrees, its centre at the image centre plus a U[-max_shift, max_shift] pixel
offset in x and y. All occluders of a batch are warped by one ``affine_grid`` + ``grid_sample``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from datamodules.images import luminance, quantize, to_tensor
from datamodules.lmdb_store import LMDBReader
from datamodules.parallel import parallel_map


@dataclass(frozen=True)
class PasteParams:
    """How occluders are pasted into a view (sizes in pixels of the output image)."""

    n_occluders_low: int = 5  # occluders per view, uniform in [n_occluders_low, n_occluders_high]
    n_occluders_high: int = 8
    occluder_size: int = 50  # side of the pasted occluder square before scale jitter
    scale_low: float = 0.9  # scale jitter s ~ U[scale_low, scale_high]
    scale_high: float = 1.1
    max_shift: float = 4.0  # centre offset from the image centre, per axis
    max_rotation: float = 180.0  # degrees; 180 = any orientation

    def __post_init__(self) -> None:
        low, high = self.n_occluders_low, self.n_occluders_high
        if not 0 <= low <= high or high < 1:
            raise ValueError(f"need 0 <= n_occluders_low <= n_occluders_high, n_occluders_high >= 1; got {low}, {high}")
        if self.occluder_size < 1 or not 0 < self.scale_low <= self.scale_high:
            raise ValueError(
                f"need occluder_size >= 1 and 0 < scale_low <= scale_high, got {self.occluder_size}, "
                f"{self.scale_low}, {self.scale_high}"
            )
        if self.max_shift < 0 or self.max_rotation < 0:
            raise ValueError(f"max_shift and max_rotation must be >= 0, got {self.max_shift}, {self.max_rotation}")


@dataclass
class Placements:
    """Occluder slots of ``N`` views (J = n_occluders_high): ``index`` / ``valid`` ``[N, J]``, ``theta``
    ``[N, J, 2, 3]`` (``affine_grid`` matrices, output -> occluder coordinates); slot j used iff ``valid``."""

    index: torch.Tensor
    valid: torch.Tensor
    theta: torch.Tensor


def draw_placements(
    n: int, pool_size: int, image_size: int, p: PasteParams, generator: torch.Generator | None = None
) -> Placements:
    """Random occluder choices, counts and poses for ``n`` views (drawn for every slot, used or not)."""
    g, slots = generator, p.n_occluders_high
    counts = torch.randint(p.n_occluders_low, p.n_occluders_high + 1, (n, 1), generator=g)
    index = torch.randint(0, pool_size, (n, slots), generator=g)
    angle = (torch.rand((n, slots), generator=g) * 2 - 1) * math.radians(p.max_rotation)
    scale = p.scale_low + (p.scale_high - p.scale_low) * torch.rand((n, slots), generator=g)
    shift = (torch.rand((n, slots, 2), generator=g) * 2 - 1) * p.max_shift  # pixels (x, y)
    # Output coordinate u (normalised to [-1, 1]) -> occluder coordinate v = k R(-angle) (u - c).
    k = image_size / (p.occluder_size * scale)
    cos, sin = torch.cos(angle) * k, torch.sin(angle) * k
    a = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)  # [n, slots, 2, 2]
    centre = shift * (2.0 / image_size)
    t = -(a @ centre.unsqueeze(-1))
    return Placements(index, torch.arange(slots) < counts, torch.cat([a, t], dim=-1))


def paste(
    background: torch.Tensor, occluders: torch.Tensor, placements: Placements
) -> tuple[torch.Tensor, torch.Tensor]:
    """Composite ``occluders`` (``[P, C + 1, s, s]`` premultiplied, uint8 or float in [0, 1], chosen by
    ``placements.index``) over ``background [N, C, H, W]``; returns the images and the coverage
    ``1 - prod(1 - alpha)`` ``[N, 1, H, W]`` (0 exactly where nothing was pasted)."""
    n, c, h, w = background.shape
    used = placements.valid.t()  # slot-major, so each slot's layers are contiguous
    chosen = occluders[placements.index.t()[used]]  # [M, C + 1, s, s], only the used slots
    if chosen.dtype == torch.uint8:
        chosen = chosen.float().div_(255)
    grid = F.affine_grid(placements.theta.transpose(0, 1)[used], [len(chosen), c + 1, h, w], align_corners=False)
    layers = F.grid_sample(chosen, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out, clear = background.clone(), background.new_ones((n, 1, h, w))
    start = 0
    for rows in (slot.nonzero().squeeze(1) for slot in used):  # "over", in slot order, all views at once
        layer = layers[start : start + len(rows)]
        start += len(rows)
        colour, transmit = layer[:, :c], 1 - layer[:, c:]
        out[rows] = colour + transmit * out[rows]
        clear[rows] = clear[rows] * transmit
    return out, 1 - clear


def object_targets(rgba: np.ndarray, image_size: int, channels: int) -> torch.Tensor:
    """Float targets ``[B, C, S, S]`` on the 8-bit grid: premultiplied object colour (the object on
    black), area-resized to ``image_size``, grey (luminance) if ``channels`` is 1."""
    colour = to_tensor(rgba)[:, :3]
    colour = F.interpolate(colour, size=(image_size, image_size), mode="area")
    return quantize(luminance(colour) if channels == 1 else colour)


def compose_views(
    targets: torch.Tensor,
    bank: torch.Tensor,
    k_max: int,
    params: PasteParams,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``k_max`` occluded copies of each target ``[B, C, S, S]``: ``[B, k_max, C, S, S]`` on the
    8-bit grid, plus the coverage ``[B, k_max, 1, S, S]``. ``bank``: uint8 ``[P, C + 1, s, s]``.
    ``generator``: one for the whole batch, or one per target (each target's placements come from
    its own generator; the pasting stays one batched call), or None for torch's global RNG."""
    b, c, s, _ = targets.shape
    if bank.shape[1] != c + 1:
        raise ValueError(f"occluder bank has {bank.shape[1] - 1} colour channels, targets have {c}")
    if isinstance(generator, (list, tuple)):
        if len(generator) != b:
            raise ValueError(f"{len(generator)} generators for {b} targets; give one per target")
        parts = [draw_placements(k_max, len(bank), s, params, g) for g in generator]
        placements = Placements(*(torch.cat([getattr(p, f) for p in parts]) for f in ("index", "valid", "theta")))
    else:
        placements = draw_placements(b * k_max, len(bank), s, params, generator)
    background = targets.repeat_interleave(k_max, dim=0)  # [B * k_max, C, S, S], view-minor
    out, coverage = paste(background, bank, placements)
    return quantize(out).view(b, k_max, c, s, s), coverage.view(b, k_max, 1, s, s)


def _bank_chunk(indices: range, reader: LMDBReader, size: int, channels: int) -> np.ndarray:
    rgba = to_tensor(reader.get_many(indices)[:, 0])  # [B, 4, H, W] premultiplied
    rgba = F.interpolate(rgba, size=(size, size), mode="area")
    colour = luminance(rgba[:, :3]) if channels == 1 else rgba[:, :3]
    return torch.cat([colour, rgba[:, 3:]], 1).mul_(255).round_().to(torch.uint8).numpy()  # numpy: plain pickling


def load_occluder_bank(
    reader: LMDBReader, size: int, channels: int, workers: int | None = None, progress: bool = True, chunk: int = 256
) -> torch.Tensor:
    """All occluders of ``reader`` decoded once and area-resized to the paste size: uint8
    ``[P, C + 1, size, size]`` (premultiplied colour + alpha). Kept in memory: every view pastes
    5-8 of them, and decoding them per batch would dominate the loader time."""
    chunks = [range(i, min(i + chunk, len(reader))) for i in range(0, len(reader), chunk)]
    fn = partial(_bank_chunk, reader=reader, size=size, channels=channels)
    workers = 0 if len(chunks) == 1 else workers
    parts = parallel_map(fn, chunks, workers, "T-LESS occluder bank", chunksize=1, progress=progress)
    return torch.from_numpy(np.concatenate(list(parts)))
