"""Snapshots, with the copies taken off the coordinator thread.

A hard link takes microseconds and is taken at once. But when state_dir is on another
filesystem than the checkpoints (a hardened systemd unit's /var/lib, say) the snapshot is a
copy, and a copy of a large checkpoint takes minutes: the coordinator must keep detecting,
queueing and answering systemd's watchdog meanwhile. One thread takes the copies, in the
order the checkpoints were found, so that a watch entry's steps reach the journal in order
(an entry's checkpoints share a filesystem: they are all linked or all copied).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ckptd import snapshot
from ckptd.checkpoint import FileState
from ckptd.detect import Detector, ReadyCheckpoint
from ckptd.errors import CheckpointChanged
from ckptd.logs import worth_logging

__all__ = ["Stager", "Taken"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Taken:
    """A snapshot that is complete and verified, for the coordinator to journal."""

    detector: Detector
    ready: ReadyCheckpoint
    dest: Path
    files: tuple[FileState, ...]


@dataclass
class _Job:
    detector: Detector
    ready: ReadyCheckpoint
    dest: Path
    future: Future[tuple[FileState, ...]]


class Stager:
    """Takes snapshots under `staging`: `take()` links at once or starts a copy, which
    `collect()` hands over when done. A failure is logged and the checkpoint is tried again
    when the detector offers it again."""

    def __init__(self, staging: Path, wake: threading.Event) -> None:
        self.staging = staging
        self._wake = wake
        self._pool: ThreadPoolExecutor | None = None
        self._jobs: dict[Path, _Job] = {}  # unit -> snapshot in flight
        self._failures: dict[Path, int] = {}  # unit -> failed attempts in a row

    def start(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ckptd-snapshot")

    def busy(self, unit: Path) -> bool:
        """Is a snapshot of `unit` in flight? (The detector offers it again meanwhile.)"""
        return unit in self._jobs

    def in_flight(self) -> list[Future[tuple[FileState, ...]]]:
        return [job.future for job in self._jobs.values()]

    def take(self, detector: Detector, ready: ReadyCheckpoint) -> Taken | None:
        """Link `ready` into staging now, or start copying it (None: see `collect()`)."""
        assert self._pool is not None, "start() first"
        dest = self.staging / f"{ready.watch.artifact}-{time.time_ns()}"
        try:
            files = snapshot.take(ready.base, ready.files, dest, copy=False)
        except snapshot.CannotLink:
            future = self._pool.submit(snapshot.take, ready.base, ready.files, dest)
            future.add_done_callback(lambda _: self._wake.set())
            self._jobs[ready.unit] = _Job(detector, ready, dest, future)
            return None
        except (OSError, CheckpointChanged) as exc:
            self._failed(detector, ready.unit, exc)
            return None
        self._failures.pop(ready.unit, None)
        return Taken(detector, ready, dest, files)

    def collect(self) -> list[Taken]:
        """The copies finished since the last call, in the order they were started."""
        taken = []
        for unit, job in list(self._jobs.items()):
            if not job.future.done():
                continue
            del self._jobs[unit]
            try:
                files = job.future.result()
            except (OSError, CheckpointChanged) as exc:
                self._failed(job.detector, unit, exc)
            except Exception as exc:  # this checkpoint alone; the others are collected
                snapshot.remove(job.dest)
                job.detector.drop(unit, "crashed", f"{type(exc).__name__}: {exc}")
            else:
                self._failures.pop(unit, None)
                taken.append(Taken(job.detector, job.ready, job.dest, files))
        return taken

    def _failed(self, detector: Detector, unit: Path, exc: OSError | CheckpointChanged) -> None:
        if isinstance(exc, FileNotFoundError):
            log.info("%s was deleted before it could be snapshotted (rotated away)", unit)
            detector.forget(unit)
        elif isinstance(exc, CheckpointChanged):
            log.info("%s; waiting for it to settle again", exc)
        else:
            failures = self._failures[unit] = self._failures.get(unit, 0) + 1
            if worth_logging(failures):
                log.error(
                    "cannot snapshot %s into %s: %s (attempt %d); retrying: is state_dir "
                    "full or read-only?", unit, self.staging, exc.strerror or exc, failures,
                )  # fmt: skip

    def shutdown(self) -> None:
        """Stop taking snapshots. One being copied runs on to its end; what it leaves in
        staging, no journal row points at, and the next start reclaims it."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
