"""uint8 image stacks as PNG tiles, and the float tensors the models take (shared by the LMDB
stores and the data pipelines)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights, as PIL's "L" conversion


def encode_stack(images: np.ndarray) -> bytes:
    """PNG bytes of uint8 ``images [n, H, W, C]`` (C in 1, 3, 4) tiled vertically."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected uint8 images [n, H, W, C] with C in (1, 3, 4), got {images.dtype} {images.shape}")
    n, h, w, c = images.shape
    tile = images.reshape(n * h, w, c)
    buf = io.BytesIO()
    Image.fromarray(tile[..., 0] if c == 1 else tile).save(buf, format="PNG")
    return buf.getvalue()


def decode_stack(data: bytes, shape: Sequence[int]) -> np.ndarray:
    """uint8 ``[n, H, W, C]`` from PNG bytes written by ``encode_stack`` (ValueError if it is not that)."""
    n, h, w, c = shape
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        tile = np.asarray(img)
    if tile.ndim == 2:
        tile = tile[..., None]
    if tile.shape != (n * h, w, c) or tile.dtype != np.uint8:
        raise ValueError(f"decoded {tile.dtype} tile {tile.shape}, expected uint8 {(n * h, w, c)}")
    return tile.reshape(n, h, w, c)


def to_tensor(images: np.ndarray, channels: int | None = None) -> torch.Tensor:
    """Float ``[..., C, H, W]`` in [0, 1] from uint8 ``[..., H, W, C]``; RGB -> grey if ``channels`` is 1."""
    x = torch.from_numpy(images).movedim(-1, -3).float().div_(255)
    if channels == 1 and x.shape[-3] == 3:
        x = quantize(luminance(x))
    return x


def luminance(rgb: torch.Tensor) -> torch.Tensor:
    """Grey ``[..., 1, H, W]`` from ``rgb [..., 3, H, W]`` (BT.601 weights, as PIL's "L"; linear)."""
    w = torch.tensor(_LUMA, dtype=rgb.dtype, device=rgb.device).view(3, 1, 1)
    return (rgb * w).sum(dim=-3, keepdim=True)


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Round [0, 1] values to the 8-bit grid k / 255 (what the discretised likelihood assumes)."""
    return x.clamp(0, 1).mul_(255).round_().div_(255)
