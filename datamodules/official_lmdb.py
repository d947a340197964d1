"""Reader of the official FusionVAE LMDBs (github.com/ALRhub/FusionVAE): keys ``str(i)``, one PNG
per record, decoded with the channel order and alpha rules described in ``datamodules.official``."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from datamodules.lmdb_env import close_env, open_env, resolve
from datamodules.lmdb_errors import LMDBDamagedError, LMDBRecordError, damage_checked

GREY_MODES = ("L", "LA")
FORMATS = {
    "L": "grey on black (alpha = pixel > 0)",
    "LA": "grey + alpha channel",
    "RGB": "RGB on black (alpha = any channel > 0)",
    "RGBA": "RGBA (alpha channel)",
}
REPLACE = "copy it again from the official download (or re-create it) into dataset.official_dir"  # the fix
WHAT = "official LMDB"


def decode_png(data: bytes, reverse_channels: bool) -> tuple[np.ndarray, str]:
    """uint8 ``[H, W, C]`` (C = 1 L, 2 LA, 3 RGB, 4 RGBA) and the PNG mode; colour channels
    reversed (cv2's BGR(A) -> RGB(A), alpha stays last) when ``reverse_channels``."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        mode = img.mode
        if mode in ("P", "PA"):  # palette: PIL expands it (cv2 never writes one)
            img = img.convert("RGBA" if mode == "PA" or "transparency" in img.info else "RGB")
        elif mode == "1":
            img = img.convert("L")
        elif mode not in FORMATS:
            raise ValueError(f"unsupported PNG mode {mode!r} (8-bit L, LA, RGB or RGBA expected)")
        mode, arr = img.mode, np.asarray(img)
    arr = arr[..., None] if arr.ndim == 2 else arr
    if reverse_channels and arr.shape[-1] >= 3:
        arr = arr[..., [2, 1, 0, *range(3, arr.shape[-1])]]
    return arr, mode


def premultiplied_rgba(arr: np.ndarray) -> np.ndarray:
    """uint8 ``[..., 4]`` premultiplied RGBA from ``[..., C]`` (C in 1..4): the alpha channel if there
    is one, else alpha = 255 where any channel is non-zero (images of an object on black)."""
    c = arr.shape[-1]
    colour = arr[..., :3] if c >= 3 else np.repeat(arr[..., :1], 3, axis=-1)
    if c in (2, 4):
        alpha = arr[..., -1:]
        colour = ((colour.astype(np.uint32) * alpha + 127) // 255).astype(np.uint8)  # rounded
    else:
        alpha = (colour.max(axis=-1, keepdims=True) > 0).astype(np.uint8) * 255
    return np.concatenate([colour, alpha], axis=-1)


class OfficialLMDB:
    """Random access to an official LMDB: ``get_many -> uint8 [B, tiles, H, W, C]`` with C = 4
    (premultiplied RGBA) if ``rgba`` else 3 (RGB, alpha composited on black; grey repeated).

    ``tiles``: square tiles side by side per record (None: any number, keep the last). Record "0" is
    decoded on construction: ``shape`` and ``mode`` (its PNG mode) let callers check the config
    before heavy work. Holds no environment (``lmdb_store``'s per-process cache does), so it pickles
    into DataLoader / pool workers.
    """

    def __init__(
        self, path: Any, tiles: int | None = None, rgba: bool = False, reverse_channels: bool = True, hint: str = ""
    ):
        self.path = resolve(path)
        if not (self.path / "data.mdb").is_file():
            raise FileNotFoundError(f"official LMDB not found: {self.path} (no data.mdb there){hint}")
        self.tiles, self.rgba, self.reverse_channels = tiles, rgba, reverse_channels
        with self._damage_checked():
            env = open_env(str(self.path))
            self.count = int(env.stat()["entries"])
            if self.count == 0:
                raise LMDBRecordError(f"official LMDB {self.path} is empty")
            with env.begin() as txn:
                for key in (b"0", str(self.count - 1).encode()):
                    if txn.get(key) is None:
                        raise LMDBRecordError(self._missing(key))
                first, self.mode = self._decode(b"0", txn.get(b"0"))
        self.shape: tuple[int, ...] = first.shape
        self.format = FORMATS[self.mode]

    def __len__(self) -> int:
        return self.count

    def _damage_checked(self):
        """lmdb's errors for a damaged data.mdb as one ``LMDBDamagedError`` naming the file and the fix."""
        return damage_checked(self.path, REPLACE, WHAT)

    def _missing(self, key: bytes) -> str:
        return (
            f"official LMDB {self.path}: key {key.decode()!r} is missing; records must be stored under "
            f"keys '0'..'{self.count - 1}' ({self.count} entries, no other keys): the LMDB is incomplete "
            f"or not an official FusionVAE LMDB; {REPLACE}"
        )

    def _decode(self, key: bytes, data: Any) -> tuple[np.ndarray, str]:
        """``[tiles, H, W, C]`` of one record; LMDBRecordError naming the path and key if it is not one."""
        try:
            arr, mode = decode_png(bytes(data), self.reverse_channels)
            h, w = arr.shape[:2]
            if w % h:
                raise ValueError(f"a {w}x{h} (WxH) PNG is not a row of square tiles")
            n = w // h
            if self.tiles is not None and n != self.tiles:
                raise ValueError(f"{n} tiles of {h}x{h} px, expected {self.tiles} side by side")
            arr = premultiplied_rgba(arr) if self.rgba else premultiplied_rgba(arr)[..., :3]
            stack = arr.reshape(h, n, h, arr.shape[-1]).transpose(1, 0, 2, 3)
            stack = stack if self.tiles is not None else stack[-1:]
            if getattr(self, "shape", stack.shape) != stack.shape:
                raise ValueError(f"decoded tiles {stack.shape}, but record '0' gave {self.shape}")
        except Exception as exc:  # PIL raises several types for junk bytes
            raise LMDBDamagedError(
                f"official LMDB {self.path}: record key {key.decode()!r} cannot be decoded "
                f"({exc}); the LMDB is damaged or not an official FusionVAE LMDB; {REPLACE}"
            ) from exc
        return stack, mode

    def check_keys(self) -> None:
        """Every key '0'..'<n-1>' is there (n entries: then there is no other key): one lookup each,
        no value read (0.1 s for CelebA's 162,770 records), so a gap fails before training, not when a
        batch reaches it. Lookups, not a cursor walk: liblmdb aborts the process (an assertion) when
        a cursor steps onto a damaged page, where a lookup reports MDB_CORRUPTED."""
        with self._damage_checked(), open_env(str(self.path)).begin(buffers=True) as txn:
            for index in range(self.count):
                key = str(index).encode()
                if txn.get(key) is None:
                    raise LMDBRecordError(self._missing(key))

    def check_records(self) -> None:
        """Decode every record: for the validation LMDBs (644 / 19,867 records), so a damaged one
        fails before training, not at the first full validation."""
        with self._damage_checked(), open_env(str(self.path)).begin(buffers=True) as txn:
            for index in range(self.count):
                key = str(index).encode()
                data = txn.get(key)
                if data is None:
                    raise LMDBRecordError(self._missing(key))
                self._decode(key, data)

    def get_many(self, indices: Any) -> np.ndarray:
        """uint8 ``[B, tiles, H, W, C]`` of the given records, read in one transaction."""
        indices = [int(i) for i in indices]
        out = np.empty((len(indices), *self.shape), dtype=np.uint8)
        with self._damage_checked(), open_env(str(self.path)).begin(buffers=True) as txn:
            for row, index in enumerate(indices):
                if not 0 <= index < self.count:
                    raise IndexError(f"official LMDB {self.path}: index {index} out of range [0, {self.count})")
                key = str(index).encode()
                data = txn.get(key)
                if data is None:
                    raise LMDBRecordError(self._missing(key))
                out[row] = self._decode(key, data)[0]
        return out

    def close(self) -> None:
        """Close this process's environment (reopened on the next read)."""
        close_env(str(self.path))
