"""SHA-256 files beside checkpoints (``<name>.ckpt.sha256``, the format ``sha256sum -c`` reads),
written by ``fusionvae.training.checkpoint_io`` and checked before a checkpoint is used.

Bytes changed after the write (disk, copy, transfer) can leave a file that still unzips and loads
without a word. A checkpoint without a checksum file (an older one) loads unchecked. No Lightning
import here: ``fusionvae.training.resume`` runs before Hydra starts.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from fusionvae.errors import CheckpointError

CHECKSUM = ".sha256"
_verified: dict[str, tuple[int, int, int]] = {}  # path -> (inode, size, mtime) that matched its checksum


def checksum_path(path: str | Path) -> Path:
    return Path(path).with_name(Path(path).name + CHECKSUM)


def sha256_of(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify_checksum(path: str | Path) -> None:
    """Raise ``CheckpointError`` if ``path`` does not match its ``.sha256`` file (none: nothing to check)."""
    path, sums = Path(path), checksum_path(path)
    if not sums.is_file():
        return
    stat = path.stat()
    state = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if _verified.get(str(path.absolute())) == state:  # resume reads a checkpoint twice: hash it once
        return
    expected = (sums.read_text(errors="replace").split() or [""])[0]
    if sha256_of(path) != expected:
        raise CheckpointError(
            f"checkpoint {path} does not match its checksum {sums.name}: its bytes changed after it was "
            f"written (damaged disk or copy); use another checkpoint (e.g. an epoch*.ckpt beside it)"
        )
    _verified[str(path.absolute())] = state
