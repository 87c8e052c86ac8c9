"""Drops: every checkpoint that was seen and will not be published, named and counted.

"0 pending" must mean nothing was lost, so nothing leaves the pipeline in silence. Whoever
decides that a candidate will not be published (the detector, the stager, the hasher, the
publisher) reports a `Drop`; `DropLog.record` logs it once as a WARNING naming the path and
the reason, counts it in `ckptd_checkpoints_dropped_total{collection,reason}` and keeps it in
the journal, where `ckptd status` lists it. A drop is cleared when the same path is queued
after all (a checkpoint that was incomplete for a while and then finished).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from ckptd.inputs import printable
from ckptd.journal import Journal
from ckptd.metrics import Metrics

__all__ = ["LOSSES", "REASONS", "Drop", "DropLog"]

log = logging.getLogger(__name__)

REASONS = {
    "vanished": "deleted before it was whole",
    "zero-bytes": "a zero-byte file",
    "incomplete": "still incomplete after incomplete_after",
    "unrecognised": "a directory of checkpoint-like files in a layout ckptd does not know",
    "unreadable": "cannot be read",
    "refused": "not a regular file inside the watched root",
    "invalid": "values that cannot be published",
    "crashed": "ckptd failed on it unexpectedly",
    "gave-up": "publishing failed until retry.give_up_after",
    "unrecorded": "logged offline, lost before W&B wrote it, and its snapshot is gone",
    "unreferenceable": "reference: its file was removed, or its name cannot be in a reference",
    "partial": "a multi-host step that not every host's part reached within distributed.timeout",
}
"""Every drop reason, with what it means (for `status` and the metric's help)."""

LOSSES = frozenset(
    {
        "unreadable", "refused", "invalid", "crashed", "gave-up", "unrecorded",
        "unreferenceable", "partial",
    }
)  # fmt: skip
"""Reasons that lose a checkpoint which was whole on disk: `--once` exits 1 on any of them."""


@dataclass(frozen=True)
class Drop:
    """A candidate that will not be published: where, why (a key of REASONS), and details."""

    collection: str
    path: Path
    reason: str
    detail: str = ""

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"unknown drop reason {self.reason!r}")


class DropLog:
    """Records drops. Safe from any thread: the journal and the counters lock themselves,
    and `_warned` is guarded by `_lock`."""

    def __init__(self, journal: Journal, metrics: Metrics) -> None:
        self.journal = journal
        self.metrics = metrics
        self._lock = threading.Lock()
        self._warned: set[tuple[str, str, str]] = set()  # (collection, path, reason)

    def record(self, drop: Drop, now: float) -> None:
        """Log (once per path and reason), count and journal `drop`."""
        key = (drop.collection, str(drop.path), drop.reason)
        with self._lock:
            first = key not in self._warned
            self._warned.add(key)
        if not first:
            return
        # A hostile name (undecodable bytes) is shown escaped: the log and journal need text.
        path, details = printable(drop.path), printable(drop.detail)
        detail = f": {details}" if details else ""
        log.warning("not publishing %s (%s, %s)%s", path, drop.reason, REASONS[drop.reason], detail)
        self.metrics.dropped.labels(collection=drop.collection, reason=drop.reason).inc()
        self.journal.record_drop(drop.collection, path, drop.reason, details, now)

    def clear(self, collection: str, path: Path) -> None:
        """`path` is queued after all: forget its drops, and warn again if it drops again."""
        with self._lock:
            self._warned = {k for k in self._warned if k[:2] != (collection, str(path))}
        self.journal.clear_drops(collection, str(path))
