"""Build the LMDBs of an image folder (``dataset=image_folder``; docs/design.md §2).

Output (``lmdb_store`` format) under the LMDB directory:
  ``images/``  every image of the folder, made square and area-resized (``folder_scan.fit_image``),
               ``[1, S, S, C]`` per record, in split order: the training images, then the validation,
               then the test images (each part sorted by relative path). Its metadata holds the
               settings, the split rule and counts, and the folder's fingerprint (paths, sizes,
               modification times), so a changed folder is refused with the rebuild command.
  ``valid/``, ``test/``  ``[k_max + 1, S, S, C]``: k_max views of the style's corruption, then the
               clean target; record i's views come from a generator seeded by (val_seed, split, i),
               as FusionCelebA's. ``test/`` exists only when the split has test images.
Every image is decoded once: unreadable ones are collected and reported together (which and how
many) before anything is kept. ``rebuild=True`` replaces LMDBs that do not match the folder or the
settings (renamed away first, so a reader never sees a half-removed LMDB); matching ones are kept.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from datamodules.errors import DataError
from datamodules.folder_scan import (
    UNREADABLE,
    FolderScan,
    check_counts,
    describe_failures,
    fit_image,
    split_files,
    why_unreadable,
)
from datamodules.images import encode_stack, to_tensor
from datamodules.lmdb_env import close_env, resolve
from datamodules.lmdb_errors import LMDBDamagedError
from datamodules.lmdb_store import (
    TEMP_MARK,
    LMDBMetadataError,
    LMDBReader,
    check_meta,
    ensure_lmdb,
    is_complete,
    read_meta,
)
from datamodules.make_celeba import record_generator
from datamodules.parallel import parallel_map
from datamodules.tempfiles import owner_tag

log = logging.getLogger(__name__)

VERSION = 1  # bump when the stored content changes for the same settings
VIEW_SPLITS = ("valid", "test")
_CHUNK = 256  # images per read when composing the stored views


@dataclass(frozen=True)
class FolderSpec:
    """Settings that determine the stored LMDBs (all recorded in their metadata; defaults: the config)."""

    image_size: int
    channels: int
    k_max: int
    val_fraction: float
    test_fraction: float
    split_seed: int
    val_seed: int

    def expected_images(self) -> dict[str, Any]:
        s = self.image_size
        return dict(
            kind="image_folder/images",
            version=VERSION,
            shape=[1, s, s, self.channels],
            channels=self.channels,
            seed=self.split_seed,
            params=dict(
                image_size=s, fit="centre-crop, area", val_fraction=self.val_fraction, test_fraction=self.test_fraction
            ),
        )

    def expected_views(self, split: str, style: dict[str, Any], fingerprint: str) -> dict[str, Any]:
        s = self.image_size
        return dict(
            kind=f"image_folder/{split}",
            version=VERSION,
            shape=[self.k_max + 1, s, s, self.channels],
            channels=self.channels,
            seed=self.val_seed,
            params=dict(image_size=s, source=fingerprint, **style),
        )


def rebuild_hint(out: Path) -> str:
    return f"add dataset.rebuild=true to the command to rebuild it (it replaces the LMDBs in {out})"


def discard(path: Path) -> None:
    """Remove the LMDB at ``path``: renamed to a temporary name first, so it vanishes at once."""
    path = resolve(path)
    close_env(str(path))
    gone = path.parent / f".{path.name}{TEMP_MARK}{owner_tag()}"
    path.rename(gone)
    shutil.rmtree(gone, ignore_errors=True)
    log.info("removed %s to rebuild it", path)


def discard_damaged(paths: list[Path], rebuild: bool) -> None:
    """With ``rebuild``, remove each LMDB of ``paths`` whose file is damaged, so it is built anew;
    without, the first check that reads it reports the damage in one line."""
    if not rebuild:
        return
    for path in paths:
        try:
            is_complete(path)
        except LMDBDamagedError:
            log.warning("%s is damaged: rebuilding it (dataset.rebuild=true)", path)
            discard(path)


def clean_record(rel: str, root: str, size: int, channels: int) -> bytes | str:
    """PNG bytes of one fitted image, or a one-line reason why it cannot be read."""
    try:
        return encode_stack(fit_image(Path(root) / rel, size, channels)[None])
    except UNREADABLE as exc:
        return f"{rel} ({why_unreadable(exc, Path(root) / rel)})"


def _clean_records(scan: FolderScan, files: list[str], spec: FolderSpec, workers: int | None) -> Iterator[bytes]:
    """The records of ``files``; after the last one, DataError if any image could not be read (the
    writer then discards the LMDB)."""
    fn = partial(clean_record, root=str(scan.root), size=spec.image_size, channels=spec.channels)
    failures = []
    for result in parallel_map(fn, files, workers, f"image folder {scan.root.name}"):
        if isinstance(result, str):
            failures.append(result)
        elif not failures:
            yield result
    if failures:
        raise DataError(describe_failures(scan.root, failures, len(files)))


def _view_records(reader: LMDBReader, start: int, count: int, spec: FolderSpec, style, split: str) -> Iterator[bytes]:
    for lo in range(0, count, _CHUNK):
        clean = to_tensor(reader.get_many(range(start + lo, start + min(count, lo + _CHUNK)))[:, 0])
        for j, image in enumerate(clean):
            stack = style.stack(image[None], spec.k_max, record_generator(spec.val_seed, split, lo + j))[0]
            yield encode_stack(stack.mul_(255).round_().to(torch.uint8).permute(0, 2, 3, 1).numpy())


def check_source(path: Path, scan: FolderScan | None, expected: dict[str, Any], hint: str, rebuild: bool) -> None:
    """Refuse (or with ``rebuild`` discard) an LMDB made from another state of the folder (its
    ``source`` fingerprint) or with other settings than ``expected``."""
    meta = read_meta(path)
    stored = meta.get("source", {})
    try:
        if scan is not None and stored.get("fingerprint") != scan.fingerprint:
            raise LMDBMetadataError(
                f"image folder {scan.root} has changed since its LMDB {path} was built ({stored.get('images')} "
                f"images then, {len(scan.files)} now; paths, sizes or modification times differ): {hint}"
            )
        check_meta(meta, expected, path, hint)
    except LMDBMetadataError:
        if not rebuild:
            raise
        discard(path)


def build_image_folder(
    scan: FolderScan | None,
    out: str | Path,
    spec: FolderSpec,
    style,
    batch_size: int,
    workers: int | None = None,
    rebuild: bool = False,
) -> dict[str, int]:
    """Build the missing LMDBs of ``scan``'s folder under ``out`` and check the existing ones;
    return the image count per split. ``scan`` None: the folder is gone, use the LMDBs as they are."""
    out = Path(out).expanduser().absolute()
    images, hint = out / "images", rebuild_hint(out)
    discard_damaged([images, *(out / split for split in VIEW_SPLITS)], rebuild)
    if is_complete(images):
        check_source(images, scan, spec.expected_images(), hint, rebuild)
    if not is_complete(images):
        if scan is None:
            raise FileNotFoundError(f"LMDB not found: {images}, and its image folder is gone (dataset.path)")
        for split in VIEW_SPLITS:  # views of the images LMDB that is being replaced
            if is_complete(out / split):
                discard(out / split)
        rule, parts = split_files(scan, spec.val_fraction, spec.test_fraction, spec.split_seed)
        counts = {s: len(files) for s, files in parts.items()}
        check_counts(scan.root, rule, counts, batch_size)
        files = [f for s in ("train", "valid", "test") for f in parts[s]]
        meta = {**spec.expected_images(), "count": len(files)}
        source = dict(path=str(scan.root), fingerprint=scan.fingerprint, images=len(files), rule=rule)
        records = partial(_clean_records, scan, files, spec, workers)
        ensure_lmdb(images, meta, records, hint, extra=dict(source=source, splits=counts))
    stored = read_meta(images)
    counts, fingerprint = stored["splits"], stored["source"]["fingerprint"]
    reader = LMDBReader(images)
    start = counts["train"]
    for split in VIEW_SPLITS:
        path, expected = out / split, spec.expected_views(split, style.params(), fingerprint)
        if counts[split] and rebuild and is_complete(path):
            try:
                check_meta(read_meta(path), expected, path, hint)
            except LMDBMetadataError:
                discard(path)
        if counts[split]:
            records = partial(_view_records, reader, start, counts[split], spec, style, split)
            ensure_lmdb(path, {**expected, "count": counts[split]}, records, hint)
        start += counts[split]
    return counts
