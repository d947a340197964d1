"""Build the FusionCelebA LMDBs from CelebA in torchvision's layout (docs/design.md §2).

    python -m datamodules.make_celeba --root DATA_DIR [--out DIR] [--workers N] [--seed S]

Input: ``<root>/celeba/img_align_celeba/*.jpg`` and ``<root>/celeba/list_eval_partition.txt``
(lines ``000001.jpg 0``; 0 train, 1 valid, 2 test). Every face is cropped to rows 40:188, columns
15:163 (148x148) and area-resized to ``image_size`` with exact fractional-overlap weights (each
output pixel is the mean of the input area it covers, partly covered pixels weighted by the
covered fraction: what cv2 ``INTER_AREA`` computes, as the official code does; PIL's ``BOX``
filter is not that for 148 -> 64), RGB.

Output (``lmdb_store`` format) under ``--out`` (default ``<root>/fusion_celeba_lmdb``):
  ``train/``  one clean ``[1, S, S, 3]`` image per record (flip and corruption happen online);
  ``valid/``, ``test/``  ``[views + 1, S, S, 3]`` per record: ``views`` corrupted views, then the
  clean target. Record i's corruption comes from its own generator seeded by (seed, split, i), so
  the stored set does not depend on the number of workers.
Existing complete LMDBs are kept when their metadata matches, refused when it does not.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from datamodules.corruption import make_stack
from datamodules.images import encode_stack
from datamodules.lmdb_store import check_meta, ensure_lmdb, is_complete, read_meta
from datamodules.parallel import parallel_map

log = logging.getLogger(__name__)

VERSION = 2  # 2: exact area resize (1 used PIL BOX). Bump when the stored content changes for the same settings
CROP_BOX = (15, 40, 163, 188)  # PIL (left, upper, right, lower): rows 40:188, columns 15:163
SPLITS = {"train": 0, "valid": 1, "test": 2}  # split name -> code in list_eval_partition.txt
OFFICIAL_COUNTS = {"train": 162_770, "valid": 19_867, "test": 19_962}


@dataclass(frozen=True)
class CelebASpec:
    """Settings that determine the stored LMDBs (all of them are recorded in the metadata)."""

    image_size: int = 64
    k_max: int = 3  # corrupted views per validation / test record
    n_ellipses: int = 4
    r_low: int = 0
    r_high: int = 15
    noise_std: float = 0.0
    seed: int = 0  # of the stored validation / test corruption

    def corruption(self) -> dict[str, Any]:
        return dict(n_ellipses=self.n_ellipses, r_low=self.r_low, r_high=self.r_high, noise_std=self.noise_std)

    def expected(self, split: str, count: int | None = None) -> dict[str, Any]:
        """Metadata an LMDB of ``split`` must carry (``count`` only checked when given)."""
        clean = split == "train"
        meta: dict[str, Any] = dict(
            kind=f"fusion_celeba/{split}",
            version=VERSION,
            shape=[1 if clean else self.k_max + 1, self.image_size, self.image_size, 3],
            channels=3,
            seed=None if clean else self.seed,
            params=dict(
                crop=list(CROP_BOX), resize="area", image_size=self.image_size, **({} if clean else self.corruption())
            ),
        )
        if count is not None:
            meta["count"] = count
        return meta


def find_celeba(root: str | Path) -> tuple[Path, Path]:
    """``(img_align_celeba dir, list_eval_partition.txt)`` under ``<root>/celeba``, or FileNotFoundError."""
    base = Path(root).expanduser().absolute() / "celeba"
    images, partition = base / "img_align_celeba", base / "list_eval_partition.txt"
    missing = [str(p) for p in (images, partition) if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"CelebA not found: missing {' and '.join(missing)} (torchvision layout: "
            f"<data_dir>/celeba/img_align_celeba/*.jpg and <data_dir>/celeba/list_eval_partition.txt). "
            f"Point paths.data_dir (env FUSIONVAE_DATA_DIR; now {str(root)!r}) at the directory holding celeba/, "
            f"or set dataset.lmdb_dir to LMDBs built elsewhere with `python -m datamodules.make_celeba`"
        )
    return images, partition


def read_partition(path: Path) -> dict[str, list[str]]:
    """File names per split, in file order."""
    names = {v: k for k, v in SPLITS.items()}
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[1].isdigit() or int(parts[1]) not in names:
            raise ValueError(f"{path}:{line_no}: expected '<file>.jpg <0|1|2>', got {line!r}")
        out[names[int(parts[1])]].append(parts[0])
    return out


def area_weights(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]``: row i holds the fraction of each input pixel inside output pixel i's
    span ``[i * n_in / n_out, (i + 1) * n_in / n_out)``, divided by the span (rows sum to 1)."""
    edges = np.arange(n_out + 1) * (n_in / n_out)
    lo, hi = edges[:-1, None], edges[1:, None]
    j = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0, None)
    return overlap / (n_in / n_out)


