"""Cheap structural checks that tell a finished file from a torn one.

Each check reads a few bytes from the ends of the file, never the whole file. A check
returns None when the file looks complete and a short reason when it does not. Files are
opened with `open_regular`: a FIFO swapped in for a checkpoint file is refused, not waited on.
"""

from __future__ import annotations

import json
import pickletools
import struct
import zipfile
from collections.abc import Callable, Collection
from pathlib import Path

from ckptd.inputs import open_regular

__all__ = [
    "check_file",
    "check_hdf5",
    "check_json",
    "check_pickle",
    "check_safetensors",
    "check_tar",
    "check_tf_index",
    "check_zip",
    "guarded",
    "torch_saved_ints",
]

_EOCD = b"PK\x05\x06"
_EOCD_MIN = 22
_ZIP_COMMENT_MAX = 0xFFFF
_ZIP_SUFFIXES = {".pt", ".pth", ".ckpt", ".keras", ".npz", ".zip", ".bin"}
_SAFETENSORS_HEADER_MAX = 100_000_000  # the safetensors library refuses larger headers
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_HDF5_USER_BLOCKS = (0, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
_TAR_BLOCK = 512
_TF_TABLE_MAGIC = 0xDB4775248B80FB57  # LevelDB-style table footer closing a tensor-bundle index
_PICKLE_LIMIT = 64 << 20  # bytes of data.pkl we are willing to walk
_INT_OPS = {"BININT", "BININT1", "BININT2", "LONG1", "LONG4", "INT", "LONG"}
_STR_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"}
_MEMO_OPS = {"BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE"}


def check_zip(path: Path) -> str | None:
    """A zip (torch.save, Lightning, Keras) is finished when its end record closes the file."""
    with open_regular(path) as f:
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
    if index < 0 or index + _EOCD_MIN > len(tail):  # none, or cut inside the record
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
    with open_regular(path) as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            return "safetensors header length not written yet"
        (header_len,) = struct.unpack("<Q", raw_len)
        size = f.seek(0, 2)
        if header_len > size - 8:
            return "safetensors header longer than the file"
        if header_len > _SAFETENSORS_HEADER_MAX:
            return "safetensors header length is implausible (not written yet?)"
        f.seek(8)
        try:
            header = json.loads(f.read(header_len))
        except (ValueError, RecursionError):
            return "safetensors header is not valid JSON yet"
    if not isinstance(header, dict):
        return "safetensors header is not an object"
    end = 0
    for name, tensor in header.items():
        if name == "__metadata__":
            continue
        offsets = tensor.get("data_offsets") if isinstance(tensor, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and _is_int(offsets[1])):
            return f"safetensors tensor {name!r} has no data_offsets"
        end = max(end, offsets[1])
    if 8 + header_len + end != size:
        return f"safetensors data ends at {8 + header_len + end}, file has {size} bytes"
    return None


def check_json(path: Path) -> str | None:
    """A JSON file is finished when it parses."""
    try:
        with open_regular(path) as f:
            json.loads(f.read())
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, too deep
        return "JSON does not parse yet"
    return None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_hdf5(path: Path) -> str | None:
    """An HDF5 file (Keras `.h5`, `.weights.h5`) is finished when it reaches the end-of-file
    address its superblock records: the same test HDF5 makes before it reports a truncated file.

    Files without the HDF5 signature pass (the settle window decides).
    """
    with open_regular(path) as f:
        size = f.seek(0, 2)
        if size == 0:
            return "empty file"
        for start in _HDF5_USER_BLOCKS:
            if start + len(_HDF5_SIGNATURE) > size:
                return None
            f.seek(start)
            if f.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE:
                break
        else:
            return None
        f.seek(start)
        head = f.read(128)
    version = head[8] if len(head) > 8 else -1
    if version in (0, 1):  # sizes at 13; addresses after the B-tree Ks and flags (and v1's K)
        width, at = (head[13] if len(head) > 13 else 0), (24 if version == 0 else 28)
    elif version in (2, 3):  # sizes at 9; addresses right after the flags byte
        width, at = head[9], 12
    else:
        return None
    if width not in (2, 4, 8):
        return None
    if len(head) < at + 3 * width:
        return "HDF5 superblock not written yet"
    # Base address, free-space (v0/v1) or extension (v2/v3) address, then the end-of-file
    # address, which HDF5 compares with the whole file's size (user block included).
    eof = int.from_bytes(head[at + 2 * width : at + 3 * width], "little")
    if eof == (1 << (8 * width)) - 1:  # the undefined address
        return None
    if eof > size:
        return f"HDF5 data ends at {eof}, file has {size} bytes"
    return None


def check_tar(path: Path) -> str | None:
    """A tar (NeMo's `.nemo`) is finished when two zero blocks close it; compressed or
    non-ustar files pass (the settle window decides)."""
    with open_regular(path) as f:
        head = f.read(_TAR_BLOCK)
        if not head:
            return "empty file"
        if head[257:262] != b"ustar":
            return None
        size = f.seek(0, 2)
        if size % _TAR_BLOCK or size < 3 * _TAR_BLOCK:
            return "tar is not a whole number of blocks yet"
        f.seek(size - 2 * _TAR_BLOCK)
        if f.read(2 * _TAR_BLOCK).strip(b"\0"):
            return "tar end-of-archive blocks not written yet"
    return None


def check_tf_index(path: Path) -> str | None:
    """A TensorFlow tensor-bundle `.index` is finished when its table footer magic ends it."""
    with open_regular(path) as f:
        size = f.seek(0, 2)
        if size < 48:
            return "index shorter than its table footer"
        f.seek(size - 8)
        (magic,) = struct.unpack("<Q", f.read(8))
    if magic != _TF_TABLE_MAGIC:
        return "index table footer not written yet"
    return None


def check_pickle(path: Path) -> str | None:
    """A pickle (torch DCP `.metadata`) is finished when its last byte is the STOP opcode."""
    with open_regular(path) as f:
        if f.seek(0, 2) == 0:
            return "empty file"
        f.seek(-1, 2)
        if f.read(1) != b".":
            return "pickle does not end with STOP yet"
    return None


def torch_saved_ints(path: Path, keys: Collection[str]) -> dict[str, int | None]:
    """The integer (or None) stored under the first occurrence of each of `keys` in a
    torch.save zip (`global_step`, `dp_world_size`), found by walking data.pkl's opcodes:
    nothing is unpickled, nothing imported. A key whose value is anything else is left out;
    unreadable or unusual files give an empty answer, never an error."""
    found: dict[str, int | None] = {}
    try:
        with open_regular(path) as f, zipfile.ZipFile(f) as archive:
            member = next(
                (i for i in archive.infolist() if i.filename.rpartition("/")[2] == "data.pkl"),
                None,
            )
            if member is None or member.file_size > _PICKLE_LIMIT:
                return found
            data = archive.read(member)
    except (OSError, zipfile.BadZipFile, ValueError, EOFError, NotImplementedError, RuntimeError):
        return found  # unreadable, torn, or compressed or encrypted in a way torch never is
    key: str | None = None
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name in _STR_OPS and arg in keys and arg not in found:
                key = str(arg)
            elif key is not None and opcode.name in _INT_OPS and isinstance(arg, int):
                found[key], key = arg, None
            elif key is not None and opcode.name == "NONE":
                found[key], key = None, None
            elif opcode.name not in _MEMO_OPS:
                key = None
    except (ValueError, EOFError, struct.error):  # truncated or unusual: keep what was found
        pass
    return found


def check_file(path: Path) -> str | None:
    """Run the check that fits the file's type; files of unknown type pass."""
    check: Callable[[Path], str | None] | None = None
    if path.suffix in _ZIP_SUFFIXES:
        check = check_zip
    elif path.suffix == ".safetensors":
        check = check_safetensors
    elif path.suffix == ".json":
        check = check_json
    elif path.suffix == ".h5":
        check = check_hdf5
    elif path.suffix in (".nemo", ".tar"):
        check = check_tar
    if check is None:
        return None
    return guarded(check, path)


UNREADABLE = "cannot read"


def guarded(check: Callable[[Path], str | None], path: Path) -> str | None:
    """Run `check`; an unreadable file is a problem to retry, a vanished one propagates."""
    try:
        return check(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        return f"{UNREADABLE} {path}: {exc.strerror or exc}"
