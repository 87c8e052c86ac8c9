"""The daemon: watcher -> detector -> staging -> journal -> hashing -> publishing ->
retention, driven by one coordinator.

`Service.run_once(now)` is one iteration of the coordinator and reads no clock but `now`: it
takes the watcher's hints, lets the detectors decide what is finished (stat calls and small
reads of marker files), links snapshots, and does all journal-driven scheduling. Copies,
hashing, publishing and retention run on executors it is given (thread pools; an inline
executor in tests). It alone parks and unparks collections, triggers retention once a
version is in place, and tells each detector what became of what it offered.

Lifecycle: `start()` opens the journal, confirms (or publishes again) what an earlier
process published offline, starts the pools and the watcher and schedules the start-up scan;
`run(stop)` loops until `stop` is set (or, in a batch run, until all is published or the
deadline passed); `shutdown()` stops detecting, keeps hashing and publishing what the
journal holds up to `upload.shutdown_timeout`, and releases everything.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from ckptd import leftovers
from ckptd.config import Config
from ckptd.detect import Detector, ReadyCheckpoint
from ckptd.drops import Drop, DropLog
from ckptd.errors import CkptdError, JournalError, PublishError
from ckptd.hashing import Hasher
from ckptd.inputs import printable
from ckptd.journal import Journal, NewRow, Row
from ckptd.metrics import HealthServer, Metrics
from ckptd.multihost import MultiHost
from ckptd.notify import SystemdNotifier
from ckptd.priority import ReadRate
from ckptd.promote import Promoter
from ckptd.publish import Outcome, Publisher, Submitted
from ckptd.retention.run import Retention
from ckptd.sinks import Sink
from ckptd.sinks.distributed import parts_of
from ckptd.sinks.promotion import PromotionTarget
from ckptd.staging import NotTaken, Stager, Taken, remove
from ckptd.watcher import Hint, Watcher, observer_kind

__all__ = ["Pools", "Service"]

log = logging.getLogger(__name__)

_IDLE_WAKE = 1.0  # seconds: the longest the coordinator sleeps with nothing due
_CRASH_RETRY = 60.0  # seconds before retrying a publish that failed in an unexpected way
_JOURNAL_RETRY = 5.0  # seconds between attempts while the journal cannot be written
# Versions of one collection in flight at once where the sink pipelines: one committing
# while the next uploads. More would only queue inside the SDK, holding snapshots longer.
_PIPELINE_DEPTH = 2
# Rows still to hash or publish ("upserted": a multi-host part waiting for its commit).
_QUEUED = ("ready", "hashed", "upserted")
_LIVE = (*_QUEUED, "published")


def _threads(workers: int, name: str) -> Executor:
    return ThreadPoolExecutor(workers, thread_name_prefix=name)


@dataclass(frozen=True)
class Pools:
    """Where the coordinator's work runs: `make(workers, name)` builds each executor (the
    snapshot copier, the hashers, the publishers). Tests pass an inline executor."""

    make: Callable[[int, str], Executor] = _threads


@dataclass
class _Flight:
    """One row handed to a publisher thread: `begun` is set once the sink has its version
    (or the row ended before), `done` holds what became of it."""

    row_id: int
    begun: threading.Event
    done: Future[Outcome] = field(default_factory=Future)


def _no_targets(spec: str) -> PromotionTarget:
    raise PublishError(f"no promotion targets in this daemon: {spec}", transient=False)


class Service:
    """ckptd's daemon. Cheap to construct: nothing starts before `start()`."""

    def __init__(
        self,
        config: Config,
        sink_factory: Callable[[Config], Sink],
        clock: Callable[[], float] = time.time,
        pools: Pools | None = None,
        promotion_targets: Callable[[str], PromotionTarget] | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.pools = pools or Pools()
        self.journal = Journal(config.state_dir)
        self.hints: queue.SimpleQueue[Hint] = queue.SimpleQueue()
        self.wake = threading.Event()
        self.detectors = [
            Detector(watch, self.staging, close_evidence=observer_kind(watch) == "inotify")
            for watch in config.watch
        ]
        self.watcher = Watcher(config.watch, self.hints, self.wake)
        self._sink_factory = sink_factory
        self.sink: Sink | None = None
        self.publisher: Publisher | None = None
        self.retention: Retention | None = None
        self.metrics = Metrics()
        self.promoter = Promoter(
            config, self.journal, promotion_targets or _no_targets, self.wake, clock, self.metrics
        )
        self.drops = DropLog(self.journal, self.metrics)
        self.health: HealthServer | None = None
        self.notifier = SystemdNotifier.from_env()
        # md5 is CPU-bound: more hashing threads than cores only interleave the files, so
        # that all finish late together and the first upload waits for the last hash.
        threads = min(config.upload.workers, len(os.sched_getaffinity(0)))
        # Owned by the coordinator thread only:
        rate = config.upload.max_read_rate
        read_rate = ReadRate(rate.bytes) if rate is not None and rate.bytes else None
        self._hasher = Hasher(
            self.journal, self.wake, threads, read_rate, self.drops,
            pool=lambda n: self.pools.make(n, "ckptd-hash"),
        )  # fmt: skip
        self._publishers: Executor | None = None
        self._flights: dict[str, list[_Flight]] = {}  # collection -> publishes, in step order
        self._retaining: dict[str, Future[None]] = {}  # collection -> retention run
        self._retain_again: set[str] = set()  # asked for while a run was under way
        self._next_rescan = [0.0 for _ in config.watch]
        self._stopping = False  # detection stopped: only what is queued is still worked on
        self._started_at = 0.0
        self._last_queued = 0.0  # when this process last queued a checkpoint
        self.left: list[str] = []  # set by shutdown(): what the next start has to publish
        self.unpublished: list[str] = []  # set by shutdown(): what a batch run failed to publish
        self.abandoned = False  # set by shutdown(): a publish was still running when it ended
        self._last_journal_problem: str | None = None
        self._stager = Stager(self.staging, self.wake, lambda: self.pools.make(1, "ckptd-snapshot"))
        self._detector_of = {id(d.watch): d for d in self.detectors}
        self._step_started_at = time.monotonic()  # written by the coordinator, read by /healthz

    @property
    def staging(self) -> Path:
        return self.config.state_dir / "staging"

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Open the journal, start the pools and observers; the first iteration scans."""
        self._started_at = self.clock()
        self.journal.open()
        self._serve_metrics()  # a port clash is reported before anything is watched
        self.journal.unpark()
        self.staging.mkdir(parents=True, exist_ok=True)
        self.sink = self._sink_factory(self.config)
        self.retention = Retention(self.config, self.journal, self.sink)
        self.publisher = Publisher(
            self.config, self.journal, self.sink, self.metrics, self.clock, self.drops
        )
        if any(watch.distributed is not None for watch in self.config.watch):
            self.publisher.multihost = _multihost(self.publisher, self.sink)
        workers = self.config.upload.workers
        self._hasher.start()
        self._publishers = self.pools.make(workers, "ckptd-publish")
        self.promoter.start(self.pools.make)
        self._stager.start()
        self._reclaim_orphan_snapshots()
        if self.sink.capabilities.confirms_later:
            self.publisher.settle_unconfirmed(again=True)
        for detector in self.detectors:
            watch = detector.watch
            for relpath, files in self.journal.recorded_files(watch.artifact, watch.path).items():
                detector.remember(relpath, files)
            if self.journal.had_sidecar(watch.artifact, watch.path):
                detector.expect_sidecars()
        self.watcher.start()
        log.info(
            "ckptd started: %d watch entr%s, state in %s%s",
            len(self.config.watch), "y" if len(self.config.watch) == 1 else "ies",
            self.config.state_dir,
            f"; {self.sink.capabilities.limits}" if self.sink.capabilities.limits else "",
        )  # fmt: skip
        self.notifier.ready(self.status_line())

    @property
    def metrics_address_file(self) -> Path:
        """Where the bound metrics address is written (for Prometheus and operators)."""
        return self.config.state_dir / "metrics.address"

    def _serve_metrics(self) -> None:
        address = self.config.metrics.address
        if address is None:
            return
        self.health = HealthServer(address, self.metrics, self.unhealthy, self.not_ready)
        self.health.start()
        self.metrics_address_file.write_text(f"{self.health.bound}\n")

    def run(
        self,
        stop: threading.Event,
        *,
        once: bool = False,
        until_file: Path | None = None,
        deadline: float = math.inf,
    ) -> None:
        """Iterate until `stop` is set (or, with `once`, until all finished work landed).

        `until_file`: once this file exists (a training job's "done" marker), rescan and
        carry on as `once` would: publish what is finished, then return.
        `deadline` (seconds): a batch run (`once`, or after `until_file`) returns at the
        latest this long after it began or after the last checkpoint it queued, whichever
        is later, published or not.
        """
        once_deadline = self.clock() + self._once_patience() if once else math.inf
        batch_began = self.clock()
        while not stop.is_set():
            if not once and until_file is not None and until_file.exists():
                log.info("%s exists: publishing what is left, then exiting", until_file)
                once, once_deadline = True, self.clock() + self._once_patience()
                batch_began = self.clock()
                self._next_rescan = [0.0 for _ in self._next_rescan]
            now = self.clock()
            due = self._step(now)
            if self.notifier.enabled:  # the status line costs journal queries
                self.notifier.tick(now, self.status_line())
            if once and self.idle(now, once_deadline):
                if self.promoter.plan_final(now):  # the run's final versions go on first
                    continue
                break
            if once and now >= max(batch_began, self._last_queued) + deadline:
                log.warning("--deadline of %.0fs passed: exiting with what is published", deadline)
                break
            self.wake.wait(max(0.0, min(due - self.clock(), _IDLE_WAKE)))
            self.wake.clear()

    def _keep_deleted_holds(self) -> None:
        """Journal the held candidates that their framework deleted already: the next start
        could not find them again, and they were whole when held."""
        now = self.clock()
        try:
            for detector in self.detectors:
                for ready in detector.flush(now):
                    self._accept(detector, ready, now)
        except JournalError as exc:
            self._report_journal_problem(exc)

    def _step(self, now: float) -> float:
        """`run_once`, riding out a journal that cannot be written: a full or read-only
        state_dir is said once per distinct problem and tried again shortly; nothing was
        lost, the journal is transactional."""
        self._step_started_at = time.monotonic()
        try:
            return self.run_once(now)
        except JournalError as exc:
            self._report_journal_problem(exc)
            return now + _JOURNAL_RETRY

    def _report_journal_problem(self, exc: JournalError) -> None:
        message = str(exc)
        if message != self._last_journal_problem:
            log.error(
                "%s; retrying every %.0fs (is state_dir full or read-only?)",
                message,
                _JOURNAL_RETRY,
            )
            self._last_journal_problem = message

    def shutdown(self, *, drain: bool = True) -> None:
        """Stop detecting; with `drain`, hash and publish what the journal holds, in step
        order per collection, up to shutdown_timeout; close all. The last log line names
        what is left for the next start."""
        self._stopping = True
        self.notifier.stopping()
        if self.health is not None:
            self.health.stop()
            self.metrics_address_file.unlink(missing_ok=True)
        self.watcher.stop()
        if not self.journal.is_open:  # start() failed before the journal opened
            return
        # Held candidates that their framework deleted meanwhile are whole: queue them too.
        self._keep_deleted_holds()
        if drain and self.publisher is not None:
            self._drain(self.clock() + self.config.upload.shutdown_timeout)
        self._stager.shutdown()
        self._hasher.shutdown()
        self.abandoned = self._publishing() or self.promoter.busy()
        if self._publishers is not None:
            self._publishers.shutdown(wait=False, cancel_futures=True)
        self.promoter.shutdown()
        if self.sink is not None:
            self.sink.close()  # W&B offline: finishing the runs writes their records
        with contextlib.suppress(JournalError):
            if (
                self.publisher is not None
                and self.sink is not None
                and (self.sink.capabilities.confirms_later)
            ):
                self.publisher.settle_unconfirmed(again=False)
            self.left = leftovers.left_for_next_start(self.journal)
            self.unpublished = [
                *self.left, *leftovers.failures(self.journal, since=self._started_at),
                *self.promoter.unfinished(since=self._started_at),
            ]  # fmt: skip
        self.journal.close()
        if self.left:
            log.info("ckptd stopped; %d checkpoint(s) left for the next start: %s",
                     len(self.left), "; ".join(self.left))  # fmt: skip
        else:
            log.info("ckptd stopped; nothing is left to publish")
        self.notifier.close()

    def _drain(self, deadline: float) -> None:
        """Run the coordinator without detection until nothing queued is left or `deadline`."""
        queued = len(self._queued_rows())  # parked collections wait for their cause
        if queued or self._busy():
            log.info("stopping: publishing %d queued checkpoint(s) first, up to %.0fs",
                     queued, deadline - self.clock())  # fmt: skip
        while self.clock() < deadline and (self._busy() or self._queued_rows()):
            due = self._step(self.clock())
            self.wake.wait(max(0.0, min(due, deadline, self.clock() + _IDLE_WAKE) - self.clock()))
            self.wake.clear()

    # -- the single step ---------------------------------------------------------------------

    def run_once(self, now: float) -> float:
        """One coordinator iteration at time `now`; returns when the next one is due.

        Whatever goes wrong with one candidate stays with it (a drop naming it); only a
        journal that cannot be written leaves the step (JournalError). While stopping, no
        new checkpoint is detected: the queue drains."""
        if not self._stopping:
            self._detect(now)
        finished = self._stager.collect()
        for index, done in enumerate(finished):
            try:
                self._staged(done, now)
            except JournalError:
                for rest in finished[index + 1 :]:  # offered again once the journal works
                    if isinstance(rest, Taken):
                        remove(rest.dest)
                raise
        self._hasher.collect(now)
        live = self.journal.rows(states=_LIVE)  # read once: every stage below works from it
        self._hasher.schedule(now, live)
        self._schedule_publishing(now, live)
        promotions_due = self.promoter.run_once(now)
        return min(
            promotions_due,
            min((d.next_due() for d in self.detectors), default=math.inf),
            min(self._next_rescan, default=math.inf),
            self._next_retry(live),
            self.retention.next_due() if self.retention is not None else math.inf,
        )

    def _staged(self, done: Taken | NotTaken, now: float) -> None:
        """Journal a finished copy, or tell its detector why there is none."""
        detector = self._detector_of[id(done.ready.watch)]
        if isinstance(done, Taken):
            self._guarded(detector, done.ready, now, partial(self._record, done, now))
        elif done.outcome == "vanished":
            detector.forget(done.ready.unit)
        elif done.outcome == "crashed":
            detector.drop(done.ready.unit, "crashed", done.detail)

    def _detect(self, now: float) -> None:
        self._take_hints(now)
        for index, detector in enumerate(self.detectors):
            if now >= self._next_rescan[index]:
                self._scan(detector, now)
                self._next_rescan[index] = now + detector.watch.rescan
            for ready in detector.poll(now):
                self._guarded(detector, ready, now, partial(self._accept, detector, ready, now))
            for drop in detector.take_drops():
                self.drops.record(drop, now)

    def _take_hints(self, now: float) -> None:
        while True:
            try:
                hint = self.hints.get_nowait()
            except queue.Empty:
                return
            if hint.overflow:
                log.warning("filesystem events were lost; rescanning every watched directory")
                self._next_rescan = [now for _ in self._next_rescan]
                continue
            detector = self.detectors[hint.watch_index]
            try:
                detector.hint(
                    hint.path, now, moved_in=hint.moved_in, written=hint.written, closed=hint.closed
                )
            except Exception as exc:  # a hostile name must not stop the hints behind it
                log.debug("hint %s failed", printable(hint.path), exc_info=True)
                detector.drop(hint.path, "crashed", f"{type(exc).__name__}: {exc}")

    def _scan(self, detector: Detector, now: float) -> None:
        try:
            detector.scan(now)
        except Exception as exc:  # an unreadable root; the next rescan tries again
            log.warning("cannot scan %s: %s", detector.root, printable(exc))

    def _guarded(
        self,
        detector: Detector,
        ready: ReadyCheckpoint,
        now: float,
        step: Callable[[], None],
    ) -> None:
        """Run one candidate's step; an unexpected failure drops that candidate alone (and
        the detector ignores it until its files change) instead of leaving the coordinator."""
        try:
            step()
        except JournalError:
            raise
        except Exception as exc:
            log.debug("queueing %s failed", printable(ready.unit), exc_info=True)
            detector.mark_done(ready)
            drop = Drop(ready.watch.artifact, ready.unit, "crashed", f"{type(exc).__name__}: {exc}")
            self.drops.record(drop, now)

    def _accept(self, detector: Detector, ready: ReadyCheckpoint, now: float) -> None:
        """Snapshot a finished checkpoint and journal it, unless the journal knows it (a
        snapshot that must be copied is journaled when `Stager.collect` hands it over)."""
        watch = ready.watch
        if self.journal.known(watch.artifact, watch.path, ready.relpath, ready.fingerprint):
            detector.mark_done(ready)
            if ready.hold is not None:
                remove(ready.hold.dest)
        elif ready.hold is not None:  # held since it was whole: the hold is the snapshot
            self._record(Taken(ready, ready.hold.dest, ready.hold.files), now)
        elif not self._stager.busy(ready.unit):
            taken = self._stager.take(ready)
            if isinstance(taken, Taken):
                self._record(taken, now)
            elif taken is not None:
                self._staged(taken, now)

    def _record(self, taken: Taken, now: float) -> None:
        """Journal a snapshotted checkpoint: from here on it is queued durably."""
        ready, watch = taken.ready, taken.ready.watch
        new = NewRow(
            collection=watch.artifact, watch_path=watch.path, relpath=ready.relpath,
            fingerprint=ready.fingerprint, format=ready.format, step=ready.info.step,
            files=taken.files, info=ready.info, snapshot=taken.dest,
        )  # fmt: skip
        try:
            self.journal.add(new, now)
        except JournalError:
            if ready.hold is None:  # a hold stays the detector's, offered again later
                remove(taken.dest)
            raise
        except Exception:  # never offered again (see _guarded): no row points at it
            remove(taken.dest)
            raise
        self._detector_of[id(watch)].mark_done(ready)
        self.drops.clear(watch.artifact, ready.unit)
        self.metrics.detected.labels(collection=watch.artifact).inc()
        self._last_queued = now
        log.info("finished checkpoint %s (step %s) queued", ready.unit, ready.info.step)

    # -- publishing ---------------------------------------------------------------------

    def _schedule_publishing(self, now: float, live: Sequence[Row]) -> None:
        """Collect finished publishes, then hand each collection its next row in step order:
        the next may begin once the one before it has been handed to the sink (a pipelining
        sink commits them in that order), up to _PIPELINE_DEPTH in flight."""
        assert self._publishers is not None and self.retention is not None
        parked = self._unpark_due(now)
        # Rows in flight when `live` was read: a flight landing since then left its row
        # stale in `live`, and it must not be published twice.
        flying = {f.row_id for flights in self._flights.values() for f in flights}
        self._collect_flights(now, parked)
        depth = {watch.artifact: 0 for watch in self.config.watch}
        for row in live:
            if row.state != "published":
                depth[row.collection] = depth.get(row.collection, 0) + 1
        for collection, count in depth.items():
            self.metrics.queue_depth.labels(collection=collection).set(count)
            self.metrics.parked.labels(collection=collection).set(int(collection in parked))
        limit = _PIPELINE_DEPTH if self.sink is not None and self.sink.capabilities.pipelines else 1
        still = {f.row_id for flights in self._flights.values() for f in flights}
        blocked: set[str] = set(parked)
        for row in live:  # by collection, then step: each collection's next row first
            collection = row.collection
            if collection in blocked or row.id in still:
                continue  # parked, decided, or in flight: the next row may follow it
            blocked.add(collection)  # one decision per collection and step
            if row.id in flying:
                continue  # it landed since `live` was read: its state there is stale
            flights = self._flights.get(collection, [])
            if len(flights) >= limit or (flights and not flights[-1].begun.is_set()):
                continue
            if row.state == "ready" or row.next_attempt_at > now:
                continue  # never overtake a lower step: versions keep step order
            if row.state == "published" and flights:
                continue  # a crash left it half done: finish it alone
            self._fly(row, flights[-1].done if flights else None)
        for collection in {*self.retention.due(now), *self._retain_again}:
            self._retain(collection, now)  # a deletion failed earlier, or a version landed

    def _fly(self, row: Row, previous: Future[Outcome] | None) -> None:
        assert self._publishers is not None
        flight = _Flight(row.id, threading.Event())
        self._flights.setdefault(row.collection, []).append(flight)
        job = self._publishers.submit(self._publish, row, previous, flight.begun)
        job.add_done_callback(partial(self._landed, flight))

    def _landed(self, flight: _Flight, job: Future[Outcome]) -> None:
        """A publisher thread finished `flight`: pass its outcome on and wake the loop."""
        flight.begun.set()
        if job.cancelled():
            flight.done.cancel()
        elif (error := job.exception()) is not None:
            flight.done.set_exception(error)
        else:
            flight.done.set_result(job.result())
        self.wake.set()

    def _publish(
        self, row: Row, previous: Future[Outcome] | None, begun: threading.Event
    ) -> Outcome:
        """On a publisher thread: begin `row`, wait for the version before it to be recorded
        (they are recorded in step order), then complete it. Never raises."""
        assert self.publisher is not None
        try:
            try:
                if row.state == "published":
                    return self.publisher.finish(row)
                started = self.publisher.begin(row)
            finally:
                begun.set()
                self.wake.set()
            if isinstance(started, Submitted):
                if previous is not None:
                    wait_for([previous])
                return self.publisher.complete(started)
            return started
        except JournalError as exc:
            self._report_journal_problem(exc)  # the row stays queued and is tried again
        except Exception as exc:
            log.exception("publishing %s crashed; it stays queued, next try in %.0fs",
                          row.source, _CRASH_RETRY)  # fmt: skip
            now = self.clock()
            with contextlib.suppress(JournalError):
                self.journal.retry_later(row.id, now, at=now + _CRASH_RETRY, error=repr(exc))
        return Outcome()

    def _collect_flights(self, now: float, parked: set[str]) -> None:
        """Take each collection's finished publishes in order: park a collection that hit a
        permanent error, run retention where a version landed."""
        for collection, flights in self._flights.items():
            while flights and flights[0].done.done():
                flight = flights.pop(0)
                if flight.done.cancelled() or flight.done.exception() is not None:
                    continue
                outcome = flight.done.result()
                if outcome.park is not None and collection not in parked:
                    self._park(collection, outcome.park, now)
                    parked.add(collection)
                if outcome.aliased:
                    self._retain(collection, now)

    def _retain(self, collection: str, now: float) -> None:
        """Run retention for `collection` on a worker; once more after a run under way."""
        assert self._publishers is not None and self.retention is not None
        running = self._retaining.get(collection)
        if running is not None and not running.done():
            self._retain_again.add(collection)
            return
        self._retain_again.discard(collection)
        job = self._publishers.submit(self.retention.after_publish, collection, now)
        job.add_done_callback(lambda _: self.wake.set())
        self._retaining[collection] = job

    def _park(self, collection: str, reason: str, now: float) -> None:
        """Stop publishing `collection` after a permanent error; its queue is kept."""
        self.journal.park(collection, reason, now)
        self.metrics.parked.labels(collection=collection).set(1)
        log.error(
            "%s is parked: %s. Its queue is kept; fix the cause and restart ckptd "
            "(it also retries by itself after %.0fs)",
            collection, reason, self.config.upload.retry.max_delay,
        )  # fmt: skip

    def _unpark_due(self, now: float) -> set[str]:
        """Let each collection parked for max_delay try again; the ones still parked."""
        parked = self.journal.parked()
        for collection, (_, since) in list(parked.items()):
            if now - since >= self.config.upload.retry.max_delay:
                log.info("retrying parked collection %s", collection)
                self.journal.unpark(collection)
                del parked[collection]
        return set(parked)

    def _publishing(self) -> bool:
        """Is a publish or a retention run still on a worker?"""
        flights: list[Future[Outcome]] = [f.done for fs in self._flights.values() for f in fs]
        return any(not f.done() for f in flights) or any(
            not f.done() for f in self._retaining.values()
        )

    def _next_retry(self, live: Sequence[Row]) -> float:
        pending = (r for r in live if r.state in _QUEUED)
        return min((r.next_attempt_at for r in pending if r.next_attempt_at > 0), default=math.inf)

    def _reclaim_orphan_snapshots(self) -> None:
        """Drop staging directories that no live journal row points at (a crash between
        snapshot and journal insert, or after publishing)."""
        rows = [
            *self.journal.rows(states=(*_QUEUED, "failed")),
            *self.journal.unconfirmed(),
        ]
        live = {r.snapshot for r in rows}
        for entry in self.staging.iterdir():
            if str(entry) not in live:
                remove(entry)

    # -- introspection -----------------------------------------------------------------------

    def idle(self, now: float, patience_deadline: float) -> bool:
        """Nothing left to do for `--once`: no queued rows and no candidates still settling
        (candidates that never finish are given up at `patience_deadline`)."""
        if self._busy() or self._queued_rows():
            return False
        pending = any(d.pending() for d in self.detectors)
        return not pending or now >= patience_deadline

    def unhealthy(self) -> str | None:
        """None while the daemon works, else why not (for /healthz): the watcher stopped, or
        the coordinator has been in one step for longer than `metrics.stall_after` (a hang
        that only a restart ends)."""
        if not self.watcher.alive():
            return "watcher stopped"
        stalled = time.monotonic() - self._step_started_at
        limit = self.config.metrics.stall_after
        if stalled > limit:
            return (
                f"coordinator stalled: no step completed for {stalled:.0f}s "
                f"(metrics.stall_after is {limit:g}s)"
            )
        return None

    def _busy(self) -> bool:
        """Is a copy, a hash, a publish, a retention run or a promotion under way?"""
        return bool(
            self._hasher.in_flight() or self._publishing() or self._stager.in_flight()
            or self.promoter.busy()
        )  # fmt: skip

    def _queued_rows(self) -> list[Row]:
        """Rows still to hash, publish or promote, in collections (and to targets) that
        are not parked."""
        parked = self.journal.parked()
        rows = self.journal.rows(states=_LIVE)
        promoting = {p.checkpoint_id for p in self.promoter.waiting()}
        rows += [self.journal.get(checkpoint) for checkpoint in sorted(promoting)]
        return [r for r in rows if r.collection not in parked]

    def not_ready(self) -> str | None:
        """None when the daemon can do its work, else why not (for /readyz)."""
        if not self.journal.is_open:
            return "journal not open"
        if not self.watcher.alive():
            return "watcher not running"
        parked = self.journal.parked()
        if parked:
            return f"parked: {', '.join(sorted(parked))}"
        return self.sink.problem(self.clock()) if self.sink is not None else "not started"

    def status_line(self) -> str:
        """One line for `systemctl status`: queue depth and the last version published."""
        try:
            pending = self.journal.count(_QUEUED)
            last = self.journal.last_published()
            parked = self.journal.parked()
        except JournalError as exc:
            return f"journal unavailable: {exc}"
        text = f"{pending} pending"
        if last is not None:
            text += f", last published {last.collection}:{last.version or '<offline>'}"
        if parked:
            text += f"; parked: {', '.join(sorted(parked))}"
        return text

    def _once_patience(self) -> float:
        return max((w.settle + w.sidecar.wait for w in self.config.watch), default=0) + 5.0


def _multihost(publisher: Publisher, sink: Sink) -> MultiHost:
    """The publisher of `distributed` entries, on the sink's distributed side."""
    parts = parts_of(sink)
    if parts is None:
        raise CkptdError(
            "watch[].distributed: this sink cannot merge parts from several hosts "
            "(W&B online mode can)"
        )
    return MultiHost(publisher, parts)
