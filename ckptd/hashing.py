"""md5 of checkpoint files, the digest W&B's manifest needs, computed in ckptd's own pool.

hashlib releases the GIL while it digests large buffers, so a thread pool hashes files in
parallel across cores without the copy a process pool would need. `Hasher` is the pipeline
stage: it hashes the snapshots of the journal's `ready` rows and records the outcome.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ckptd import staging
from ckptd.checkpoint import content_digest
from ckptd.drops import Drop, DropLog
from ckptd.errors import JournalError
from ckptd.journal import Journal, Row
from ckptd.logs import worth_logging
from ckptd.priority import ReadRate

__all__ = ["CHUNK", "Hasher", "md5_b64"]

log = logging.getLogger(__name__)

RETRY = 30.0  # seconds before hashing an unreadable snapshot again

CHUNK = 8 << 20


def md5_b64(path: Path, rate: ReadRate | None = None) -> str:
    """The base64 md5 of a file, as W&B writes it in manifests and Content-MD5 headers;
    with `rate`, reading no faster than it allows."""
    h = hashlib.md5()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buffer):
            h.update(view[:n])
            if rate is not None:
                rate.take(n)
    return base64.b64encode(h.digest()).decode("ascii")


@dataclass
class _Job:
    row: Row
    futures: dict[str, Future[str]] = field(default_factory=dict)


class Hasher:
    """Hashes the snapshots of `ready` rows, a file per task, and moves each row on: to
    `hashed` with its md5s, to a retry in RETRY seconds when a file cannot be read, or to
    `superseded` when the snapshot changed meanwhile (the checkpoint is detected again).
    Only the coordinator thread calls it; `wake` is set whenever a file is done."""

    def __init__(
        self,
        journal: Journal,
        wake: threading.Event,
        threads: int,
        rate: ReadRate | None = None,
        drops: DropLog | None = None,
        pool: Callable[[int], Executor] = lambda n: ThreadPoolExecutor(
            n, thread_name_prefix="ckptd-hash"
        ),
    ) -> None:
        self.journal = journal
        self.drops = drops
        self._wake = wake
        self._threads = threads
        self._rate = rate
        self._make_pool = pool
        self._pool: Executor | None = None
        self._jobs: dict[int, _Job] = {}  # row id -> files being hashed

    def start(self) -> None:
        self._pool = self._make_pool(self._threads)

    def in_flight(self) -> list[Future[str]]:
        return [f for job in self._jobs.values() for f in job.futures.values()]

    def schedule(self, now: float, live: Iterable[Row]) -> None:
        """Start hashing every `ready` row of `live` that is due and not being hashed yet."""
        assert self._pool is not None, "start() first"
        for row in live:
            if row.state != "ready" or row.id in self._jobs or row.snapshot is None:
                continue
            if row.next_attempt_at > now:
                continue
            job = self._jobs[row.id] = _Job(row)
            for f in row.files:
                future = self._pool.submit(md5_b64, Path(row.snapshot) / f.name, self._rate)
                future.add_done_callback(lambda _: self._wake.set())
                job.futures[f.name] = future

    def collect(self, now: float) -> None:
        """Record the outcome of every row whose files are all done."""
        for row_id, job in list(self._jobs.items()):
            if not all(f.done() for f in job.futures.values()):
                continue
            del self._jobs[row_id]
            try:
                self._record(job, now)
            except JournalError:
                raise
            except Exception as exc:  # one row's surprise must not stop the others
                self._crashed(job.row, exc, now)

    def _crashed(self, row: Row, exc: Exception, now: float) -> None:
        """Quarantine `row`: failed with the reason, and a drop naming it."""
        detail = f"{type(exc).__name__}: {exc}"
        log.debug("recording the hashes of %s failed", row.source, exc_info=True)
        self.journal.fail(row.id, now, f"crashed: {detail}")
        if self.drops is not None:
            self.drops.record(Drop(row.collection, row.source, "crashed", detail), now)

    def _record(self, job: _Job, now: float) -> None:
        row = job.row
        assert row.snapshot is not None
        errors = [f.exception() for f in job.futures.values() if f.exception() is not None]
        if errors:
            attempts = row.attempts + 1
            if worth_logging(attempts):
                log.error(
                    "cannot read %s to hash it: %s; retrying every %.0fs",
                    row.source, errors[0], RETRY,
                )  # fmt: skip
            self.journal.retry_later(
                row.id, now, at=now + RETRY, error=f"cannot read: {errors[0]}", attempts=attempts
            )
            return
        md5s = {name: f.result() for name, f in job.futures.items()}
        problem = staging.verify(Path(row.snapshot), row.files)
        if problem is not None:
            self.journal.supersede(row.id, now, problem)
            staging.remove(Path(row.snapshot))
            log.info("%s changed while it was hashed (%s); it will be re-detected",
                     row.source, problem)  # fmt: skip
            return
        self.journal.mark_hashed(row.id, now, md5s=md5s, digest=content_digest(md5s))

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
