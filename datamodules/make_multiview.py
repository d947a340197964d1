"""Build the LMDBs of a folder of multi-view scenes (``dataset=multiview_folder``; docs/design.md §2).

A scene is a folder that holds image files directly: 1..k_max views (sorted by name) and, where
present, ``target.<ext>``, the clean reference; all of a scene's images must have one size (they
show the same frame). Scenes are split like images (``folder_scan.split_files`` on the scene
paths). Scenes without a target cannot be trained or evaluated on: they are left out (and
counted in the log); fuse them with ``fusionvae-fuse <scene folder>``.

Output (``lmdb_store`` format) under the LMDB directory: ``train/``, ``valid/``, ``test/`` (test
only when the split has test scenes), ``[k_max + 1, S, S, C]`` per scene: its views in name order,
repeated in turn to fill the k_max slots, then the target, each made square and area-resized
(``folder_scan.fit_array``). The metadata holds the settings, the folder's fingerprint, the split
counts and ``views``: each record's number of distinct views. Unreadable images and scenes of mixed
sizes are collected and reported together before anything is kept.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.errors import DataError
from datamodules.folder_scan import (
    UNREADABLE,
    FolderScan,
    check_counts,
    describe_failures,
    fit_array,
    load_pixels,
    split_files,
    why_unreadable,
)
from datamodules.images import encode_stack
from datamodules.lmdb_store import ensure_lmdb, is_complete, read_meta
from datamodules.make_image_folder import check_source, discard, discard_damaged, rebuild_hint
from datamodules.parallel import parallel_map

log = logging.getLogger(__name__)

VERSION = 1  # bump when the stored content changes for the same settings
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Scene:
    name: str  # relative path of the scene folder
    views: tuple[str, ...]  # file names, sorted
    target: str | None


@dataclass(frozen=True)
class MultiviewSpec:
    """Settings that determine the stored LMDBs (all recorded in their metadata; defaults: the config)."""

    image_size: int
    channels: int
    k_max: int
    val_fraction: float
    test_fraction: float
    split_seed: int

    def expected(self, split: str) -> dict[str, Any]:
        s = self.image_size
        return dict(
            kind=f"multiview_folder/{split}",
            version=VERSION,
            shape=[self.k_max + 1, s, s, self.channels],
            channels=self.channels,
            seed=self.split_seed,
            params=dict(
                image_size=s, fit="centre-crop, area", val_fraction=self.val_fraction, test_fraction=self.test_fraction
            ),
        )


def find_scenes(scan: FolderScan, k_max: int) -> list[Scene]:
    """The scenes of ``scan``'s folder (DataError for loose images or a scene with 0 or > k_max views)."""
    folders: dict[str, list[str]] = {}
    for rel in scan.files:
        folder, _, name = rel.rpartition("/")
        folders.setdefault(folder, []).append(name)
    if "" in folders:
        raise DataError(
            f"{len(folders[''])} image(s) lie directly in {scan.root} (first: {folders[''][0]}): put each scene's "
            f"views (and its target.<ext>) in a sub-folder of its own"
        )
    scenes = []
    for folder, names in sorted(folders.items()):
        target = [n for n in names if n.rsplit(".", 1)[0].lower() == "target"]
        scenes.append(Scene(folder, tuple(sorted(n for n in names if n not in target)), min(target, default=None)))
    bad = [f"{s.name} ({len(s.views)} views)" for s in scenes if not 1 <= len(s.views) <= k_max]
    if bad:
        raise DataError(
            f"{len(bad)} scene(s) in {scan.root} do not have 1 to dataset.k_max={k_max} views: "
            f"{', '.join(bad[:3])}{' and more' if len(bad) > 3 else ''}; remove views or raise dataset.k_max"
        )
    return scenes


def scene_record(scene: Scene, root: str, size: int, channels: int, k_max: int) -> bytes | str:
    """PNG bytes of one scene's stack, or a one-line reason why it cannot be used."""
    pixels = []
    for name in (*scene.views, scene.target):
        path = Path(root) / scene.name / name
        try:
            pixels.append(load_pixels(path, channels))
        except UNREADABLE as exc:
            return f"{scene.name}/{name} ({why_unreadable(exc, path)})"
    sizes = sorted({f"{a.shape[1]}x{a.shape[0]}" for a in pixels})
    if len(sizes) > 1:
        return f"{scene.name} (mixed sizes {', '.join(sizes)})"
    fitted = [fit_array(a, size) for a in pixels]
    n = len(scene.views)
    return encode_stack(np.stack([fitted[i % n] for i in range(k_max)] + [fitted[-1]]))


