"""Cheap structural checks that tell a finished file from a torn one.

Each check reads a few bytes from the ends of the file, never the whole file. A check
returns None when the file looks complete and a short reason when it does not.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

__all__ = ["check_file", "check_json", "check_safetensors", "check_zip"]

_EOCD = b"PK\x05\x06"
_EOCD_MIN = 22
_ZIP_COMMENT_MAX = 0xFFFF
_ZIP_SUFFIXES = {".pt", ".pth", ".ckpt", ".keras", ".npz", ".zip", ".bin"}


def check_zip(path: Path) -> str | None:
    """A zip (torch.save, Lightning, Keras) is finished when its end record closes the file."""
    with path.open("rb") as f:
        head = f.read(4)
        if not head:
            return "empty file"
        if not head.startswith(b"PK"):
            # Not a zip after all (a legacy pickle torch.save, a raw .bin): nothing to
            # check cheaply, the settle window decides.
            return None
        size = f.seek(0, 2)
        if size < _EOCD_MIN:
            return "zip shorter than its end record"
        tail_len = min(size, _EOCD_MIN + _ZIP_COMMENT_MAX)
        f.seek(size - tail_len)
        tail = f.read(tail_len)
    index = tail.rfind(_EOCD)
    if index < 0:
        return "zip end-of-central-directory record not written yet"
    (comment_len,) = struct.unpack_from("<H", tail, index + 20)
    if index + _EOCD_MIN + comment_len != len(tail):
        return "zip end record does not close the file"
    return None


def check_safetensors(path: Path) -> str | None:
    """A safetensors file is finished when its header's highest offset reaches the end.

    safetensors 0.8 pre-sizes the file, so size alone proves nothing; the settle window
    covers that case, this check covers the torn ones.
    """
    with path.open("rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            return "safetensors header length not written yet"
        (header_len,) = struct.unpack("<Q", raw_len)
        size = f.seek(0, 2)
        if header_len > size - 8:
            return "safetensors header longer than the file"
        f.seek(8)
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "safetensors header is not valid JSON yet"
    if not isinstance(header, dict):
        return "safetensors header is not an object"
    end = 0
    for name, tensor in header.items():
        if name == "__metadata__":
            continue
        offsets = tensor.get("data_offsets") if isinstance(tensor, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2):
            return f"safetensors tensor {name!r} has no data_offsets"
        end = max(end, int(offsets[1]))
    if 8 + header_len + end != size:
        return f"safetensors data ends at {8 + header_len + end}, file has {size} bytes"
    return None


def check_json(path: Path) -> str | None:
    """A JSON file is finished when it parses."""
    try:
        json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "JSON does not parse yet"
    return None


def check_file(path: Path) -> str | None:
    """Run the check that fits the file's type; files of unknown type pass."""
    check: Callable[[Path], str | None] | None = None
    if path.suffix in _ZIP_SUFFIXES:
        check = check_zip
    elif path.suffix == ".safetensors":
        check = check_safetensors
    elif path.suffix == ".json":
        check = check_json
    if check is None:
        return None
    try:
        return check(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"
