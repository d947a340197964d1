"""A folder of the user's images: what it holds, how it is split, how an image is made square.

``scan_folder`` lists every image below a folder (PNG, JPEG, BMP, WebP, TIFF; hidden files and
folders left out) as sorted relative paths, with a fingerprint of the paths, sizes and modification
times: a changed folder gives another fingerprint, so its stale LMDB is refused.

Splits (``split_files``): with a top-level ``train/`` folder, its images train, those in ``val/``
(or ``valid/``) validate and those in ``test/`` test (none: the validation set is the test set).
Otherwise every image is ranked by sha256(``split_seed``, relative path); the first
round(val_fraction N) (at least 1) validate, the next round(test_fraction N) (at least 1 when the
fraction is > 0) test, the rest train. The rule depends only on the names and the seed, not on the
file system's order, and adding images moves few of the others.

``fit_image``: EXIF orientation applied, transparency composited on black, 16-bit grey scaled to
8 bits, converted to grey (L, BT.601) or RGB, centre-cropped to a square and area-resized with
FusionCelebA's exact area weights (``make_celeba.area_resize``).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from datamodules.errors import DataError
from datamodules.make_celeba import area_resize

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
SPLIT_FOLDERS = {"train": ("train",), "valid": ("val", "valid"), "test": ("test",)}
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)  # what PIL raises for bad files


@dataclass(frozen=True)
class FolderScan:
    root: Path
    files: tuple[str, ...]  # relative POSIX paths, sorted
    fingerprint: str  # sha256 of the (path, size, mtime) lines


def list_images(root: Path) -> list[str]:
    """Relative POSIX paths of the image files below ``root``, sorted; hidden entries skipped."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = Path(folder).relative_to(root)
        found += [(rel / f).as_posix() for f in files if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES)]
    return sorted(found)


def scan_folder(root: str | Path) -> FolderScan:
    """The images below ``root`` and their fingerprint (FileNotFoundError / DataError: none)."""
    root = Path(os.path.realpath(Path(root).expanduser()))
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root} (set dataset.path=<folder of images>)")
    files = list_images(root)
    if not files:
        raise DataError(
            f"image folder {root} holds no images ({', '.join(s[1:] for s in IMAGE_SUFFIXES)} files, searched "
            f"in every sub-folder): point dataset.path at a folder of images"
        )
    digest = hashlib.sha256()
    for rel in files:
        stat = os.stat(root / rel)
        digest.update(f"{rel}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return FolderScan(root, tuple(files), digest.hexdigest())


def _rank(seed: int, rel: str) -> bytes:
    return hashlib.sha256(f"{seed}\0{rel}".encode()).digest()


def split_files(
    scan: FolderScan, val_fraction: float, test_fraction: float, seed: int
) -> tuple[str, dict[str, list[str]]]:
    """``(rule, {"train": [...], "valid": [...], "test": [...]})``: relative paths per split, sorted;
    ``rule`` is ``folders`` (train/ val/ test/ sub-folders) or ``seeded``."""
    files = scan.files
    if any(f.startswith("train/") for f in files):
        parts = {s: [f for f in files if f.split("/", 1)[0] in names] for s, names in SPLIT_FOLDERS.items()}
        outside = [f for f in files if f.split("/", 1)[0] not in sum(SPLIT_FOLDERS.values(), ())]
        if outside:
            raise DataError(
                f"image folder {scan.root} has a train/ folder, so its images are split by folder, but "
                f"{len(outside)} image(s) are outside train/, val/ and test/ (first: {outside[0]}): move or remove them"
            )
        return "folders", parts
    if not (0 < val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError(
            f"need 0 < dataset.val_fraction, 0 <= dataset.test_fraction and a sum below 1; got "
            f"{val_fraction} and {test_fraction}"
        )
    n = len(files)
    n_val = max(1, round(val_fraction * n))
    n_test = max(1, round(test_fraction * n)) if test_fraction > 0 else 0
    ranked = sorted(files, key=lambda rel: _rank(seed, rel))
    chosen = {"valid": ranked[:n_val], "test": ranked[n_val : n_val + n_test], "train": ranked[n_val + n_test :]}
    return "seeded", {s: sorted(chosen[s]) for s in SPLIT_FOLDERS}


def check_counts(root: Path, rule: str, counts: dict[str, int], batch_size: int) -> None:
    """DataError unless there is one training batch and a validation image."""
    if counts["train"] >= batch_size and counts["valid"] >= 1:
        return
    split = ", ".join(f"{counts[s]} {s}" for s in SPLIT_FOLDERS)
    how = "the train/ and val/ folders" if rule == "folders" else "dataset.val_fraction / dataset.test_fraction"
    raise DataError(
        f"image folder {root} has too few images for the split: {sum(counts.values())} images give {split} "
        f"({how}); training needs at least dataset.batch_size={batch_size} training images and one "
        f"validation image: add images, or lower dataset.batch_size"
    )


def _pixels(img: Image.Image, channels: int) -> np.ndarray:
    """uint8 ``[H, W, channels]`` of a PIL image."""
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I;16"):  # 16-bit grey: keep the top 8 bits
        img = Image.fromarray((np.asarray(img).astype(np.uint32) >> 8).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    arr = np.asarray(img.convert("L" if channels == 1 else "RGB"))
    return arr[..., None] if arr.ndim == 2 else arr


def load_pixels(path: str | Path, channels: int) -> np.ndarray:
    """uint8 ``[H, W, channels]`` of an image file (upright, on black, grey or RGB)."""
    with Image.open(path) as img:
        return _pixels(img, channels)


def fit_array(arr: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``[size, size, C]``: ``arr [H, W, C]`` centre-cropped to a square, area-resized."""
    h, w = arr.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return area_resize(arr[top : top + side, left : left + side], size)


def fit_image(path: str | Path, size: int, channels: int) -> np.ndarray:
    """uint8 ``[size, size, channels]``: the image centre-cropped to a square, area-resized."""
    return fit_array(load_pixels(path, channels), size)


def why_unreadable(exc: BaseException, path: Path) -> str:
    """PIL's reason on one line, without the path it repeats."""
    return " ".join(str(exc).replace(f" '{path}'", "").split()) or type(exc).__name__


def describe_failures(root: Path, failures: list[str], total: int, noun: str = "images", shown: int = 3) -> str:
    """One line naming the unusable images or scenes (the first ``shown``) and how many there are."""
    more = f" and {len(failures) - shown} more" if len(failures) > shown else ""
    return (
        f"{len(failures)} of {total} {noun} in {root} cannot be used: {'; '.join(failures[:shown])}{more}; "
        f"fix or remove them, then run again"
    )
