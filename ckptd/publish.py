"""The publisher: turns one hashed journal row into a committed version with its aliases.

`publish(row)` runs on a worker thread. The service never runs two publishes of the same
collection at once and always hands over the lowest step first, so versions of a collection
are created in step order. Everything the publisher learns goes into the journal before it
returns; a crash between the sink's commit and the journal's update is repaired on restart
by publishing again, which the sink deduplicates by content.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ckptd import snapshot
from ckptd.config import Config, WatchConfig
from ckptd.drops import Drop, DropLog
from ckptd.errors import PublishError
from ckptd.journal import Journal, Row
from ckptd.logs import worth_logging
from ckptd.metrics import Metrics
from ckptd.policy import AliasPlan, Candidate, metric_value, plan_aliases
from ckptd.promote import fired
from ckptd.retention_exec import Retention
from ckptd.retry import RetryPolicy
from ckptd.sinks import PublishRequest, Sink, SinkFile

__all__ = ["Publisher", "invalid"]

log = logging.getLogger(__name__)

_PUBLISHED = ("published", "aliased")


class Publisher:
    """Publishes checkpoints of every watch entry to one sink."""

    def __init__(
        self,
        config: Config,
        journal: Journal,
        sink: Sink,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        retention: Retention | None = None,
        drops: DropLog | None = None,
    ) -> None:
        self.config = config
        self.online = config.wandb.mode == "online"
        self.metrics = metrics
        self.retention = retention
        self.drops = drops
        self.journal = journal
        self.sink = sink
        self.retry = RetryPolicy(config.upload.retry)
        self.clock = clock
        self._watches = {(w.artifact, str(w.path)): w for w in config.watch}
        self._host = socket.gethostname()
        # What W&B knew before this journal did (a new host, a lost state_dir): per
        # collection, the highest step published and the version holding it. Filled once
        # per collection by _learn_from_remote; only the thread publishing that collection
        # touches its entry.
        self._remote_highest: dict[str, tuple[int, str]] = {}
        self._learnt: set[str] = set()

    def watch_of(self, row: Row) -> WatchConfig:
        return self._watches[(row.collection, row.watch_path)]

    def publish(self, row: Row) -> None:
        """Publish `row` (state `hashed`) or record why not; never raises PublishError."""
        watch = self.watch_of(row)
        assert row.snapshot is not None
        snap = Path(row.snapshot)
        if (problem := snapshot.verify(snap, row.files)) is not None:
            self._supersede(row, f"{problem}; the new content is a checkpoint of its own")
            return
        twin = self._same_content(row)
        if twin is not None:
            self._supersede(row, f"same content as {twin.version or f'checkpoint #{twin.id}'}")
            return
        try:
            plan, request = self._prepare(row, watch)
        except Exception as exc:  # planning one row must never block its collection
            log.debug("planning %s failed", row.source, exc_info=True)
            self._quarantine(row, "crashed", f"{type(exc).__name__}: {exc}")
            return
        if (problem := invalid(request)) is not None:
            self._quarantine(row, "invalid", problem)
            return
        for note in plan.notes:
            log.warning("%s: %s", row.source, note)
        try:
            result = self.sink.publish(request)
        except PublishError as exc:
            self._failed(row, exc)
            return
        row = self.journal.mark_published(
            row.id, self.clock(), version=result.version, aliases=plan.aliases, best=plan.best,
            durable=result.committed, promotions=fired(watch.promote, plan.aliases),
        )  # fmt: skip
        log.info(
            "published %s as %s:%s (step %d, %d files, %d bytes) with aliases %s",
            row.source, row.collection, result.version or "<offline>", row.step,
            len(row.files), row.size, ", ".join(plan.aliases) or "none",
        )  # fmt: skip
        self.finish(row)

    def finish(self, row: Row) -> None:
        """`published -> aliased`: put `latest` back on the highest step if an older step was
        published last, release the snapshot. Idempotent, so a crash in between is repaired
        by calling it again on start-up."""
        row = self.journal.get(row.id)  # the coordinator's copy may be stale
        if row.state != "published":
            return  # finished already
        watch = self.watch_of(row)
        published = self.journal.rows(row.collection, _PUBLISHED)
        holder = max(published, key=lambda r: (r.step, r.id))
        step, version = holder.step, holder.version
        remote = self._remote_highest.get(row.collection)
        if remote is not None and remote[0] > step:
            step, version = remote
        if watch.aliases.latest and version != row.version and step > row.step and self.online:
            self._repoint_latest(row, step, version, watch)
        now = self.clock()
        self.journal.transition(row.id, "aliased", now)
        if row.snapshot and row.durable:  # else kept to publish again if the record is lost
            snapshot.remove(Path(row.snapshot))
        self._count_success(row, now)
        if self.retention is not None:  # never raises: a failed deletion never blocks publishing
            self.retention.after_publish(row.collection, self.clock())

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
                        snapshot.remove(Path(row.snapshot))
                elif again:
                    left += self._publish_again(row)
                else:
                    left.append(row)
        return left

    def _publish_again(self, row: Row) -> list[Row]:
        """Publish a row whose offline record was lost; [row] while it stays unconfirmed."""
        assert row.snapshot is not None
        if (problem := snapshot.verify(Path(row.snapshot), row.files)) is not None:
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
        return PublishRequest(
            collection=row.collection,
            type=watch.type,
            files=tuple(
                SinkFile(f.name, snap / f.name, row.md5s[f.name], f.size) for f in row.files
            ),
            aliases=aliases,
            metadata=self._metadata(row),
            description=row.info.description or self._description(row, watch),
            run_path=row.info.run_path or watch.run_path,
            ttl=watch.retention.remote.ttl,
            key=_key(row),
        )

    def _quarantine(self, row: Row, reason: str, detail: str) -> None:
        """A permanent problem of this checkpoint alone: `failed` with the reason, a drop,
        and the collection moves on to its next checkpoint (retrying cannot help)."""
        now = self.clock()
        self.journal.transition(
            row.id, "failed", now, last_error=f"{reason}: {detail}", lease_owner=None
        )
        self.metrics.failed.labels(collection=row.collection).inc()
        if row.snapshot:
            snapshot.remove(Path(row.snapshot))
        if self.drops is not None:
            self.drops.record(Drop(row.collection, row.source, reason, detail), now)
        else:
            log.warning("not publishing %s (%s): %s", row.source, reason, detail)

    def _plan(self, row: Row, watch: WatchConfig) -> AliasPlan:
        published = self.journal.rows(row.collection, _PUBLISHED)
        if not published:
            self._learn_from_remote(row.collection, watch)
        steps = [r.step for r in published]
        if row.collection in self._remote_highest:
            steps.append(self._remote_highest[row.collection][0])
        highest = max(steps, default=None)
        best = {alias: value for alias, (_, value) in self.journal.best(row.collection).items()}
        candidate = Candidate(row.step, row.info.epoch, row.info.metrics, row.info.aliases)
        return plan_aliases(watch.aliases, candidate, highest, best)

    def _learn_from_remote(self, collection: str, watch: WatchConfig) -> None:
        """A journal with nothing published in this collection may be a new host or a lost
        state_dir: read W&B's versions once, so that `best` and `latest` keep their places
        (each best alias's current value from its holder's metadata, and the highest step)."""
        if collection in self._learnt or not self.online:
            return
        try:
            versions = self.sink.versions(collection, watch.type)
        except PublishError as exc:
            log.warning(
                "%s: cannot read its versions on W&B (%s); best and latest are decided from "
                "this journal alone until it can", collection, exc,
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

    def _same_content(self, row: Row) -> Row | None:
        for other in self.journal.rows(row.collection, _PUBLISHED):
            if other.digest == row.digest and other.id != row.id:
                return other
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

    def _failed(self, row: Row, exc: PublishError) -> None:
        now = self.clock()
        kind = "transient" if exc.transient else "permanent"
        self.metrics.retries.labels(collection=row.collection, kind=kind).inc()
        attempts = row.attempts + 1
        first = row.first_failure_at or now
        if not exc.transient:
            self.journal.update(
                row.id, now, attempts=attempts, last_error=str(exc), lease_owner=None
            )
            self.journal.park(row.collection, str(exc), now)
            self.metrics.parked.labels(collection=row.collection).set(1)
            log.error(
                "%s is parked: %s. Its queue is kept; fix the cause and restart ckptd "
                "(it also retries by itself after %.0fs)",
                row.collection, exc, self.retry.config.max_delay,
            )  # fmt: skip
            return
        if self.retry.gives_up(first, now):
            self.journal.transition(
                row.id, "failed", now, attempts=attempts, last_error=str(exc),
                first_failure_at=first,
            )  # fmt: skip
            self.metrics.failed.labels(collection=row.collection).inc()
            log.error(
                "gave up on %s after %d attempts over %.0fs: %s (its files are kept)",
                row.source, attempts, now - first, exc,
            )  # fmt: skip
            if self.drops is not None:
                self.drops.record(Drop(row.collection, row.source, "gave-up", str(exc)), now)
            return
        delay = self.retry.delay(attempts, exc.retry_after)
        self.journal.update(
            row.id, now, attempts=attempts, next_attempt_at=now + delay,
            first_failure_at=first, last_error=str(exc), lease_owner=None,
        )  # fmt: skip
        if worth_logging(attempts):
            log.warning(
                "publishing %s failed (attempt %d), retrying in %.1fs: %s",
                row.source, attempts, delay, exc,
            )  # fmt: skip

    def _supersede(self, row: Row, reason: str) -> None:
        self.journal.transition(row.id, "superseded", self.clock(), last_error=reason)
        self.metrics.superseded.labels(collection=row.collection).inc()
        if row.snapshot:
            snapshot.remove(Path(row.snapshot))
        log.info("not publishing %s: %s", row.source, reason)

    def _metadata(self, row: Row) -> dict[str, Any]:
        info = row.info
        return {
            **info.metadata,
            "step": row.step,
            "epoch": info.epoch,
            "metrics": info.metrics,
            "format": row.format,
            "source_path": str(row.source),
            "host": self._host,
            "files": {f.name: f.size for f in row.files},
            "size_bytes": row.size,
            "ckptd": {"sidecar": info.source, "detected_at": row.detected_at, "key": _key(row)},
        }

    def _description(self, row: Row, watch: WatchConfig) -> str | None:
        if watch.description is None:
            return None
        values = {"step": row.step, "epoch": row.info.epoch, "path": row.relpath}
        values.update(row.info.metrics)
        try:
            return watch.description.format_map(values)
        except (KeyError, ValueError, IndexError):
            return watch.description


def invalid(request: PublishRequest) -> str | None:
    """Why `request` carries values W&B cannot take (NaN or infinite numbers, objects that
    are not JSON, text that is not Unicode), else None. Such a checkpoint fails at once:
    sent, it would fail as if transiently and block its collection until give_up_after."""
    try:
        json.dumps(request.metadata, allow_nan=False)
        for text in (request.description or "", request.run_path or "", *request.aliases):
            text.encode("utf-8")
        for f in request.files:
            f.name.encode("utf-8")
    except (ValueError, TypeError, RecursionError) as exc:  # UnicodeEncodeError is a ValueError
        return f"its metadata cannot be published: {type(exc).__name__}: {exc}"
    return None


def _key(row: Row) -> str:
    """What names a checkpoint's version across publish attempts: journal row and content."""
    return f"{row.id}:{row.digest}"
