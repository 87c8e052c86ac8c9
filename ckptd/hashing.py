"""md5 of checkpoint files, the digest W&B's manifest needs, computed in ckptd's own pool.

hashlib releases the GIL while it digests large buffers, so a thread pool hashes files in
parallel across cores without the copy a process pool would need.
"""

from __future__ import annotations

import base64
import hashlib
from concurrent.futures import Executor
from pathlib import Path

__all__ = ["CHUNK", "md5_b64", "md5_files"]

CHUNK = 8 << 20


def md5_b64(path: Path) -> str:
    """The base64 md5 of a file, as W&B writes it in manifests and Content-MD5 headers."""
    h = hashlib.md5()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buffer):
            h.update(view[:n])
    return base64.b64encode(h.digest()).decode("ascii")


def md5_files(pool: Executor, root: Path, names: list[str]) -> dict[str, str]:
    """md5 of each named file under `root`, hashed in parallel on `pool`."""
    futures = {name: pool.submit(md5_b64, root / name) for name in names}
    return {name: future.result() for name, future in futures.items()}
