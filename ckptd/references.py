"""Reference artifacts: versions that point at checkpoint files where they already live.

A watch entry with `reference` publishes no bytes. `reference: file` says the watched path
is on a shared filesystem that every reader mounts at the same path: each file is recorded as
a `file://` reference with the md5 ckptd computed. `reference: {uri, local}` says the watched
path is a mount (Mountpoint for S3, s3fs, gcsfuse) of the object store prefix `uri` at
`local`: each file is recorded as a reference to its object, with the ETag that the store
reports (the wandb SDK's `add_reference` asks it). Either way the version costs no storage
on W&B, and deleting a version deletes only the version, never the referenced bytes.

This module maps a checkpoint file to its reference and checks the config; the W&B sink
records the references.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import re
import urllib.parse
from pathlib import Path, PurePosixPath
from typing import Protocol

from ckptd.checkpoint import FileState

__all__ = [
    "OBJECT_STORE_SCHEMES",
    "check_store_uri",
    "checkpoint_base",
    "md5_matches",
    "missing_library",
    "object_uri",
    "reference_of",
    "source_changed",
]

# The schemes the wandb SDK follows with the store's own client, and that client's package.
OBJECT_STORE_SCHEMES = {"s3": ("boto3", "s3"), "gs": ("google.cloud.storage", "gcs")}
_HEX_MD5 = re.compile(r"^[0-9a-f]{32}$")
_B64_MD5 = re.compile(r"^[A-Za-z0-9+/]{22}==$")


def check_store_uri(uri: str) -> str:
    """`uri` as a prefix ending in '/', or ValueError saying what is wrong with it."""
    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme not in OBJECT_STORE_SCHEMES:
        known = " or ".join(f"{s}://" for s in OBJECT_STORE_SCHEMES)
        raise ValueError(
            f"expected an object store prefix such as s3://bucket/prefix/ ({known}), got {uri!r}"
        )
    if not parsed.netloc:
        raise ValueError(f"no bucket in {uri!r}")
    if parsed.query or parsed.fragment or "?" in uri or "#" in uri:
        raise ValueError(f"a prefix has no '?' or '#' part, got {uri!r}")
    return uri if uri.endswith("/") else f"{uri}/"


def missing_library(uri: str) -> str | None:
    """Why the wandb SDK cannot follow references of `uri`'s scheme here (its client library
    is not installed), else None."""
    scheme = urllib.parse.urlsplit(uri).scheme
    module, extra = OBJECT_STORE_SCHEMES[scheme]
    try:
        found = importlib.util.find_spec(module) is not None  # found, not imported: cheap
    except (ImportError, ValueError):  # a parent package is missing, or a broken install
        found = False
    if not found:
        return (
            f"{scheme}:// references need the {module.split('.')[0]} library, which is not "
            f"installed: pip install 'ckptd[{extra}]'"
        )
    return None


def object_uri(prefix: str, local: Path, path: Path) -> str:
    """The object that `path` (under the mount `local` of `prefix`) is. ValueError where
    the path is outside the mount or its key could not be read back from a URI."""
    relative = Path(os.path.normpath(path)).relative_to(local)  # ValueError if outside
    key = PurePosixPath(*relative.parts).as_posix()
    if "?" in key or "#" in key:
        raise ValueError(f"{path}: a name with '?' or '#' cannot be an object reference")
    return f"{prefix}{key}"


def source_changed(base: Path, files: tuple[FileState, ...]) -> tuple[str, str] | None:
    """Whether the files of a checkpoint, as they are now under `base`, are still the ones
    ckptd detected and hashed (a reference records the path, not the bytes): None if so,
    else ("unreferenceable", why) for a file that is gone, or ("changed", why)."""
    for expected in files:
        try:
            now = FileState.of(expected.name, base / expected.name)
        except FileNotFoundError:
            return "unreferenceable", f"{expected.name} was removed before it was referenced"
        except OSError as exc:
            return "unreferenceable", f"{expected.name} cannot be read: {exc.strerror or exc}"
        if (now.size, now.ino, now.mtime_ns) != (expected.size, expected.ino, expected.mtime_ns):
            return "changed", f"{expected.name} was replaced or rewritten before it was referenced"
    return None


class _Mount(Protocol):
    """An object store prefix (`uri`) and where it is mounted (`local`)."""

    @property
    def uri(self) -> str: ...

    @property
    def local(self) -> Path: ...


def reference_of(reference: str | _Mount | None, path: Path) -> str | None:
    """The URI that records `path` (a file of a checkpoint in the watched directory) under a
    watch entry's `reference`: None (no reference: upload it), its `file://` URI, or its
    object's URI. ValueError where the file cannot be referenced."""
    if reference is None:
        return None
    if reference == "file":
        return Path(os.path.abspath(path)).as_uri()  # noqa: PTH100 - not resolve(): the path readers see
    assert not isinstance(reference, str)
    return object_uri(reference.uri, reference.local, path)


def checkpoint_base(source: Path, names: list[str]) -> Path:
    """The directory a checkpoint's file names are relative to: the checkpoint itself for a
    directory, its parent for a single file (also once the checkpoint is gone)."""
    if source.is_dir():
        return source
    if len(names) == 1 and names[0] == source.name:
        return source.parent
    return source


def md5_matches(digest: str, md5_b64: str) -> bool | None:
    """Whether a store's digest of an object says its bytes have this md5: True or False
    where the digest is an md5 (a single-part S3 ETag is the hex md5, GCS reports base64),
    None where it is not one (a multipart ETag such as `...-3`) and cannot tell."""
    digest = digest.strip('"')
    if _HEX_MD5.match(digest):
        return digest == base64.b64decode(md5_b64).hex()
    if _B64_MD5.match(digest):
        return digest == md5_b64
    return None
