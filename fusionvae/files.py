"""Files written whole or not at all: into a temporary file beside the target, then renamed over it,
so a reader (or a run killed mid-write) never sees half a file. No torch here: the sweep summary
uses it when Hydra starts. Checkpoints add an fsync and their checksum (``training.checkpoint_io``)."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replaced(path: str | Path, mode: str = "w", **open_args) -> Iterator:
    """A file object for ``path``: a temporary beside it, renamed over ``path`` when the block ends
    without an error, removed when it raises."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode, **open_args) as f:
            yield f
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    with replaced(path) as f:
        f.write(text)
    return Path(path)


def write_csv(rows: list[Mapping], columns: list[str], path: str | Path) -> Path:
    """``rows`` as CSV with these ``columns`` (other keys left out)."""
    with replaced(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)
