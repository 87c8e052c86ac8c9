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
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ckptd import snapshot
from ckptd.checkpoint import FileState
from ckptd.detect import ReadyCheckpoint
from ckptd.errors import CheckpointChanged
from ckptd.logs import worth_logging

__all__ = ["NotTaken", "Stager", "Taken"]

log = logging.getLogger(__name__)


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
            files = snapshot.take(ready.base, ready.files, dest, copy=False)
        except snapshot.CannotLink:
            future = self._pool.submit(snapshot.take, ready.base, ready.files, dest)
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
                snapshot.remove(job.dest)
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
