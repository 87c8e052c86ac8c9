"""Holds: hard links to a candidate's files, taken the moment its files are all present.

Frameworks rotate their checkpoints (Hugging Face's `save_total_limit`, Lightning's top-k,
Orbax's `max_to_keep`) a second after writing the next one, often before the settle window or
the sidecar wait is over. A hard link keeps the inode alive when the framework unlinks the
name, and costs nothing on the same filesystem; once the candidate is finished, its hold
becomes the snapshot the journal row points at. Where a link is impossible the candidate is
copied after it settles instead (the Stager's job), and this module says why.
"""

from __future__ import annotations

import errno
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from ckptd import staging
from ckptd.checkpoint import FileState

__all__ = ["Hold", "Holder", "link_problem"]

log = logging.getLogger(__name__)

_LINK_PROBLEMS = {
    errno.EXDEV: "state_dir is on another filesystem than the checkpoints",
    errno.EPERM: "the files belong to another user and fs.protected_hardlinks forbids linking them",
    errno.EMLINK: "the files have too many hard links already",
}


def link_problem(code: int | None) -> str:
    """Why a hard link failed with errno `code`, in words a user can act on."""
    return _LINK_PROBLEMS.get(code or 0, f"errno {code}")


@dataclass(frozen=True)
class Hold:
    """A candidate's files pinned under `dest`; `files` are the links' identities (the same
    inodes, sizes and mtimes as the checkpoint's files when they were linked)."""

    dest: Path
    files: tuple[FileState, ...]

    def still_whole(self) -> tuple[FileState, ...] | None:
        """The links' identities now, or None if one is gone (state_dir cleaned by hand)."""
        try:
            return tuple(FileState.of(f.name, self.dest / f.name) for f in self.files)
        except FileNotFoundError:
            return None


class Holder:
    """Takes and releases holds under `staging` for one watch entry's detector.

    Only the coordinator thread calls it. `take` returns None where a link is impossible and
    says why once per entry; a candidate that vanishes or changes while it is linked raises
    FileNotFoundError or CheckpointChanged, and other OSErrors (a full state_dir) propagate.
    """

    def __init__(self, staging: Path, collection: str) -> None:
        self.staging = staging
        self.collection = collection
        self._cannot_link: str | None = None  # why links fail here, once known

    def take(self, base: Path, files: tuple[FileState, ...]) -> Hold | None:
        if self._cannot_link is not None:
            return None
        dest = self.staging / f"{self.collection}-{time.time_ns()}"
        try:
            linked = staging.take(base, files, dest, copy=False)
        except staging.CannotLink as exc:
            self._cannot_link = link_problem(exc.errno)
            log.warning(
                "cannot hard-link checkpoints from %s into %s (%s): a checkpoint deleted by its "
                "framework before it settles is lost, and each one is copied once finished",
                base, self.staging, self._cannot_link,
            )  # fmt: skip
            return None
        return Hold(dest, linked)

    @staticmethod
    def release(hold: Hold) -> None:
        staging.remove(hold.dest)
