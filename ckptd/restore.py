"""`ckptd restore`: bring a published checkpoint back before training resumes.

The first reference that exists wins (`--alias best --alias latest`, or one `--version`).
The sink (`Sink.resolve`, `Sink.download`) finds the version and downloads its files into a
hidden directory inside the destination (a mount point such as an emptyDir cannot be renamed
over, and a directory beside it may be on another filesystem); they are checked against the
version's md5s and sizes, and then renamed into place one top-level entry at a time, so the
training job sees each file or checkpoint directory whole or not at all. A destination ckptd
watches would publish the restored files again, so restore into a directory of its own
(`ckptd restore --config` refuses a watched one).

Outcomes: a version restored; nothing published yet (the first start of a job: nothing is
written, not even the destination); or skipped because the destination already holds a
checkpoint (`if_missing`). Everything else raises `RestoreError`: a bad key, no network, a
corrupt download, or a collection that has versions but none under the names asked for
(starting training from scratch over existing checkpoints is never a silent fallback).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from ckptd import references
from ckptd.errors import CkptdError, PublishError
from ckptd.hashing import md5_b64
from ckptd.sinks import Sink, StoredFile, StoredVersion

__all__ = [
    "RestoreError",
    "Restored",
    "has_checkpoint",
    "refuse_references",
    "restore",
    "version_ref",
]

log = logging.getLogger(__name__)

STAGING_PREFIX = ".ckptd-restore-"
_VERSION = re.compile(r"^v?(\d+)$")


class RestoreError(CkptdError):
    """Restoring failed for a reason that nothing but a fix or a retry resolves."""


@dataclass(frozen=True)
class Restored:
    """What `restore` did: `status` is `restored`, `empty` (nothing published yet) or
    `skipped` (the destination already had a checkpoint); `message` says it for a person."""

    status: Literal["restored", "empty", "skipped"]
    message: str
    ref: str | None = None
    version: str | None = None
    files: tuple[str, ...] = ()


def version_ref(text: str) -> str:
    """`v3` or `3` as the version reference `v3`; ValueError otherwise."""
    match = _VERSION.match(text.strip())
    if match is None:
        raise ValueError(f"expected a version such as v3, got {text!r}")
    return f"v{int(match[1])}"


def has_checkpoint(dest: Path) -> bool:
    """True if `dest` holds any file outside hidden names (temp files, restore staging)."""
    if not dest.is_dir():
        return False
    for _root, dirs, files in os.walk(dest):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if any(not name.startswith(".") for name in files):
            return True
    return False


def restore(
    artifact: str,
    dest: Path,
    sink: Sink,
    *,
    refs: Iterable[str] = ("latest",),
    if_missing: bool = False,
    reference_roots: Iterable[Path] = (),
    reference_prefixes: Iterable[str] = (),
) -> Restored:
    """Download the first of `refs` (aliases or `vN`) that exists into `dest`.

    A version whose files reference data elsewhere is refused unless each reference is an
    http(s) URL, a `file://` path under one of `reference_roots`, or an object under one of
    `reference_prefixes` (`s3://bucket/prefix/`): a reference is followed by the sink with
    the caller's own credentials, so a hostile version could copy any local file, or any
    object those credentials can read, into `dest`."""
    refs = tuple(refs) or ("latest",)
    if if_missing and has_checkpoint(dest):
        return Restored("skipped", f"{dest} already holds a checkpoint; nothing restored")
    for ref in refs:
        found = _resolve(sink, artifact, ref)
        if found is None:
            log.info("%s:%s does not exist", artifact, ref)
            continue
        refuse_references(
            found.files, found.label, tuple(reference_roots), tuple(reference_prefixes)
        )
        files = _download(sink, found, dest)
        return Restored(
            "restored",
            f"restored {found.label} ({ref}) into {dest}: {len(files)} file(s)",
            ref=ref,
            version=found.version,
            files=files,
        )
    asked = ", ".join(refs)
    if "latest" not in refs and (latest := _resolve(sink, artifact, "latest")) is not None:
        hint = "" if any(_VERSION.match(r) for r in refs) else " (end with --alias latest)"
        raise RestoreError(
            f"{latest.label.rsplit(':', 1)[0]} has versions (latest is {latest.version}) but "
            f"none named {asked}; nothing restored{hint}"
        )
    return Restored("empty", f"nothing to restore: {artifact} has no version yet ({asked})")


def _resolve(sink: Sink, artifact: str, ref: str) -> StoredVersion | None:
    try:
        return sink.resolve(artifact, ref)
    except PublishError as exc:
        raise RestoreError(str(exc)) from None


def _download(sink: Sink, version: StoredVersion, dest: Path) -> tuple[str, ...]:
    """Download, verify and move `version`'s files into `dest`; returns their names.
    On failure nothing is left behind: no staging directory, nor `dest` if this made it."""
    label = version.label
    names = sorted(f.name for f in version.files)
    for name in names:
        path = PurePosixPath(name)
        if path.is_absolute() or ".." in path.parts or not path.parts:
            raise RestoreError(f"{label}: refusing a file named {name!r} in the manifest")
    created = not dest.exists()
    try:
        dest.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(dest)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=dest))
    except OSError as exc:
        raise RestoreError(f"cannot write into {dest}: {exc.strerror or exc}") from None
    try:
        try:
            sink.download(version, staging)
        except PublishError as exc:
            raise RestoreError(str(exc)) from None
        for file in version.files:
            _verify(staging / file.name, file, f"{label}: {file.name}")
        try:
            _install(staging, dest)
        except OSError as exc:
            raise RestoreError(f"cannot move the download into {dest}: {exc}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                dest.rmdir()  # only if empty: never a file that was there or got in
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return tuple(names)


def refuse_references(
    files: Iterable[StoredFile],
    label: str,
    roots: tuple[Path, ...],
    prefixes: tuple[str, ...] = (),
) -> None:
    """Raise RestoreError unless every referenced file points where the user allows: an
    http(s) URL, a `file://` path that resolves under one of `roots`, or an `s3://` or
    `gs://` object under one of `prefixes`."""
    real_roots = [Path(os.path.realpath(root)) for root in roots]
    for file in sorted(files, key=lambda f: f.name):
        name, ref = file.name, file.ref
        if ref is None:
            continue
        url = urllib.parse.urlparse(str(ref))
        if url.scheme in ("http", "https"):
            continue
        if url.scheme == "file":
            target = Path(os.path.realpath(urllib.parse.unquote(url.path)))
            if any(target.is_relative_to(root) for root in real_roots):
                continue
            allowed = ", ".join(map(str, roots)) or "none"
            raise RestoreError(
                f"{label}: refusing {name!r}: it references {ref}, outside the directories "
                f"allowed by --allow-reference-root ({allowed})"
            )
        if url.scheme in references.OBJECT_STORE_SCHEMES:
            if any(str(ref).startswith(prefix) for prefix in prefixes):
                continue
            allowed = ", ".join(prefixes) or "none"
            raise RestoreError(
                f"{label}: refusing {name!r}: it references {ref}, outside the prefixes "
                f"allowed by --allow-reference-root or a watch entry's reference.uri ({allowed})"
            )
        raise RestoreError(
            f"{label}: refusing {name!r}: it references {ref}; only http(s) references, "
            "file:// and s3:// or gs:// under --allow-reference-root are followed"
        )


def _verify(path: Path, file: StoredFile, label: str) -> None:
    """The downloaded file has the version's size and md5 (a reference's md5 where the sink
    knows one: see `StoredFile`)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise RestoreError(f"{label}: missing from the download") from None
    if file.size is not None and size != file.size:
        raise RestoreError(f"{label}: {size} bytes downloaded, the manifest says {file.size}")
    if file.md5_b64 is not None and md5_b64(path) != file.md5_b64:
        raise RestoreError(f"{label}: md5 does not match the manifest (corrupt download)")


def _install(staging: Path, dest: Path) -> None:
    """Rename each top-level entry of `staging` into `dest`: directories first, then files
    (a marker file such as DeepSpeed's `latest` names a directory that is already there).
    An existing file is replaced atomically; an existing directory is moved aside first."""
    entries = sorted(staging.iterdir(), key=lambda p: (not p.is_dir(), p.name))
    aside = staging / ".replaced"
    for entry in entries:
        final = dest / entry.name
        if os.path.lexists(final) and (entry.is_dir() or final.is_dir()):
            aside.mkdir(exist_ok=True)
            final.rename(aside / entry.name)
        entry.replace(final)


def _remove_stale_staging(dest: Path) -> None:
    """Staging directories left by a restore that was killed half way."""
    for stale in dest.glob(f"{STAGING_PREFIX}*"):
        with contextlib.suppress(OSError):
            shutil.rmtree(stale)
