"""What ckptd accepts from a watched directory, which anyone who can write there controls.

Only regular files are opened, and never in a way that can block: a FIFO, socket or device
named like a checkpoint or a sidecar is refused by name (opening a FIFO for reading waits for
a writer, forever). Files read on a checkpoint's behalf (sidecars) must resolve inside the
watched root. Names must be text the journal, the logs and W&B can carry.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from ckptd.errors import CkptdError

__all__ = [
    "NotRegularFile",
    "OutsideRoot",
    "name_problem",
    "open_regular",
    "printable",
    "regular_problem",
]

_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFDIR: "a directory",
    stat.S_IFLNK: "a symlink",
}
_MAX_NAME_BYTES = 255  # NAME_MAX on every filesystem ckptd meets
_MAX_PATH_BYTES = 4096  # PATH_MAX


class NotRegularFile(CkptdError, OSError):
    """A path ckptd was about to read is not a regular file (a FIFO, socket, device...)."""


class OutsideRoot(CkptdError, OSError):
    """A path ckptd was about to read resolves outside the watched root (a symlink out)."""


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def regular_problem(path: Path) -> str | None:
    """None if `path` (its final symlink followed) is a regular file, else what it is.
    Raises FileNotFoundError if it is missing."""
    mode = path.stat().st_mode
    return None if stat.S_ISREG(mode) else f"{path} is {_kind(mode)}, not a regular file"


def open_regular(path: Path, root: Path | None = None) -> BinaryIO:
    """Open `path` for reading if it is a regular file (and, given `root`, resolves inside
    it); never blocks. Raises NotRegularFile, OutsideRoot, or the OSError of open/stat."""
    if root is not None:
        target = os.path.realpath(path)
        if not Path(target).is_relative_to(os.path.realpath(root)):
            raise OutsideRoot(f"{path} resolves to {target}, outside the watched root {root}")
    problem = regular_problem(path)
    if problem is not None:
        raise NotRegularFile(problem)
    # O_NONBLOCK: if a FIFO was swapped in after the stat, open returns at once instead of
    # waiting for a writer, and fstat below refuses it.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(f"{path} is {_kind(mode)}, not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def name_problem(path: Path, root: Path) -> str | None:
    """None if the name of `path` (relative to `root`) can be stored and shown, else why not:
    not valid UTF-8, control characters (which would forge log lines), or too long."""
    try:
        relative = path.relative_to(root).as_posix()
    except ValueError:
        relative = str(path)
    try:
        encoded = relative.encode("utf-8")
    except UnicodeEncodeError:
        return f"its name is not valid UTF-8: {printable(relative)}"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in relative):
        return f"its name holds control characters: {relative!r}"
    if len(encoded) > _MAX_PATH_BYTES or any(
        len(part.encode()) > _MAX_NAME_BYTES for part in relative.split("/")
    ):
        return f"its name is too long: {relative[:80]!r}..."
    return None


def printable(value: object) -> str:
    """`str(value)` where that is valid UTF-8 text, else its repr (undecodable bytes of a
    file name, which the journal and a UTF-8 log cannot carry, shown escaped)."""
    text = str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return repr(text)
    return text
