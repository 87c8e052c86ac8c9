"""Hard-link snapshots: a finished checkpoint's files, pinned under state_dir/staging.

A framework's own rotation may delete a checkpoint while it uploads; a hard link keeps the
bytes alive at no cost. A link does not protect against a rewrite in place (same inode), so
the snapshot's identities are checked again after the upload. Across filesystems a link is
impossible and the file is copied instead (logged once per watched directory).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

from ckptd.checkpoint import FileState
from ckptd.errors import CheckpointChanged

__all__ = ["CannotLink", "remove", "take", "try_link", "verify"]

log = logging.getLogger(__name__)
_copy_warned: set[Path] = set()


class CannotLink(OSError):
    """`take(copy=False)` met a file it cannot hard-link (another filesystem, say)."""


def take(
    base: Path, files: tuple[FileState, ...], dest: Path, *, copy: bool = True
) -> tuple[FileState, ...]:
    """Pin `files` (named relative to `base`) under `dest`; return the snapshot's identities.

    Raises CheckpointChanged if a file changed since `files` was taken, FileNotFoundError
    if one vanished (rotated away), CannotLink if `copy` is False and a file would have to
    be copied. `dest` is removed on any failure.
    """
    dest.mkdir(parents=True, exist_ok=False)
    try:
        states = []
        for expected in files:
            source = base / expected.name
            target = dest / expected.name
            target.parent.mkdir(parents=True, exist_ok=True)
            linked = _link_or_copy(source, target, copy)
            now = FileState.of(expected.name, source if not linked else target)
            if not expected.same_bytes(now, same_inode=linked):
                raise CheckpointChanged(f"{source} changed while it was being snapshotted")
            states.append(FileState.of(expected.name, target))
        return tuple(states)
    except BaseException:
        remove(dest)
        raise


def try_link(source: Path, target: Path) -> bool:
    """Hard-link `source` to `target`; False where only a copy can do (another filesystem,
    another user's file under protected_hardlinks, too many links). Other errors raise."""
    return _link(source, target) is None


def _link(source: Path, target: Path) -> int | None:
    """Hard-link `source` to `target`: None, or the errno where only a copy can do."""
    try:
        os.link(source, target, follow_symlinks=True)
        return None
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        return exc.errno


def _link_or_copy(source: Path, target: Path, copy: bool) -> bool:
    """Hard-link `source` to `target`, or copy it across filesystems; True if linked."""
    code = _link(source, target)
    if code is None:
        return True
    if not copy:
        raise CannotLink(code, f"cannot hard-link {source} into {target.parent}")
    parent = source.parent
    if parent not in _copy_warned:
        _copy_warned.add(parent)
        log.warning(
            "cannot hard-link from %s into the state directory (another filesystem?); "
            "copying checkpoints instead, which costs disk and time: put state_dir on the "
            "same filesystem as the checkpoints",
            parent,
        )
    shutil.copy2(source, target)
    return False


def verify(dest: Path, files: tuple[FileState, ...]) -> str | None:
    """None if the snapshot still holds the bytes it was taken with, else what changed."""
    for expected in files:
        try:
            now = FileState.of(expected.name, dest / expected.name)
        except FileNotFoundError:
            return f"{dest / expected.name} vanished from the snapshot"
        if not expected.same_bytes(now):
            return f"{expected.name} was rewritten in place while it was uploaded"
    return None


def remove(dest: Path) -> None:
    """Drop a snapshot (its links; the checkpoint itself is untouched)."""
    shutil.rmtree(dest, ignore_errors=True)
