"""Is anybody still writing a file? The kernel knows: a read lease is granted only while no
process has the file open for writing.

inotify tells when a file was closed after a write, but a file that was written and closed
before the watch reached its directory (a new checkpoint directory's first files, seen only
as created) has no close to show. For those, and to check that no file of a finished-looking
checkpoint was opened for writing again, ckptd asks for a read lease and gives it back at
once. Taking one needs the file's owner or CAP_LEASE; where the kernel cannot say (another
user's files, a filesystem without leases) the answer is "unknown" and `settle` decides.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
from pathlib import Path

__all__ = ["open_for_writing"]


def open_for_writing(path: Path) -> bool | None:
    """True if some process has `path` open for writing, False if none has, None if the
    kernel will not say. Never blocks: the lease is held for two system calls."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        # A writer opening the file while the lease is held breaks it with a signal: make it
        # one whose default is to be ignored, and give the lease back at once.
        fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGWINCH)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        return True if exc.errno in (errno.EAGAIN, errno.EBUSY) else None
    else:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    finally:
        os.close(fd)
