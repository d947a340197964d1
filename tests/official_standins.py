"""Small stand-ins for the OFFICIAL FusionVAE LMDBs, written the way the authors' code writes them.

As in ``create_fusion_celeba_lmdb.py``: ``lmdb.open(<dir>/<name>.lmdb, map_size=1e12)``, one write
transaction, key ``str(i).encode()`` (no zero padding), no metadata record, value = the bytes of
``cv2.imencode(".png", image)`` of an RGB(A) array. cv2 reads a 3/4-channel array as BGR(A), so
the PNG holds the colour channels reversed (alpha stays last); ``cv2_png`` emulates this with PIL.
Validation records are 4 square tiles side by side: ``[view 1, view 2, view 3, target]``.

The makers return the TRUE images (RGB order, before the cv2 swap) so tests can compare exactly.
Every tile of a validation record gets a marker in its top-left 4x4 corner (``TILE_MARKERS``) so the
tile order and the colours are checked pixel for pixel.
"""

from __future__ import annotations

import io
from pathlib import Path

import lmdb
import numpy as np
from PIL import Image, ImageDraw

CELEBA_NAMES = {"train": "train.lmdb", "valid": "valid.lmdb"}
TLESS_NAMES = {
    "objects": "train128x128cropped5socketClasses.lmdb",
    "occluders": "train100x100_overlay_imgs_12classes.lmdb",
    "valid": "valid64x64_augOcc_5socketClasses.lmdb",
}
TILE_MARKERS = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)], dtype=np.uint8)  # views 1-3, target
GREY_MARKERS = np.array([40, 90, 160, 230], dtype=np.uint8)
TLESS_FORMATS = ("grey", "rgb", "rgba")


def cv2_png(image: np.ndarray) -> bytes:
    """PNG bytes as ``cv2.imencode(".png", image)`` gives them for a uint8 ``[H, W]`` / ``[H, W, C]`` array
    in RGB(A) order: colour channels reversed (BGR(A) -> stored RGB(A)), grey unchanged."""
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 3 and image.shape[-1] >= 3:
        image = image[..., [2, 1, 0, *range(3, image.shape[-1])]]
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def side_by_side(tiles: np.ndarray) -> np.ndarray:
    """``[n, H, W, C]`` -> ``[H, n * W, C]``: the official multi-image record layout."""
    return np.concatenate(list(tiles), axis=1)


def write_official_lmdb(path: str | Path, records: list[bytes]) -> Path:
    """Write ``records`` under keys b"0" .. b"n-1" as the official scripts do (no metadata)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(path), map_size=int(1e12))
    try:
        with env.begin(write=True) as txn:
            for i, data in enumerate(records):
                txn.put(str(i).encode(), data)
    finally:
        env.close()
    return path


def _stacks(rng: np.random.Generator, n: int, size: int, grey: bool) -> np.ndarray:
    """``[n, 4, size, size, C]`` validation stacks: views = target with random holes, plus tile markers."""
    c = 1 if grey else 3
    target = rng.integers(0, 256, (n, 1, size, size, c), dtype=np.uint8)
    keep = rng.random((n, 3, size, size, 1)) < 0.6
    stacks = np.concatenate([target * keep, target], axis=1).astype(np.uint8)
    markers = GREY_MARKERS[:, None] if grey else TILE_MARKERS
    stacks[:, :, :4, :4] = markers[None, :, None, None]
    return stacks


def make_celeba_official(
    root: str | Path, n_train: int = 12, n_valid: int = 6, size: int = 64, seed: int = 0, train_tiles: int = 1
) -> dict[str, np.ndarray]:
    """``<root>/train.lmdb`` (faces; ``train_tiles`` > 1 writes that many tiles with the face last)
    and ``<root>/valid.lmdb``; returns the true RGB ``train [n, H, W, 3]`` and ``valid [n, 4, H, W, 3]``."""
    root, rng = Path(root), np.random.default_rng(seed)
    faces = rng.integers(0, 256, (n_train, size, size, 3), dtype=np.uint8)
    faces[:, :4, :4] = (255, 0, 0)  # pure red: a channel swap shows
    faces[:, :4, -4:] = (0, 0, 255)  # and pure blue on the right: a flip shows
    other = np.full((size, (train_tiles - 1) * size, 3), 77, dtype=np.uint8)  # tiles before the face
    train = [np.concatenate([other, face], axis=1) for face in faces]
    valid = _stacks(rng, n_valid, size, grey=False)
    write_official_lmdb(root / CELEBA_NAMES["train"], [cv2_png(img) for img in train])
    write_official_lmdb(root / CELEBA_NAMES["valid"], [cv2_png(side_by_side(s)) for s in valid])
    return {"train": faces, "valid": valid}


def tless_image(rng: np.random.Generator, size: int, fmt: str) -> np.ndarray:
    """One object on black (``grey`` ``[H, W, 1]`` / ``rgb`` ``[H, W, 3]``; object pixels never all 0),
    or ``rgba`` ``[H, W, 4]`` with colour noise everywhere and alpha = the object (soft 128 rim)."""
    mask = Image.new("L", (size, size))
    x0, y0 = rng.integers(2, size // 3, 2)
    x1, y1 = rng.integers(2 * size // 3, size - 2, 2)
    ImageDraw.Draw(mask).ellipse([x0, y0, x1, y1], fill=128)
    ImageDraw.Draw(mask).ellipse([x0 + 3, y0 + 3, x1 - 3, y1 - 3], fill=255)
    alpha = np.asarray(mask)[..., None]
    colour = rng.integers(1, 256, (size, size, 1 if fmt == "grey" else 3), dtype=np.uint8)
    if fmt == "rgba":
        return np.concatenate([colour, alpha], -1)
    return colour * (alpha > 0)


def make_tless_official(
    root: str | Path, fmt: str = "grey", n_objects: int = 10, n_occluders: int = 12, n_valid: int = 6, seed: int = 0
) -> dict[str, np.ndarray]:
    """The three official T-LESS LMDBs under ``root``, objects / occluders in format ``fmt`` (grey,
    rgb or rgba) and grey (``fmt`` grey) or RGB validation stacks; returns the true images."""
    if fmt not in TLESS_FORMATS:
        raise ValueError(f"fmt must be one of {TLESS_FORMATS}, got {fmt!r}")
    root, rng = Path(root), np.random.default_rng(seed)
    out = {
        "objects": np.stack([tless_image(rng, 128, fmt) for _ in range(n_objects)]),
        "occluders": np.stack([tless_image(rng, 100, fmt) for _ in range(n_occluders)]),
        "valid": _stacks(rng, n_valid, 64, grey=fmt == "grey"),
    }
    for role in ("objects", "occluders"):
        write_official_lmdb(root / TLESS_NAMES[role], [cv2_png(img) for img in out[role]])
    write_official_lmdb(root / TLESS_NAMES["valid"], [cv2_png(side_by_side(s)) for s in out["valid"]])
    return out
