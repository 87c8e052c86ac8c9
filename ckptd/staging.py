"""Staging: a finished checkpoint's files pinned under state_dir/staging, for as long as
its publish needs them.

A framework's own rotation may delete a checkpoint while it uploads; a hard link keeps the
bytes alive at no cost, and is taken at once. A link does not protect against a rewrite in
place (same inode), so the snapshot's identities are checked again after the upload. Across
filesystems a link is impossible and the file is copied instead (logged once per watched
directory); a copy of a large checkpoint takes minutes, so `Stager` takes copies off the
coordinator thread: the coordinator keeps detecting, queueing and answering systemd's
watchdog meanwhile. One thread takes the copies, in the order the checkpoints were found,
so that a watch entry's steps reach the journal in order (an entry's checkpoints share a
filesystem: they are all linked or all copied).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ckptd.checkpoint import FileState
from ckptd.errors import CheckpointChanged
from ckptd.logs import worth_logging

if TYPE_CHECKING:  # the detector holds snapshots (ckptd.holds): no import at run time
    from ckptd.detect import ReadyCheckpoint

__all__ = ["CannotLink", "NotTaken", "Stager", "Taken", "remove", "take", "try_link", "verify"]

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


@dataclass(frozen=True)
class Taken:
    """A snapshot that is complete and verified, for the coordinator to journal."""

    ready: ReadyCheckpoint
    dest: Path
    files: tuple[FileState, ...]


@dataclass(frozen=True)
class NotTaken:
    """A snapshot that failed, for the coordinator to tell the detector: the checkpoint
    `vanished` (rotated away: forget it), `crashed` (drop it, with `detail`), or the failure
    is worth `retry`ing when the detector offers it again."""

    ready: ReadyCheckpoint
    outcome: Literal["vanished", "crashed", "retry"]
    detail: str = ""


@dataclass
class _Job:
    ready: ReadyCheckpoint
    dest: Path
    future: Future[tuple[FileState, ...]]


class Stager:
    """Takes snapshots under `staging`: `take()` links at once or starts a copy, which
    `collect()` hands over when done. A failure is logged and handed back as `NotTaken`."""

    def __init__(
        self,
        staging: Path,
        wake: threading.Event,
        pool: Callable[[], Executor] = lambda: ThreadPoolExecutor(
            1, thread_name_prefix="ckptd-snapshot"
        ),
    ) -> None:
        self.staging = staging
        self._wake = wake
        self._make_pool = pool
        self._pool: Executor | None = None
        self._jobs: dict[Path, _Job] = {}  # unit -> snapshot in flight
        self._failures: dict[Path, int] = {}  # unit -> failed attempts in a row

    def start(self) -> None:
        self._pool = self._make_pool()

    def busy(self, unit: Path) -> bool:
        """Is a snapshot of `unit` in flight? (The detector offers it again meanwhile.)"""
        return unit in self._jobs

    def in_flight(self) -> list[Future[tuple[FileState, ...]]]:
        return [job.future for job in self._jobs.values()]

    def take(self, ready: ReadyCheckpoint) -> Taken | NotTaken | None:
        """Link `ready` into staging now, or start copying it (None: see `collect()`)."""
        assert self._pool is not None, "start() first"
        dest = self.staging / f"{ready.watch.artifact}-{time.time_ns()}"
        try:
            files = take(ready.base, ready.files, dest, copy=False)
        except CannotLink:
            future = self._pool.submit(take, ready.base, ready.files, dest)
            future.add_done_callback(lambda _: self._wake.set())
            self._jobs[ready.unit] = _Job(ready, dest, future)
            return None
        except (OSError, CheckpointChanged) as exc:
            return self._failed(ready, exc)
        self._failures.pop(ready.unit, None)
        return Taken(ready, dest, files)

    def collect(self) -> list[Taken | NotTaken]:
        """The copies finished since the last call, in the order they were started."""
        done: list[Taken | NotTaken] = []
        for unit, job in list(self._jobs.items()):
            if not job.future.done():
                continue
            del self._jobs[unit]
            try:
                files = job.future.result()
            except (OSError, CheckpointChanged) as exc:
                done.append(self._failed(job.ready, exc))
            except Exception as exc:  # this checkpoint alone; the others are collected
                remove(job.dest)
                done.append(NotTaken(job.ready, "crashed", f"{type(exc).__name__}: {exc}"))
            else:
                self._failures.pop(unit, None)
                done.append(Taken(job.ready, job.dest, files))
        return done

    def _failed(self, ready: ReadyCheckpoint, exc: OSError | CheckpointChanged) -> NotTaken:
        unit = ready.unit
        if isinstance(exc, FileNotFoundError):
            log.info("%s was deleted before it could be snapshotted (rotated away)", unit)
            return NotTaken(ready, "vanished")
        if isinstance(exc, CheckpointChanged):
            log.info("%s; waiting for it to settle again", exc)
            return NotTaken(ready, "retry")
        failures = self._failures[unit] = self._failures.get(unit, 0) + 1
        if worth_logging(failures):
            log.error(
                "cannot snapshot %s into %s: %s (attempt %d); retrying: is state_dir "
                "full or read-only?", unit, self.staging, exc.strerror or exc, failures,
            )  # fmt: skip
        return NotTaken(ready, "retry")

    def shutdown(self) -> None:
        """Stop taking snapshots. One being copied runs on to its end; what it leaves in
        staging, no journal row points at, and the next start reclaims it."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
