"""Build the FusionT-LESS LMDBs from the BOP T-LESS layout (docs/design.md §2).

    python -m datamodules.make_tless --bop-root BOP_TLESS --out DIR [--workers N] [--val-seed S]
    python -m datamodules.make_tless --out DIR --val-only        # validation set from existing pools

Input: ``<bop-root>/train_primesense/<obj_id:06d>/`` with ``rgb/<im:06d>.png``,
``mask_visib/<im:06d>_<gt:06d>.png``, ``scene_gt_info.json`` (``bbox_visib`` / ``bbox_obj`` as
[x, y, w, h]) and, optionally, ``scene_gt.json`` (``obj_id`` per annotation; without it the folder
name is the object id). Each annotation is cropped to the square around its bounding box (side =
the longer bbox side, zero-filled outside the image) and resized (PIL BOX when shrinking,
bilinear when enlarging) together with its visible-object mask.

Output (``lmdb_store`` format, one ``[1, H, W, 4]`` RGBA image per record; colour premultiplied
by alpha = the resized mask, so pixels off the object are black) under ``--out``:
  ``objects_train/``  objects of ``--object-ids`` at 128x128 (the paper's 5 socket classes;
                      which T-LESS ids these are is configurable, default 1-5);
  ``objects_val/``    ``--n-val`` object images held out by a seeded split (default 644; with the
                      real data 6,480 - 644 = 5,836 are left for training);
  ``occluders/``      objects of ``--occluder-ids`` at 100x100 (default ids 6-17, 12 classes);
  ``val/``            ``[k_max + 1, S, S, 3]`` RGB: k_max occluded views, then the target, one per
                      held-out object, composed once from ``--val-seed`` (``datamodules.paste``).
Existing complete LMDBs are kept when their metadata matches, refused when it does not.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from datamodules.images import encode_stack
from datamodules.lmdb_store import LMDBReader, check_meta, ensure_lmdb, is_complete, read_meta
from datamodules.parallel import parallel_map
from datamodules.paste import PasteParams, compose_views, load_occluder_bank, object_targets

VERSION = 1  # bump when the stored content changes for the same settings
OBJECT_IDS = (1, 2, 3, 4, 5)
OCCLUDER_IDS = tuple(range(6, 18))
POOLS = ("objects_train", "objects_val", "occluders")
_VAL_CHUNK = 64  # samples composed per step; changing it changes the stored validation set


@dataclass(frozen=True)
class PoolSpec:
    """Settings of the object / occluder LMDBs (recorded in their metadata)."""

    object_ids: tuple[int, ...] = OBJECT_IDS
    occluder_ids: tuple[int, ...] = OCCLUDER_IDS
    bbox: str = "visib"  # crop around bbox_visib or bbox_obj
    object_size: int = 128
    occluder_size: int = 100
    n_val: int = 644  # object images held out for validation
    split_seed: int = 0

    def __post_init__(self) -> None:
        if self.bbox not in ("visib", "obj"):
            raise ValueError(f"bbox must be 'visib' or 'obj', got {self.bbox!r}")
        if set(self.object_ids) & set(self.occluder_ids):
            raise ValueError(f"object_ids {self.object_ids} and occluder_ids {self.occluder_ids} overlap")
        if not self.object_ids or not self.occluder_ids or self.n_val < 1:
            raise ValueError("need at least one object id, one occluder id and n_val >= 1")

    def expected(self, pool: str, count: int | None = None) -> dict[str, Any]:
        objects = pool != "occluders"
        size = self.object_size if objects else self.occluder_size
        params: dict[str, Any] = dict(
            bbox=self.bbox,
            size=size,
            alpha="premultiplied",
            ids=list(self.object_ids if objects else self.occluder_ids),
        )
        if objects:
            params.update(n_val=self.n_val)
        meta = dict(
            kind=f"fusion_tless/{pool}",
            version=VERSION,
            shape=[1, size, size, 4],
            channels=4,
            seed=self.split_seed if objects else None,
            params=params,
        )
        return meta if count is None else {**meta, "count": count}


@dataclass(frozen=True)
class ValSpec:
    """Settings of the fixed validation set."""

    image_size: int = 64
    k_max: int = 3  # occluded views per stored record
    seed: int = 0
    paste: PasteParams = field(default_factory=PasteParams)

    def expected(self, pools: PoolSpec) -> dict[str, Any]:
        sources = {pool: pools.expected(pool) for pool in ("objects_val", "occluders")}
        params = dict(image_size=self.image_size, paste=asdict(self.paste), sources=sources)
        return dict(
            kind="fusion_tless/val",
            version=VERSION,
            count=pools.n_val,
            channels=3,
            seed=self.seed,
            shape=[self.k_max + 1, self.image_size, self.image_size, 3],
            params=params,
        )


@dataclass(frozen=True)
class Crop:
    rgb: str
    mask: str
    bbox: tuple[int, int, int, int]  # x, y, w, h


def find_bop(bop_root: str | Path, ids: tuple[int, ...]) -> Path:
    """``<bop_root>/train_primesense`` holding a folder per id, or FileNotFoundError."""
    train = Path(bop_root).expanduser().absolute() / "train_primesense"
    missing = [
        str(train / f"{i:06d}" / "scene_gt_info.json")
        for i in ids
        if not (train / f"{i:06d}" / "scene_gt_info.json").is_file()
    ]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise FileNotFoundError(
            f"T-LESS (BOP layout) not found: missing {shown}. Set dataset.bop_root (default "
            f"<paths.data_dir>/tless; env FUSIONVAE_DATA_DIR) to the BOP T-LESS root holding "
            f"train_primesense/<obj_id:06d>/{{rgb,mask_visib,scene_gt_info.json}}, or set dataset.lmdb_dir "
            f"to LMDBs built elsewhere with `python -m datamodules.make_tless`"
        )
    return train


def list_crops(train: Path, obj_id: int, bbox: str) -> list[Crop]:
    """Visible annotations of ``obj_id`` in its ``train_primesense`` folder, in (image, gt) order."""
    scene = train / f"{obj_id:06d}"
    info = json.loads((scene / "scene_gt_info.json").read_text())
    gt_file = scene / "scene_gt.json"
    gt = json.loads(gt_file.read_text()) if gt_file.is_file() else None
    crops = []
    for im in sorted(info, key=int):
        rgb = scene / "rgb" / f"{int(im):06d}.png"
        rgb = rgb if rgb.is_file() else rgb.with_suffix(".jpg")
        for k, entry in enumerate(info[im]):
            if gt is not None and gt[im][k]["obj_id"] != obj_id:
                continue
            x, y, w, h = (int(v) for v in entry[f"bbox_{bbox}"])
            if w > 0 and h > 0:
                crops.append(Crop(str(rgb), str(scene / "mask_visib" / f"{int(im):06d}_{k:06d}.png"), (x, y, w, h)))
    return crops


def crop_rgba(crop: Crop, size: int) -> np.ndarray:
    """uint8 ``[size, size, 4]``: the square crop, colour premultiplied by the resized mask."""
    x, y, w, h = crop.bbox
    side = max(w, h)
    left, top = round(x + w / 2 - side / 2), round(y + h / 2 - side / 2)
    box = (left, top, left + side, top + side)
    method = Image.BOX if side >= size else Image.BILINEAR
    with Image.open(crop.rgb) as rgb_img, Image.open(crop.mask) as mask_img:
        mask = np.asarray(mask_img.convert("L").crop(box)) > 127
        colour = np.asarray(rgb_img.convert("RGB").crop(box)) * mask[..., None]
    colour = np.asarray(Image.fromarray(colour.astype(np.uint8)).resize((size, size), method))
    alpha = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), method))
    colour = np.minimum(colour, alpha[..., None])  # premultiplied: colour <= alpha
    return np.concatenate([colour, alpha[..., None]], axis=-1)


def crop_record(crop: Crop, size: int) -> bytes:
    return encode_stack(crop_rgba(crop, size)[None])


def split_objects(crops: list[Crop], n_val: int, seed: int) -> tuple[list[Crop], list[Crop]]:
    """Seeded hold-out of ``n_val`` crops; both parts keep the listing order."""
    if n_val >= len(crops):
        raise ValueError(f"n_val={n_val} but only {len(crops)} object images were found; lower dataset.n_val")
    held = set(np.random.default_rng(seed).permutation(len(crops))[:n_val].tolist())
    return [c for i, c in enumerate(crops) if i not in held], [c for i, c in enumerate(crops) if i in held]


def regenerate_hint(out: Path) -> str:
    return (
        f"build it with the datamodule's prepare_data() or `python -m datamodules.make_tless --bop-root "
        f"<BOP T-LESS> --out {out}` and the config's settings (delete a stale LMDB first)"
    )


def build_pools(
    bop_root: str | Path, out: str | Path, spec: PoolSpec, workers: int | None = None, progress: bool = True
) -> dict[str, Path]:
    """Generate the missing ``objects_train`` / ``objects_val`` / ``occluders`` LMDBs; check the others.
    The BOP tree is only read when one is missing."""
    out = Path(out).expanduser().absolute()
    paths = {pool: out / pool for pool in POOLS}
    hint = regenerate_hint(out)
    if all(is_complete(p) for p in paths.values()):
        for pool, path in paths.items():
            check_meta(read_meta(path), spec.expected(pool), path, hint)
        return paths
    train = find_bop(bop_root, spec.object_ids + spec.occluder_ids)
    objects = [c for i in spec.object_ids for c in list_crops(train, i, spec.bbox)]
    occluders = [c for i in spec.occluder_ids for c in list_crops(train, i, spec.bbox)]
    if not occluders:
        raise ValueError(f"no visible occluder annotations for ids {spec.occluder_ids} under {train}")
    obj_train, obj_val = split_objects(objects, spec.n_val, spec.split_seed)
    for pool, crops, size in (
        ("objects_train", obj_train, spec.object_size),
        ("objects_val", obj_val, spec.object_size),
        ("occluders", occluders, spec.occluder_size),
    ):
        records = partial(
            parallel_map, partial(crop_record, size=size), crops, workers, f"T-LESS {pool}", progress=progress
        )
        ensure_lmdb(paths[pool], spec.expected(pool, len(crops)), records, hint, extra=dict(source=str(train)))
    return paths


def _val_records(out: Path, pools: PoolSpec, val: ValSpec, workers: int | None, progress: bool) -> Iterator[bytes]:
    objects = LMDBReader(out / "objects_val", pools.expected("objects_val"), regenerate_hint(out))
    occluders = LMDBReader(out / "occluders", pools.expected("occluders"), regenerate_hint(out))
    bank = load_occluder_bank(occluders, val.paste.occluder_size, 3, workers, progress)
    generator = torch.Generator().manual_seed(val.seed)
    for start in range(0, len(objects), _VAL_CHUNK):
        rgba = objects.get_many(range(start, min(start + _VAL_CHUNK, len(objects))))[:, 0]
        target = object_targets(rgba, val.image_size, 3)
        views, _ = compose_views(target, bank, val.k_max, val.paste, generator)
        stack = torch.cat([views, target.unsqueeze(1)], 1).mul_(255).round_().to(torch.uint8)
        yield from (encode_stack(s) for s in stack.permute(0, 1, 3, 4, 2).numpy())


def build_val(
    out: str | Path, pools: PoolSpec, val: ValSpec, workers: int | None = None, progress: bool = True
) -> Path:
    """Generate ``<out>/val`` from the held-out objects and the occluder pool unless it exists."""
    out = Path(out).expanduser().absolute()
    records = partial(_val_records, out, pools, val, workers, progress)
    ensure_lmdb(out / "val", val.expected(pools), records, regenerate_hint(out), extra=dict(source=str(out)))
    return out / "val"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bop-root", help="BOP T-LESS root holding train_primesense/ (not needed with --val-only)")
    parser.add_argument("--out", required=True, help="LMDB directory (dataset.lmdb_dir)")
    parser.add_argument("--val-only", action="store_true", help="only build val/ from existing pools")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores; 0: in-process)")
    pools, val, paste = PoolSpec(), ValSpec(), PasteParams()
    parser.add_argument("--object-ids", type=int, nargs="+", default=list(pools.object_ids))
    parser.add_argument("--occluder-ids", type=int, nargs="+", default=list(pools.occluder_ids))
    parser.add_argument("--bbox", choices=("visib", "obj"), default=pools.bbox)
    parser.add_argument("--object-size", type=int, default=pools.object_size)
    parser.add_argument("--occluder-source-size", type=int, default=pools.occluder_size)
    parser.add_argument("--n-val", type=int, default=pools.n_val)
    parser.add_argument("--split-seed", type=int, default=pools.split_seed)
    parser.add_argument("--val-seed", type=int, default=val.seed)
    parser.add_argument("--image-size", type=int, default=val.image_size)
    parser.add_argument("--k-max", type=int, default=val.k_max)
    for name, value in asdict(paste).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    pool_spec = PoolSpec(
        tuple(args.object_ids),
        tuple(args.occluder_ids),
        args.bbox,
        args.object_size,
        args.occluder_source_size,
        args.n_val,
        args.split_seed,
    )
    paste = PasteParams(**{k: getattr(args, k) for k in asdict(paste)})
    val_spec = ValSpec(args.image_size, args.k_max, args.val_seed, paste)
    if not args.val_only:
        if args.bop_root is None:
            parser.error("--bop-root is required unless --val-only")
        build_pools(args.bop_root, args.out, pool_spec, args.workers, not args.no_progress)
    build_val(args.out, pool_spec, val_spec, args.workers, not args.no_progress)
    for name in (*POOLS, "val"):
        target = Path(args.out).expanduser().absolute() / name
        print(f"{name}: {target} ({read_meta(target)['count']} records)")


if __name__ == "__main__":
    main()
