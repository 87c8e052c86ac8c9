"""Writing checkpoints the way a careful training loop does, for the daemon tests."""

from __future__ import annotations

import base64
import hashlib
import os
import zipfile
from pathlib import Path
from typing import Any

from ckptd import sidecar

__all__ = ["renamed_in", "sparse_renamed_in"]


def renamed_in(root: Path, name: str, payload: bytes | int = 3000, **sidecar_fields: Any) -> Path:
    """Write a zip checkpoint `root/name` under a hidden temp name and rename it into place,
    so it is finished the moment it appears. With `sidecar_fields` (step, metrics, ...) its
    sidecar is written first. `payload` is the bytes to store, or how many random bytes."""
    final = root / name
    if sidecar_fields:
        sidecar.write(final, **sidecar_fields)
    data = os.urandom(payload) if isinstance(payload, int) else payload
    tmp = root / f".{name}.tmp"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("data.pkl", data)
    os.replace(tmp, final)
    return final


def sparse_renamed_in(root: Path, name: str, size: int) -> str:
    """A sparse file of `size` bytes with 4 KiB of random bytes at each end, renamed into
    `root` (big checkpoints that cost CPU, not disk); its base64 md5, hashed here."""
    temp = root / f".{name}.tmp"
    with temp.open("wb") as f:
        f.write(os.urandom(4096))
        f.seek(size - 4096)
        f.write(os.urandom(4096))
    md5 = hashlib.md5()
    with temp.open("rb") as f:
        while chunk := f.read(8 << 20):
            md5.update(chunk)
    temp.rename(root / name)
    return base64.b64encode(md5.digest()).decode()
