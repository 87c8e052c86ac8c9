"""The publisher: turns one hashed journal row into a committed version with its aliases.

Publishing a row has two halves, so that a sink that pipelines can upload version N+1 while
N is committing: `begin(row)` plans the aliases and hands the version to the sink;
`complete(submitted)` waits for the commit, records it and finishes the row. The coordinator
begins a collection's rows one at a time, lowest step first, and completes them in the same
order; `publish(row)` does both at once. Planning counts versions begun and not yet
completed as if they had landed (their step, the best values they won), since the sink
commits them in order.

Everything the publisher learns goes into the journal before it returns; a crash between
the sink's commit and the journal's update is repaired on restart by publishing again, which
the sink deduplicates by content. The publisher never raises PublishError: it returns an
`Outcome`, and the coordinator parks collections and runs retention.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ckptd import references, staging
from ckptd.checkpoint import base_of
from ckptd.config import Config, WatchConfig
from ckptd.drops import Drop, DropLog
from ckptd.errors import PublishError
from ckptd.journal import Journal, Row
from ckptd.logs import worth_logging
from ckptd.metrics import Metrics
from ckptd.policy import AliasPlan, Candidate, metric_value, plan_aliases
from ckptd.promote import fired
from ckptd.retry import GiveUp, Park, Retry, RetryPolicy, next_after_failure
from ckptd.sinks import Pending, PublishRequest, Sink, SinkFile, VersionFacts
from ckptd.sinks.metadata import unpublishable

if TYPE_CHECKING:
    from ckptd.multihost import MultiHost

__all__ = ["Outcome", "Publisher", "Submitted"]

log = logging.getLogger(__name__)

_PUBLISHED = ("published", "aliased")


@dataclass(frozen=True)
class Outcome:
    """What became of a row: `aliased` (its version is in place: retention may run), or
    `park` (a permanent error: stop the collection, with this reason). Neither: it was
    superseded, failed, or is scheduled for a retry; the journal says which."""

    aliased: bool = False
    park: str | None = None


@dataclass(frozen=True)
class Submitted:
    """A row whose version the sink has been handed and not yet committed."""

    row: Row
    plan: AliasPlan
    pending: Pending


class Publisher:
    """Publishes checkpoints of every watch entry to one sink."""

    def __init__(
        self,
        config: Config,
        journal: Journal,
        sink: Sink,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        drops: DropLog | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.drops = drops
        self.journal = journal
        self.sink = sink
        self.retry = RetryPolicy(config.upload.retry)
        self.clock = clock
        self._watches = {(w.artifact, str(w.path)): w for w in config.watch}
        self._host = socket.gethostname()
        # What the sink knew before this journal did (a new host, a lost state_dir): per
        # collection, the highest step published and the version holding it. Filled once
        # per collection by _learn_from_remote.
        self._remote_highest: dict[str, tuple[int, str]] = {}
        self._learnt: set[str] = set()
        # Versions begun and not completed, per collection, in the order they were begun.
        self._in_flight: dict[str, list[Submitted]] = {}
        self._lock = threading.Lock()  # guards _in_flight: begin and complete run on workers
        self.multihost: MultiHost | None = None  # set by the service for `distributed` entries

    def watch_of(self, row: Row) -> WatchConfig:
        return self._watches[(row.collection, row.watch_path)]

    def publish(self, row: Row) -> Outcome:
        """Publish `row` (state `hashed`) and wait for its commit, or record why not."""
        begun = self.begin(row)
        return self.complete(begun) if isinstance(begun, Submitted) else begun

    def begin(self, row: Row) -> Submitted | Outcome:
        """Plan `row`'s aliases and hand its version to the sink; an Outcome where it ends
        here (superseded, quarantined, or failed to start)."""
        watch = self.watch_of(row)
        assert row.snapshot is not None
        if (problem := staging.verify(Path(row.snapshot), row.files)) is not None:
            return self._supersede(row, f"{problem}; the new content is a checkpoint of its own")
        if (moved := self._unreferenceable(row, watch)) is not None:
            kind, detail = moved
            if kind == "changed":
                return self._supersede(row, f"{detail}; the new content is a checkpoint of its own")
            return self._quarantine(row, "unreferenceable", detail)
        if watch.distributed is not None and self.multihost is not None:
            return self.multihost.publish(row, watch)  # this host's part of a multi-host version
        twin = self._same_content(row)
        if twin is not None:
            return self._supersede(row, f"same content as {twin}")
        try:
            plan, request = self._prepare(row, watch)
        except Exception as exc:  # planning one row must never block its collection
            log.debug("planning %s failed", row.source, exc_info=True)
            return self._quarantine(row, "crashed", f"{type(exc).__name__}: {exc}")
        if (problem := unpublishable(request)) is not None:
            return self._quarantine(row, "invalid", problem)
        for note in plan.notes:
            log.warning("%s: %s", row.source, note)
        try:
            pending = self.sink.submit(request)
        except PublishError as exc:
            return self._failed(row, exc)
        submitted = Submitted(row, plan, pending)
        with self._lock:
            self._in_flight.setdefault(row.collection, []).append(submitted)
        return submitted

    def complete(self, submitted: Submitted) -> Outcome:
        """Wait for a begun version's commit, record it and finish the row."""
        row, plan = submitted.row, submitted.plan
        try:
            try:
                result = submitted.pending.result()
            except PublishError as exc:
                return self._failed(row, exc)
            row = self.journal.mark_published(
                row.id, self.clock(), version=result.version, aliases=plan.aliases,
                best=plan.best, durable=result.committed,
                promotions=fired(self.watch_of(row).promote, plan.aliases),
            )  # fmt: skip
        finally:
            with self._lock:
                flights = self._in_flight.get(row.collection, [])
                if submitted in flights:
                    flights.remove(submitted)
        log.info(
            "published %s as %s:%s (step %d, %d files, %d bytes) with aliases %s",
            row.source, row.collection, result.version or "<offline>", row.step,
            len(row.files), row.size, ", ".join(plan.aliases) or "none",
        )  # fmt: skip
        return self.finish(row)

    def finish(self, row: Row) -> Outcome:
        """`published -> aliased`: put `latest` back on the highest step if an older step was
        published last, release the snapshot. Idempotent, so a crash in between is repaired
        by calling it again on start-up."""
        row = self.journal.get(row.id)  # the coordinator's copy may be stale
        if row.state != "published":
            return Outcome(aliased=row.state == "aliased")
        watch = self.watch_of(row)
        published = self.journal.rows(row.collection, _PUBLISHED)
        holder = max(published, key=lambda r: (r.step, r.id))
        step, version = holder.step, holder.version
        remote = self._remote_highest.get(row.collection)
        if remote is not None and remote[0] > step:
            step, version = remote
        # Of a multi-host entry's hosts, only the finisher moves aliases.
        moves = self.sink.capabilities.moves_aliases and (
            watch.distributed is None or watch.distributed.is_finisher
        )
        if watch.aliases.latest and version != row.version and step > row.step and moves:
            self._repoint_latest(row, step, version, watch)
        now = self.clock()
        self.journal.mark_aliased(row.id, now)
        if row.snapshot and row.durable:  # else kept to publish again if the record is lost
            staging.remove(Path(row.snapshot))
        self._count_success(row, now)
        return Outcome(aliased=True)

    def settle_unconfirmed(self, *, again: bool) -> list[Row]:
        """Confirm each published row the sink now vouches for (W&B offline: its record is
        in a run file) and release its snapshot; with `again`, publish each one whose record
        was lost once more, with the aliases it had. Returns the rows still unconfirmed."""
        left: list[Row] = []
        unconfirmed = self.journal.unconfirmed()
        for collection in sorted({r.collection for r in unconfirmed}):
            rows = [r for r in unconfirmed if r.collection == collection]
            try:
                durable = self.sink.recorded(collection, [_key(r) for r in rows])
            except PublishError as exc:
                log.warning("%s: cannot tell which versions were recorded: %s", collection, exc)
                left += rows
                continue
            for row in rows:
                if _key(row) in durable:
                    self.journal.confirm(row.id, self.clock())
                    if row.state == "aliased" and row.snapshot:
                        staging.remove(Path(row.snapshot))
                elif again:
                    left += self._publish_again(row)
                else:
                    left.append(row)
        return left

    def _publish_again(self, row: Row) -> list[Row]:
        """Publish a row whose offline record was lost; [row] while it stays unconfirmed."""
        assert row.snapshot is not None
        if (problem := staging.verify(Path(row.snapshot), row.files)) is not None:
            self.journal.confirm(row.id, self.clock())  # nothing left to publish it from
            if self.drops is not None:
                self.drops.record(Drop(row.collection, row.source, "unrecorded", problem),
                                  self.clock())  # fmt: skip
            return []
        try:
            self.sink.publish(self._request(row, row.aliases))
        except PublishError as exc:
            log.warning("%s: its offline record was lost; logging it again failed: %s",
                        row.source, exc)  # fmt: skip
            return [row]
        log.info("%s: its offline record was lost before it was written; logged it again",
                 row.source)  # fmt: skip
        return [row]

    # -- steps -------------------------------------------------------------------------

    def _prepare(self, row: Row, watch: WatchConfig) -> tuple[AliasPlan, PublishRequest]:
        """The alias plan and the request that publishes `row`."""
        plan = self._plan(row, watch)
        return plan, self._request(row, plan.aliases)

    def _request(self, row: Row, aliases: tuple[str, ...]) -> PublishRequest:
        watch = self.watch_of(row)
        assert row.snapshot is not None
        snap = Path(row.snapshot)
        base = base_of(row.source, [f.name for f in row.files])
        info = row.info
        return PublishRequest(
            collection=row.collection,
            type=watch.type,
            files=tuple(
                SinkFile(
                    f.name,
                    snap / f.name,
                    row.md5s[f.name],
                    f.size,
                    ref=references.reference_of(watch.reference, base / f.name),
                )
                for f in row.files
            ),
            aliases=aliases,
            facts=VersionFacts(
                step=row.step,
                epoch=info.epoch,
                metrics=info.metrics,
                format=row.format,
                source_path=str(row.source),
                host=self._host,
                files={f.name: f.size for f in row.files},
                sidecar=info.source,
                detected_at=row.detected_at,
                extra=info.metadata,
            ),
            description=info.description or self._description(row, watch),
            run_path=info.run_path or watch.run_path,
            ttl=watch.retention.remote.ttl,
            key=_key(row),
        )

    def _unreferenceable(self, row: Row, watch: WatchConfig) -> tuple[str, str] | None:
        """Why `row` cannot be published as references, else None: ("changed", why) where a
        file at the checkpoint's path is no longer the one hashed (`reference: file` records
        the path, not the bytes; an object store's ETag is checked at publishing), or
        ("unreferenceable", why) where it is gone or its name cannot be a reference."""
        if watch.reference is None:
            return None
        base = base_of(row.source, [f.name for f in row.files])
        try:
            for f in row.files:
                references.reference_of(watch.reference, base / f.name)
        except ValueError as exc:
            return "unreferenceable", str(exc)
        if watch.reference != "file":
            return None
        return references.source_changed(base, row.files)

    def _quarantine(self, row: Row, reason: str, detail: str) -> Outcome:
        """A permanent problem of this checkpoint alone: `failed` with the reason, a drop,
        and the collection moves on to its next checkpoint (retrying cannot help)."""
        now = self.clock()
        self.journal.fail(row.id, now, f"{reason}: {detail}")
        self.metrics.failed.labels(collection=row.collection).inc()
        if row.snapshot:
            staging.remove(Path(row.snapshot))
        if self.drops is not None:
            self.drops.record(Drop(row.collection, row.source, reason, detail), now)
        else:
            log.warning("not publishing %s (%s): %s", row.source, reason, detail)
        return Outcome()

    def _plan(self, row: Row, watch: WatchConfig) -> AliasPlan:
        """Aliases for `row`, counting the versions published and those still in flight."""
        published = self.journal.rows(row.collection, _PUBLISHED)
        with self._lock:
            flights = list(self._in_flight.get(row.collection, ()))
        if not published and not flights:
            self._learn_from_remote(row.collection, watch)
        steps = [r.step for r in published] + [f.row.step for f in flights]
        if row.collection in self._remote_highest:
            steps.append(self._remote_highest[row.collection][0])
        highest = max(steps, default=None)
        best = {alias: value for alias, (_, value) in self.journal.best(row.collection).items()}
        for flight in flights:  # begun in order: each one's wins beat the ones before
            best.update(flight.plan.best)
        candidate = Candidate(row.step, row.info.epoch, row.info.metrics, row.info.aliases)
        return plan_aliases(watch.aliases, candidate, highest, best)

    def _learn_from_remote(self, collection: str, watch: WatchConfig) -> None:
        """A journal with nothing published in this collection may be a new host or a lost
        state_dir: read the sink's versions once, so that `best` and `latest` keep their
        places (each best alias's current value from its holder's metadata, and the highest
        step)."""
        if collection in self._learnt or not self.sink.capabilities.lists_versions:
            return
        try:
            versions = self.sink.versions(collection, watch.type)
        except PublishError as exc:
            log.warning(
                "%s: cannot read its versions on W&B (%s); best and latest are decided "
                "from this journal alone until it can", collection, exc,
            )  # fmt: skip
            return
        self._learnt.add(collection)
        ours = [v for v in versions if v.step is not None]
        if ours:
            top = max(ours, key=lambda v: (v.step or 0, v.index))
            self._remote_highest[collection] = (top.step or 0, top.version)
        for rule in watch.aliases.best:
            holder = next((v for v in ours if rule.alias_name in v.aliases), None)
            value = None if holder is None else metric_value(holder.metrics, rule.metric)
            if holder is not None and value is not None:
                self.journal.seed_best(collection, rule.alias_name, value)
                log.info(
                    "%s: %s is on %s with %s=%g on W&B; new checkpoints must beat it",
                    collection, rule.alias_name, holder.version, rule.metric, value,
                )  # fmt: skip

    def _same_content(self, row: Row) -> str | None:
        """What `row`'s content was published as already (or is being published as)."""
        for other in self.journal.rows(row.collection, _PUBLISHED):
            if other.digest == row.digest and other.id != row.id:
                return other.version or f"checkpoint #{other.id}"
        with self._lock:
            flights = list(self._in_flight.get(row.collection, ()))
        for flight in flights:
            if flight.row.digest == row.digest and flight.row.id != row.id:
                return f"checkpoint #{flight.row.id}"
        return None

    def _repoint_latest(self, row: Row, step: int, version: str | None, watch: WatchConfig) -> None:
        """An older step was published last and took `latest`; give it back to the highest."""
        if version is None:
            return
        try:
            self.retry.retrying(
                lambda: self.sink.move_alias(row.collection, watch.type, "latest", version)
            )
            log.info(
                "%s: moved 'latest' back to %s (step %d) after publishing step %d late",
                row.collection, version, step, row.step,
            )  # fmt: skip
        except PublishError as exc:
            log.error(
                "%s: could not move 'latest' back to %s (step %d): %s",
                row.collection, version, step, exc,
            )  # fmt: skip

    def _count_success(self, row: Row, now: float) -> None:
        labels = {"collection": row.collection}
        self.metrics.published.labels(**labels).inc()
        self.metrics.uploaded_bytes.labels(**labels).inc(row.size)
        self.metrics.publish_seconds.labels(**labels).observe(max(0.0, now - row.detected_at))
        self.metrics.last_success.labels(**labels).set(now)

    def _failed(self, row: Row, exc: PublishError) -> Outcome:
        now = self.clock()
        kind = "transient" if exc.transient else "permanent"
        self.metrics.retries.labels(collection=row.collection, kind=kind).inc()
        attempts = row.attempts + 1
        decision = next_after_failure(
            self.retry, exc, attempts=attempts, first_failure_at=row.first_failure_at, now=now
        )
        if isinstance(decision, Park):
            self.journal.retry_later(row.id, now, at=0, error=str(exc), attempts=attempts)
            return Outcome(park=decision.reason)
        if isinstance(decision, GiveUp):
            self.journal.fail(
                row.id, now, str(exc), attempts=attempts, first_failure_at=decision.first_failure_at
            )
            self.metrics.failed.labels(collection=row.collection).inc()
            log.error(
                "gave up on %s after %d attempts over %.0fs: %s (its files are kept)",
                row.source, attempts, now - decision.first_failure_at, exc,
            )  # fmt: skip
            if self.drops is not None:
                self.drops.record(Drop(row.collection, row.source, "gave-up", str(exc)), now)
            return Outcome()
        assert isinstance(decision, Retry)
        self.journal.retry_later(
            row.id, now, at=decision.at, error=str(exc), attempts=attempts,
            first_failure_at=decision.first_failure_at,
        )  # fmt: skip
        if worth_logging(attempts):
            log.warning(
                "publishing %s failed (attempt %d), retrying in %.1fs: %s",
                row.source, attempts, decision.at - now, exc,
            )  # fmt: skip
        return Outcome()

    def _supersede(self, row: Row, reason: str) -> Outcome:
        self.journal.supersede(row.id, self.clock(), reason)
        self.metrics.superseded.labels(collection=row.collection).inc()
        if row.snapshot:
            staging.remove(Path(row.snapshot))
        log.info("not publishing %s: %s", row.source, reason)
        return Outcome()

    def _description(self, row: Row, watch: WatchConfig) -> str | None:
        if watch.description is None:
            return None
        values = {"step": row.step, "epoch": row.info.epoch, "path": row.relpath}
        values.update(row.info.metrics)
        try:
            return watch.description.format_map(values)
        except (KeyError, ValueError, IndexError):
            return watch.description


def _key(row: Row) -> str:
    """What names a checkpoint's version across publish attempts: journal row and content."""
    return f"{row.id}:{row.digest}"
