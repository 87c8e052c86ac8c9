"""The daemon: watcher -> detector -> journal -> hashers -> publisher, on one coordinator.

`Service.run_once(now)` is one iteration of the coordinator; it does all journal-driven
scheduling and never blocks on I/O of its own beyond stat calls. Hashing and publishing run
on thread pools. Lifecycle: `start()` opens the journal, confirms (or publishes again) what
an earlier process published offline, starts the pools and the watcher and schedules the
start-up scan; `run(stop)` loops until `stop` is set (or, in a batch run, until all is
published or the deadline passed); `shutdown()` stops detecting, keeps hashing and publishing
what the journal holds up to `upload.shutdown_timeout`, and releases everything.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path

from ckptd import leftovers, snapshot
from ckptd.config import Config
from ckptd.detect import Detector, ReadyCheckpoint
from ckptd.drops import Drop, DropLog
from ckptd.errors import JournalError, PublishError
from ckptd.hashing import Hasher
from ckptd.inputs import printable
from ckptd.journal import Journal, Row
from ckptd.metrics import HealthServer, Metrics
from ckptd.notify import SystemdNotifier
from ckptd.priority import ReadRate
from ckptd.promote import Promoter
from ckptd.publish import Publisher
from ckptd.retention_exec import Retention
from ckptd.sinks import Sink
from ckptd.sinks.promotion import PromotionTarget
from ckptd.staging import Stager, Taken
from ckptd.watcher import Hint, Watcher, observer_kind

__all__ = ["Service"]

log = logging.getLogger(__name__)

_IDLE_WAKE = 1.0  # seconds: the longest the coordinator sleeps with nothing due
_LEASE = 6 * 3600.0  # seconds a publish may hold its row; the state_dir lock is the real guard
_CRASH_RETRY = 60.0  # seconds before retrying a publish that failed in an unexpected way
_JOURNAL_RETRY = 5.0  # seconds between attempts while the journal cannot be written


def _no_targets(spec: str) -> PromotionTarget:
    raise PublishError(f"no promotion targets in this daemon: {spec}", transient=False)


class Service:
    """ckptd's daemon. Cheap to construct: nothing starts before `start()`."""

    def __init__(
        self,
        config: Config,
        sink_factory: Callable[[Config], Sink],
        clock: Callable[[], float] = time.time,
        promotion_targets: Callable[[str], PromotionTarget] | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
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
        self._hasher = Hasher(self.journal, self.wake, threads, read_rate, self.drops)
        self._publishers: ThreadPoolExecutor | None = None
        self._publishing: dict[str, Future[None]] = {}  # collection -> in-flight publish
        self._next_rescan = [0.0 for _ in config.watch]
        self._stopping = False  # detection stopped: only what is queued is still worked on
        self._started_at = 0.0
        self._last_queued = 0.0  # when this process last queued a checkpoint
        self.left: list[str] = []  # set by shutdown(): what the next start has to publish
        self.unpublished: list[str] = []  # set by shutdown(): what a batch run failed to publish
        self.abandoned = False  # set by shutdown(): a publish was still running when it ended
        self._last_journal_problem: str | None = None
        self._stager = Stager(self.staging, self.wake)
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
            self.config, self.journal, self.sink, self.metrics, self.clock, self.retention,
            self.drops,
        )  # fmt: skip
        workers = self.config.upload.workers
        self._hasher.start()
        self._publishers = ThreadPoolExecutor(workers, thread_name_prefix="ckptd-publish")
        self.promoter.start()
        self._stager.start()
        self._reclaim_orphan_snapshots()
        if self.config.wandb.mode == "offline":
            self.publisher.settle_unconfirmed(again=True)
        for detector in self.detectors:
            watch = detector.watch
            for relpath, files in self.journal.recorded_files(watch.artifact, watch.path).items():
                detector.remember(relpath, files)
            if self.journal.had_sidecar(watch.artifact, watch.path):
                detector.expect_sidecars()
        self.watcher.start()
        log.info(
            "ckptd started: %d watch entr%s, state in %s, W&B %s mode",
            len(self.config.watch), "y" if len(self.config.watch) == 1 else "ies",
            self.config.state_dir, self.config.wandb.mode,
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
        self.abandoned = any(not f.done() for f in self._publishing.values())
        self.abandoned |= self.promoter.busy()
        if self._publishers is not None:
            self._publishers.shutdown(wait=False, cancel_futures=True)
        self.promoter.shutdown()
        if self.sink is not None:
            self.sink.close()  # W&B offline: finishing the runs writes their records
        with contextlib.suppress(JournalError):
            if self.publisher is not None and self.config.wandb.mode == "offline":
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
        """One coordinator iteration; returns when the next one is due.

        Whatever goes wrong with one candidate stays with it (a drop naming it); only a
        journal that cannot be written leaves the step (JournalError). While stopping, no
        new checkpoint is detected: the queue drains."""
        self._step_started_at = time.monotonic()
        if not self._stopping:
            self._detect(now)
        finished = self._stager.collect()
        for index, taken in enumerate(finished):
            try:
                self._guarded(taken.detector, taken.ready, now, partial(self._record, taken, now))
            except JournalError:
                for rest in finished[index + 1 :]:  # offered again once the journal works
                    snapshot.remove(rest.dest)
                raise
        self._hasher.collect(now)
        self._hasher.schedule(self.clock())
        self._schedule_publishing(now)
        promotions_due = self.promoter.run_once(now)
        return min(
            promotions_due,
            min((d.next_due() for d in self.detectors), default=math.inf),
            min(self._next_rescan, default=math.inf),
            self._next_retry(),
            self.retention.next_due() if self.retention is not None else math.inf,
        )

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
                snapshot.remove(ready.hold.dest)
        elif ready.hold is not None:  # held since it was whole: the hold is the snapshot
            self._record(Taken(detector, ready, ready.hold.dest, ready.hold.files), now)
        elif not self._stager.busy(ready.unit):
            taken = self._stager.take(detector, ready)
            if taken is not None:
                self._record(taken, now)

    def _record(self, taken: Taken, now: float) -> None:
        """Journal a snapshotted checkpoint: from here on it is queued durably."""
        ready, watch = taken.ready, taken.ready.watch
        try:
            self.journal.add(
                collection=watch.artifact, watch_path=watch.path, relpath=ready.relpath,
                fingerprint=ready.fingerprint, format=ready.format, step=ready.info.step,
                files=taken.files, info=ready.info, snapshot=taken.dest, now=now,
            )  # fmt: skip
        except JournalError:
            if ready.hold is None:  # a hold stays the detector's, offered again later
                snapshot.remove(taken.dest)
            raise
        except Exception:  # never offered again (see _guarded): no row points at it
            snapshot.remove(taken.dest)
            raise
        taken.detector.mark_done(ready)
        self.drops.clear(watch.artifact, ready.unit)
        self.metrics.detected.labels(collection=watch.artifact).inc()
        self._last_queued = self.clock()
        log.info("finished checkpoint %s (step %s) queued", ready.unit, ready.info.step)

    def _schedule_publishing(self, now: float) -> None:
        assert self._publishers is not None and self.publisher is not None
        parked = self.journal.parked()
        for collection, (_, since) in parked.items():
            if now - since >= self.config.upload.retry.max_delay:
                log.info("retrying parked collection %s", collection)
                self.journal.unpark(collection)
        by_collection: dict[str, Row] = {}
        depth = {watch.artifact: 0 for watch in self.config.watch}
        for row in self.journal.rows(states=("published",)):
            by_collection.setdefault(row.collection, row)  # a crash left it half done: first
        for row in self.journal.rows(states=("ready", "hashed")):
            by_collection.setdefault(row.collection, row)  # rows come lowest step first
            depth[row.collection] = depth.get(row.collection, 0) + 1
        for collection, count in depth.items():
            self.metrics.queue_depth.labels(collection=collection).set(count)
            self.metrics.parked.labels(collection=collection).set(int(collection in parked))
        assert self.retention is not None
        for collection in self.retention.due(now):
            busy = self._publishing.get(collection)
            if collection not in by_collection and (busy is None or busy.done()):
                # A deletion failed earlier and no publish is coming to retry it.
                self._publishing[collection] = self._publishers.submit(
                    self.retention.after_publish, collection, now
                )
        for collection, row in by_collection.items():
            busy = self._publishing.get(collection)
            if busy is not None and not busy.done():
                continue
            if collection in parked or row.state == "ready" or row.next_attempt_at > now:
                continue
            self.journal.claim(row.id, now, _LEASE)
            future = self._publishers.submit(self._publish_guarded, row)
            future.add_done_callback(lambda _: self.wake.set())
            self._publishing[collection] = future

    def _publish_guarded(self, row: Row) -> None:
        assert self.publisher is not None
        try:
            if row.state == "published":
                self.publisher.finish(row)
            else:
                self.publisher.publish(row)
        except JournalError as exc:
            self._report_journal_problem(exc)  # the row stays queued and is tried again
        except Exception as exc:
            log.exception("publishing %s crashed; it stays queued, next try in %.0fs",
                          row.source, _CRASH_RETRY)  # fmt: skip
            now = self.clock()
            with contextlib.suppress(JournalError):
                self.journal.update(
                    row.id, now, next_attempt_at=now + _CRASH_RETRY, last_error=repr(exc)
                )
            raise

    def _next_retry(self) -> float:
        pending = self.journal.rows(states=("ready", "hashed"))
        return min((r.next_attempt_at for r in pending if r.next_attempt_at > 0), default=math.inf)

    def _reclaim_orphan_snapshots(self) -> None:
        """Drop staging directories that no live journal row points at (a crash between
        snapshot and journal insert, or after publishing)."""
        rows = [
            *self.journal.rows(states=("ready", "hashed", "failed")),
            *self.journal.unconfirmed(),
        ]
        live = {r.snapshot for r in rows}
        for entry in self.staging.iterdir():
            if str(entry) not in live:
                snapshot.remove(entry)

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
        """Is a copy, a hash or a publish under way?"""
        publishing = any(not f.done() for f in self._publishing.values())
        return bool(
            self._hasher.in_flight() or publishing or self._stager.in_flight()
            or self.promoter.busy()
        )  # fmt: skip

    def _queued_rows(self) -> list[Row]:
        """Rows still to hash, publish or promote, in collections (and to targets) that
        are not parked."""
        parked = self.journal.parked()
        rows = self.journal.rows(states=("ready", "hashed", "published"))
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
            pending = self.journal.count(("ready", "hashed"))
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