def split_scenes(scan: FolderScan, spec: MultiviewSpec, batch_size: int) -> dict[str, list[Scene]]:
    """Scenes with a target per split (checked: enough of them)."""
    scenes = find_scenes(scan, spec.k_max)
    usable = {s.name: s for s in scenes if s.target is not None}
    left_out = len(scenes) - len(usable)
    if left_out:
        log.info("%d of %d scenes have no target image: left out (fuse them instead)", left_out, len(scenes))
    names = FolderScan(scan.root, tuple(sorted(usable)), scan.fingerprint)
    if not usable:
        raise DataError(f"no scene in {scan.root} has a target image (target.<ext>): nothing to train on")
    rule, parts = split_files(names, spec.val_fraction, spec.test_fraction, spec.split_seed)
    check_counts(scan.root, rule, {s: len(v) for s, v in parts.items()}, batch_size)
    return {split: [usable[n] for n in parts[split]] for split in SPLITS}


def build_multiview(
    scan: FolderScan | None,
    out: str | Path,
    spec: MultiviewSpec,
    batch_size: int,
    workers: int | None = None,
    rebuild: bool = False,
) -> dict[str, int]:
    """Build the missing LMDBs of ``scan``'s scenes under ``out``, check existing ones; return the
    scene count per split. ``scan`` None: the folder is gone, use the LMDBs as they are."""
    out = Path(out).expanduser().absolute()
    hint = rebuild_hint(out)
    discard_damaged([out / split for split in SPLITS], rebuild)
    for split in SPLITS:
        if is_complete(out / split):
            check_source(out / split, scan, spec.expected(split), hint, rebuild)
    if is_complete(out / "train"):
        counts = read_meta(out / "train")["splits"]
        if all(is_complete(out / s) for s in SPLITS if counts[s]):
            return counts
    if scan is None:
        raise FileNotFoundError(f"LMDBs not found in {out}, and their image folder is gone (dataset.path)")
    for split in SPLITS:  # partial sets come from an older folder state or an interrupted build
        if is_complete(out / split):
            discard(out / split)
    parts = split_scenes(scan, spec, batch_size)
    _write_splits(scan, parts, out, spec, workers)
    return {s: len(v) for s, v in parts.items()}


class _Unusable(Exception):
    """A split had unusable scenes: its LMDB is not written (the build goes on to count them all)."""


def _write_splits(scan: FolderScan, parts: dict[str, list[Scene]], out: Path, spec: MultiviewSpec, workers) -> None:
    """Write the split LMDBs from one pass over all scenes; unusable scenes of every split are
    reported together, and nothing of this build is kept then."""
    counts = {s: len(v) for s, v in parts.items()}
    order = [scene for split in SPLITS for scene in parts[split]]
    fn = partial(scene_record, root=str(scan.root), size=spec.image_size, channels=spec.channels, k_max=spec.k_max)
    results = iter(parallel_map(fn, order, workers, f"scenes {scan.root.name}"))
    failures: list[str] = []

    def records(n: int) -> Iterator[bytes]:
        for _ in range(n):
            result = next(results)
            if isinstance(result, str):
                failures.append(result)
            elif not failures:
                yield result
        if failures:
            raise _Unusable

    source = dict(path=str(scan.root), fingerprint=scan.fingerprint, images=len(scan.files))
    for split in (s for s in SPLITS if counts[s]):
        meta = {**spec.expected(split), "count": counts[split]}
        extra = dict(source=source, splits=counts, views=[len(s.views) for s in parts[split]])
        try:
            ensure_lmdb(out / split, meta, partial(records, counts[split]), rebuild_hint(out), extra=extra)
        except _Unusable:
            pass
    if failures:
        for split in SPLITS:
            if is_complete(out / split):
                discard(out / split)
        raise DataError(describe_failures(scan.root, failures, len(order), "scenes"))