def area_resize(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``[size, size, C]`` area average of uint8 ``image [H, W, C]`` (rounded to nearest)."""
    rows, cols = area_weights(image.shape[0], size), area_weights(image.shape[1], size)
    h, w, c = image.shape
    out = (rows @ image.reshape(h, w * c).astype(np.float64)).reshape(size, w, c)  # [size, W, C]
    out = (out.transpose(0, 2, 1) @ cols.T).transpose(0, 2, 1)  # [size, size, C]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def load_face(path: str | Path, size: int) -> np.ndarray:
    """uint8 ``[size, size, 3]``: the 148x148 crop, area-resized."""
    with Image.open(path) as img:
        face = np.asarray(img.convert("RGB").crop(CROP_BOX))
    return area_resize(face, size)


def record_generator(seed: int, split: str, index: int) -> torch.Generator:
    """The generator of record ``index``'s corruption: independent of workers and chunking."""
    state = np.random.SeedSequence([seed, SPLITS[split], index]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def clean_record(path: str, spec: CelebASpec) -> bytes:
    return encode_stack(load_face(path, spec.image_size)[None])


def corrupted_record(task: tuple[int, str], spec: CelebASpec, split: str) -> bytes:
    index, path = task
    clean = torch.from_numpy(load_face(path, spec.image_size)).permute(2, 0, 1)[None].float().div_(255)
    stack = make_stack(clean, spec.k_max, generator=record_generator(spec.seed, split, index), **spec.corruption())
    return encode_stack(stack[0].mul_(255).round_().to(torch.uint8).permute(0, 2, 3, 1).numpy())


def _records(split: str, files: list[str], spec: CelebASpec, workers: int | None, progress: bool) -> Iterator[bytes]:
    desc = f"FusionCelebA {split}"
    if split == "train":
        return parallel_map(partial(clean_record, spec=spec), files, workers, desc, progress=progress)
    tasks = list(enumerate(files))
    return parallel_map(partial(corrupted_record, spec=spec, split=split), tasks, workers, desc, progress=progress)


def regenerate_hint(root: str | Path, out: Path) -> str:
    return (
        f"build it with the datamodule's prepare_data() or `python -m datamodules.make_celeba --root {root} "
        f"--out {out}` and the config's settings (delete a stale LMDB first)"
    )


def build_celeba(
    root: str | Path, out: str | Path, spec: CelebASpec, workers: int | None = None, progress: bool = True
) -> dict[str, Path]:
    """Generate the missing LMDBs ``<out>/{train,valid,test}``; check the existing ones.

    Idempotent and atomic (see ``lmdb_store``); CelebA itself is only needed when one is missing.
    """
    out = Path(out).expanduser().absolute()
    paths = {split: out / split for split in SPLITS}
    hint = regenerate_hint(root, out)
    if all(is_complete(p) for p in paths.values()):
        for split, path in paths.items():
            check_meta(read_meta(path), spec.expected(split), path, hint)
        try:
            find_celeba(root)
        except FileNotFoundError:
            return paths  # LMDBs only (e.g. copied to a cluster): counts cannot be checked
    images, partition_file = find_celeba(root)
    partition = read_partition(partition_file)
    for split, path in paths.items():
        files = [str(images / name) for name in partition[split]]
        if not files:
            raise ValueError(f"{partition_file} lists no {split} images")
        if len(files) != OFFICIAL_COUNTS[split]:
            log.info("CelebA %s split has %d images (official: %d)", split, len(files), OFFICIAL_COUNTS[split])
        expected = spec.expected(split, len(files))
        records = partial(_records, split, files, spec, workers, progress)
        ensure_lmdb(path, expected, records, hint, extra=dict(source=str(images), spec=asdict(spec)))
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="directory holding celeba/ (paths.data_dir)")
    parser.add_argument("--out", help="LMDB directory (default <root>/fusion_celeba_lmdb)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores; 0: in-process)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stored validation / test corruption")
    defaults = CelebASpec()
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--k-max", type=int, default=defaults.k_max, help="corrupted views per stored record")
    parser.add_argument("--n-ellipses", type=int, default=defaults.n_ellipses)
    parser.add_argument("--r-low", type=int, default=defaults.r_low)
    parser.add_argument("--r-high", type=int, default=defaults.r_high)
    parser.add_argument("--noise-std", type=float, default=defaults.noise_std)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    spec = CelebASpec(args.image_size, args.k_max, args.n_ellipses, args.r_low, args.r_high, args.noise_std, args.seed)
    out = args.out or Path(args.root) / "fusion_celeba_lmdb"
    for split, path in build_celeba(args.root, out, spec, args.workers, not args.no_progress).items():
        print(f"{split}: {path} ({read_meta(path)['count']} records)")


if __name__ == "__main__":
    main()
