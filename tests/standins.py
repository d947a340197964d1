"""Small stand-ins for CelebA and T-LESS with the real folder layouts (no download needed).

``make_celeba(root)``: ``<root>/celeba/img_align_celeba/NNNNNN.jpg`` (178x218 RGB JPEGs with a
face-like ellipse on a gradient) and ``<root>/celeba/list_eval_partition.txt``.
``make_mnist(root)``: ``<root>/MNIST/raw/{train,t10k}-images-idx3-ubyte`` (28x28 grey rings and
strokes; for timings on a machine without MNIST).
``make_tless(root)``: a BOP tree ``<root>/train_primesense/<obj 6 digits>/{rgb,mask_visib}/`` with
``scene_gt.json`` / ``scene_gt_info.json``; each image shows one coloured object on black.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CELEBA_SIZE = (178, 218)  # PIL (width, height) of img_align_celeba


def make_celeba(root: str | Path, n_train: int = 24, n_valid: int = 8, n_test: int = 8, seed: int = 0) -> Path:
    """Write a CelebA stand-in under ``root`` and return ``root``."""
    root = Path(root)
    images = root / "celeba" / "img_align_celeba"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = CELEBA_SIZE
    y, x = np.mgrid[0:h, 0:w]
    lines = []
    for i, split in enumerate([0] * n_train + [1] * n_valid + [2] * n_test):
        base = rng.uniform(0, 255, 3)
        slope = rng.uniform(-1, 1, 3)
        pixels = base + slope * (x[..., None] * 0.5 + y[..., None] * 0.3)
        img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        cx, cy = rng.integers(60, 118), rng.integers(80, 140)  # inside the 148x148 crop
        draw.ellipse([cx - 35, cy - 45, cx + 35, cy + 45], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw.rectangle([cx - 20, cy - 15, cx - 8, cy - 8], fill=(20, 20, 20))  # an "eye"; asymmetric
        name = f"{i + 1:06d}.jpg"
        img.save(images / name, quality=92)
        lines.append(f"{name} {split}")
    (root / "celeba" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return root


def make_mnist(root: str | Path, n_train: int = 60_000, n_test: int = 10_000, seed: int = 0) -> Path:
    """Write MNIST-shaped idx image files (digit-like rings with a stroke) under ``root``; return ``root``."""
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:28, 0:28].astype(np.float32)
    for name, n in (("train", n_train), ("t10k", n_test)):
        parts = []
        for start in range(0, n, 10_000):
            m = min(10_000, n - start)
            cx, cy, a, b = (
                rng.uniform(lo, hi, (m, 1, 1)).astype(np.float32) for lo, hi in ((11, 17), (11, 17), (3, 7), (5, 9))
            )
            ring = np.abs(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 - 1) < 0.45
            stroke = (np.abs(x - cx - (y - cy) * rng.uniform(-0.5, 0.5, (m, 1, 1))) < 1.2) & (np.abs(y - cy) < b)
            parts.append(np.where(ring | (stroke & (rng.random((m, 1, 1)) < 0.5)), 255, 0).astype(np.uint8))
        header = np.array([0x0803, n, 28, 28], dtype=">u4").tobytes()
        (raw / f"{name}-images-idx3-ubyte").write_bytes(header + np.concatenate(parts).tobytes())
    return Path(root)


def make_tless(
    root: str | Path,
    object_ids: Sequence[int] = (1, 2, 3, 4, 5),
    occluder_ids: Sequence[int] = (6, 7, 8),
    per_object: int = 6,
    size: int = 96,
    seed: int = 0,
) -> Path:
    """Write a BOP-layout T-LESS stand-in (``per_object`` images per object) and return ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for obj in [*object_ids, *occluder_ids]:
        scene = root / "train_primesense" / f"{obj:06d}"
        (scene / "rgb").mkdir(parents=True, exist_ok=True)
        (scene / "mask_visib").mkdir(parents=True, exist_ok=True)
        gt, info = {}, {}
        for im in range(per_object):
            mask = Image.new("L", (size, size))
            x0, y0 = rng.integers(5, size // 3, 2)
            x1, y1 = rng.integers(2 * size // 3, size - 5, 2)
            ImageDraw.Draw(mask).ellipse([x0, y0, x1, y1], fill=255)
            ImageDraw.Draw(mask).rectangle([x0, (y0 + y1) // 2, (x0 + x1) // 2, y1], fill=255)
            colour = rng.integers(60, 256, 3)
            texture = rng.integers(-40, 40, (size, size, 1))
            rgb = np.clip(colour + texture, 0, 255).astype(np.uint8) * (np.asarray(mask)[..., None] > 0)
            Image.fromarray(rgb).save(scene / "rgb" / f"{im:06d}.png")
            mask.save(scene / "mask_visib" / f"{im:06d}_000000.png")
            ys, xs = np.nonzero(np.asarray(mask))
            bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
            gt[str(im)] = [{"cam_R_m2c": [1, 0, 0, 0, 1, 0, 0, 0, 1], "cam_t_m2c": [0, 0, 700], "obj_id": obj}]
            info[str(im)] = [
                {
                    "bbox_obj": bbox,
                    "bbox_visib": bbox,
                    "px_count_all": len(xs),
                    "px_count_visib": len(xs),
                    "visib_fract": 1.0,
                }
            ]
        (scene / "scene_gt.json").write_text(json.dumps(gt))
        (scene / "scene_gt_info.json").write_text(json.dumps(info))
    return root
