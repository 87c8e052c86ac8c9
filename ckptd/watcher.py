"""The watcher: watchdog observers that turn filesystem events into hints for the detector.

Events are hints only: a hint names a path and the detector re-checks the checkpoint it
belongs to. Handlers run on watchdog's dispatch thread and do nothing but enqueue.
inotify never sees writes made by other nodes of a network filesystem, so `observer: auto`
picks the polling observer on NFS, Lustre, GPFS, CIFS and FUSE mounts.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watchdog.events import (
    DirMovedEvent,
    FileClosedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.inotify import InotifyObserver
from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper
from watchdog.observers.polling import PollingObserver

from ckptd.config import WatchConfig

__all__ = ["Hint", "Watcher", "filesystem_type", "observer_kind"]

log = logging.getLogger(__name__)

# watchdog holds each IN_MOVED_FROM back to pair it with its IN_MOVED_TO, and its reader
# sleeps out the whole hold even when the pair forms microseconds later (watchdog issue
# #649): a rename into place was then seen 0.5 s late about one time in a hundred (the
# latency benchmark's p99). A rename's two events come from one syscall, so pairing needs
# far less; and with full events an unpaired IN_MOVED_TO still reads as a move in.
_MOVE_PAIRING = 0.05  # seconds

NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "lustre", "gpfs", "cifs", "smb3", "smbfs", "fuse", "fuseblk", "beegfs",
    "ceph", "glusterfs", "9p", "afs", "panfs", "wekafs", "virtiofs",
})  # fmt: skip


@dataclass(frozen=True)
class Hint:
    """Something happened at `path` under watch entry `watch_index`. `moved_in` marks a
    rename into place; `written` a file written to (created or modified); `closed` a file
    closed after writing (inotify's IN_CLOSE_WRITE: the polling observer never sends it);
    `overflow` means events were lost and the root needs a rescan."""

    watch_index: int
    path: Path
    moved_in: bool = False
    overflow: bool = False
    written: bool = False
    closed: bool = False


def filesystem_type(path: Path, mounts: str = "/proc/self/mounts") -> str:
    """The type of the filesystem holding `path`, from the mount table ('' if unknown)."""
    try:
        table = Path(mounts).read_text()
    except OSError:
        return ""
    target = os.path.realpath(path)
    best, best_type = "", ""
    for line in table.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        mount_point = fields[1].replace("\\040", " ")
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, best_type = mount_point, fields[2]
    return best_type


def observer_kind(watch: WatchConfig, mounts: str = "/proc/self/mounts") -> str:
    """`inotify` or `polling` for a watch entry (`auto` decides by filesystem type)."""
    if watch.observer != "auto":
        return watch.observer
    fstype = filesystem_type(watch.path, mounts)
    if fstype.split(".")[0] in NETWORK_FILESYSTEMS or fstype.startswith("fuse"):
        return "polling"
    return "inotify"


class _Handler(FileSystemEventHandler):
    """Runs on watchdog's dispatch thread: enqueue and wake, nothing more."""

    def __init__(self, index: int, hints: queue.SimpleQueue[Hint], wake: threading.Event) -> None:
        self._index = index
        self._hints = hints
        self._wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        # Opens and reads say nothing about a write; attribute changes come from chmod,
        # touch and ckptd's own hard links (the link count), never from new content.
        if event.event_type in {"opened", "closed_no_write", "attrib"}:
            return
        moved = isinstance(event, FileMovedEvent | DirMovedEvent)
        # A move's source is empty when it came from outside the watched tree; its
        # destination is empty when it left it (inotify's unpaired halves).
        if event.src_path:
            source = Path(os.fsdecode(event.src_path))
            written = event.event_type in {"created", "modified"} and not event.is_directory
            closed = isinstance(event, FileClosedEvent)
            self._hints.put(Hint(self._index, source, written=written, closed=closed))
        if moved and event.dest_path:
            dest = Path(os.fsdecode(event.dest_path))
            self._hints.put(Hint(self._index, dest, moved_in=True))
        if isinstance(event, FileClosedEvent) or moved or event.event_type == "created":
            self._wake.set()


class _OverflowSignal(logging.Handler):
    """watchdog reports a lost inotify queue only in a log line; turn it into a rescan."""

    def __init__(self, hints: queue.SimpleQueue[Hint], wake: threading.Event) -> None:
        super().__init__(logging.WARNING)
        self._hints = hints
        self._wake = wake

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self._hints.put(Hint(-1, Path("/"), overflow=True))
            self._wake.set()


class Watcher:
    """Observers for every watch entry. Cheap to construct; `start()` creates the threads."""

    def __init__(
        self,
        watches: tuple[WatchConfig, ...],
        hints: queue.SimpleQueue[Hint],
        wake: threading.Event,
    ) -> None:
        self.watches = watches
        self.hints = hints
        self.wake = wake
        self._observers: list[Any] = []
        self._overflow = _OverflowSignal(hints, wake)

    def start(self) -> None:
        """Create missing roots and start one observer per kind."""
        logging.getLogger("watchdog.observers.inotify_c").addHandler(self._overflow)
        inotify: Any = None
        for index, watch in enumerate(self.watches):
            watch.path.mkdir(parents=True, exist_ok=True)
            kind = observer_kind(watch)
            observer: Any
            if kind == "polling":
                # One polling observer per entry: each has its own interval.
                observer = PollingObserver(timeout=watch.poll_interval)
                self._observers.append(observer)
            else:
                if inotify is None:
                    InotifyMoveEventGrouper.delay = _MOVE_PAIRING
                    inotify = InotifyObserver(generate_full_events=True)
                    self._observers.append(inotify)
                observer = inotify
            # Directory checkpoints change below the root, so every format but plain files
            # needs the subtree watched; the format itself decides what a path belongs to.
            recursive = watch.recursive or watch.format != "file"
            observer.schedule(
                _Handler(index, self.hints, self.wake), str(watch.path), recursive=recursive
            )
            log.info("watching %s with the %s observer", watch.path, kind)
        for observer in self._observers:
            observer.daemon = True
            observer.start()

    def alive(self) -> bool:
        """True while every observer thread runs (for /healthz)."""
        return bool(self._observers) and all(o.is_alive() for o in self._observers)

    def stop(self) -> None:
        logging.getLogger("watchdog.observers.inotify_c").removeHandler(self._overflow)
        for observer in self._observers:
            observer.stop()
        for observer in self._observers:
            observer.join(timeout=5)
        self._observers.clear()
