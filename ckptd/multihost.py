"""Publishing a multi-host checkpoint: this host's part, the rendezvous, the finisher's commit.

A watch entry with `distributed` is one node's share of a multi-node job. Each of its rows is
this host's *part* of a step and moves `hashed -> upserted -> published -> aliased`:
1. `hashed -> upserted`: the part's files go into the step's distributed version (PENDING on
   W&B until committed) and the rendezvous records that they landed (`PartsSink.upsert`).
2. On the finisher, once every rank's part is recorded: the version is committed with the
   aliases planned from the metrics any host gave (its own first, then by rank), and the
   rendezvous records the version. On the other hosts: the row is published when the
   rendezvous shows the finisher's commit; each host's local retention waits for that.
3. A rank that never arrives: the finisher waits `timeout` from its own part's landing, then
   gives the step up (a WARNING and a `partial` drop naming the missing ranks; no version)
   and records that, so the others give it up too; the others give up by themselves after
   twice the timeout. Later steps carry on.
The coordinator calls `publish` again for an `upserted` row each time its `next_attempt_at`
is due (and each such call upserts the later steps this host has hashed meanwhile); every
step is idempotent, so a host killed anywhere repeats the step it was in.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from ckptd import staging
from ckptd.checkpoint import CheckpointInfo
from ckptd.config import DistributedConfig, WatchConfig
from ckptd.drops import Drop
from ckptd.errors import PublishError
from ckptd.journal import Row
from ckptd.publish import Outcome
from ckptd.sinks.distributed import Part, PartsSink, Place, Rendezvous
from ckptd.sinks.metadata import unpublishable

if TYPE_CHECKING:
    from ckptd.publish import Publisher

__all__ = ["MultiHost", "merged_info", "poll_interval"]

log = logging.getLogger(__name__)


def poll_interval(distributed: DistributedConfig) -> float:
    """How often a waiting host reads the rendezvous again: a twentieth of the timeout,
    between half a second and five seconds."""
    return min(5.0, max(0.5, distributed.timeout / 20))


def merged_info(own: CheckpointInfo, parts: dict[int, Part]) -> CheckpointInfo:
    """This host's info with what the other hosts' parts add: a metric, the epoch or an
    alias that this host's files did not give, taken from the lowest rank that gave it."""
    metrics = dict(own.metrics)
    epoch = own.epoch
    aliases = list(own.aliases)
    for _, part in sorted(parts.items()):
        for name, value in part.metrics.items():
            metrics.setdefault(name, value)
        if epoch is None:
            epoch = part.epoch
        aliases += [a for a in part.aliases if a not in aliases]
    return replace(own, metrics=metrics, epoch=epoch, aliases=tuple(aliases))


class MultiHost:
    """Publishes the rows of `distributed` watch entries; called by the publisher on the
    thread that publishes the row's collection (one at a time per collection)."""

    def __init__(self, publisher: Publisher, parts: PartsSink) -> None:
        self.publisher = publisher
        self.parts = parts
        self.journal = publisher.journal
        self.clock = publisher.clock
        self._told_waiting: set[int] = set()  # rows whose wait was logged; publisher threads

    def publish(self, row: Row, watch: WatchConfig) -> Outcome:
        """Move `row` (`hashed` or `upserted`) as far as it can go now; never raises
        PublishError (a failure is retried like any publish)."""
        distributed = watch.distributed
        assert distributed is not None
        place = Place(
            distributed.group, distributed.hosts, distributed.rank, distributed.finisher, row.step
        )
        if row.state == "hashed":
            landed = self._upsert(row, place)
            if landed is not None:
                return landed
            row = self.journal.get(row.id)
        try:
            seen = self.parts.rendezvous(row.collection, place)
        except PublishError as exc:
            return self.publisher._failed(row, exc)
        if distributed.is_finisher:
            outcome = self._as_finisher(row, watch, distributed, place, seen)
        else:
            outcome = self._as_contributor(row, distributed, place, seen)
        if self.journal.get(row.id).state == "upserted":
            self._upsert_ahead(row, place)
        return outcome or Outcome()

    def _upsert_ahead(self, waiting: Row, place: Place) -> None:
        """While the lowest step waits for the other hosts, upsert the later steps this
        host has hashed, in step order: each host's parts land as soon as they can, and
        the finisher still commits in step order (the coordinator hands it the lowest)."""
        now = self.clock()
        for row in self.journal.rows(waiting.collection, ("hashed",)):
            if row.watch_path != waiting.watch_path or row.id == waiting.id:
                continue
            if row.next_attempt_at > now or self._upsert(row, replace(place, step=row.step)):
                return  # backing off or failed: it and the steps after it wait their turn

    # -- steps -------------------------------------------------------------------------

    def _upsert(self, row: Row, place: Place) -> Outcome | None:
        """`hashed -> upserted`; None if the part landed, else what became of the row (it
        failed, to be retried, or ended)."""
        assert row.snapshot is not None
        if (problem := staging.verify(Path(row.snapshot), row.files)) is not None:
            why = f"{problem}; the new content is a checkpoint of its own"
            return self.publisher._supersede(row, why)
        request = self.publisher._request(row, ())
        if (problem := unpublishable(request)) is not None:
            return self.publisher._quarantine(row, "invalid", problem)
        info = row.info
        part = Part(
            place.rank, {f.name: f.size for f in row.files}, info.metrics, info.epoch, info.aliases
        )
        try:
            self.parts.upsert(request, place, part)
        except PublishError as exc:
            return self.publisher._failed(row, exc)
        self.journal.mark_upserted(row.id, self.clock())
        log.info(
            "%s: this host's part of step %d (rank %d of %d, %d files, %d bytes) is in W&B",
            row.source, row.step, place.rank, place.hosts, len(row.files), row.size,
        )  # fmt: skip
        return None

    def _as_finisher(
        self,
        row: Row,
        watch: WatchConfig,
        distributed: DistributedConfig,
        place: Place,
        seen: Rendezvous,
    ) -> Outcome | None:
        missing = _missing(place, seen)
        if not missing:
            return self._commit(row, watch, place, seen)
        if self._waited(row) < distributed.timeout:
            if row.id not in self._told_waiting:
                self._told_waiting.add(row.id)
                log.info(
                    "%s: step %d waits for the parts of %s (up to %gs)",
                    row.source, row.step, _ranks(missing), distributed.timeout,
                )  # fmt: skip
            self._look_again(row, distributed, f"waiting for the parts of {_ranks(missing)}")
            return None
        try:
            self.parts.abandon(row.collection, place, missing)
        except PublishError as exc:
            return self.publisher._failed(row, exc)
        self._give_up(row, f"{_ranks(missing)} of {place.hosts} did not arrive within "
                      f"distributed.timeout ({distributed.timeout:g}s)")  # fmt: skip
        return None

    def _as_contributor(
        self, row: Row, distributed: DistributedConfig, place: Place, seen: Rendezvous
    ) -> Outcome | None:
        if seen.committed is not None:
            now = self.clock()
            row = self.journal.mark_published(row.id, now, version=seen.committed, aliases=(),
                                              best={})  # fmt: skip
            log.info(
                "%s: step %d is committed as %s:%s by the finisher (rank %d)",
                row.source, row.step, row.collection, seen.committed, place.finisher,
            )  # fmt: skip
            return self.publisher.finish(row)
        if seen.abandoned is not None:
            self._give_up(row, f"the finisher (rank {place.finisher}) gave it up: "
                          f"{_ranks(seen.abandoned)} of {place.hosts} did not arrive")  # fmt: skip
        elif self._waited(row) >= 2 * distributed.timeout:
            missing = _missing(place, seen)
            why = (f"{_ranks(missing)} of {place.hosts} did not arrive" if missing
                   else f"the finisher (rank {place.finisher}) did not commit it")  # fmt: skip
            self._give_up(row, f"{why} within twice distributed.timeout "
                          f"({2 * distributed.timeout:g}s)")  # fmt: skip
        else:
            self._look_again(row, distributed, f"waiting for the finisher (rank {place.finisher})")
        return None

    def _commit(
        self, row: Row, watch: WatchConfig, place: Place, seen: Rendezvous
    ) -> Outcome | None:
        """Every part is in: commit the version with aliases planned from every host's
        metrics, then alias bookkeeping and retention as for any publish."""
        publisher = self.publisher
        merged = replace(row, info=merged_info(row.info, dict(seen.parts)))
        plan = publisher._plan(merged, watch)
        request = publisher._request(merged, plan.aliases)
        files = {name: size for part in seen.parts.values() for name, size in part.files.items()}
        # The version's files are the parts upserted already: the commit sends none, and its
        # metadata names every host's files.
        request = replace(request, files=(), facts=replace(request.facts, files=files))
        if (problem := unpublishable(request)) is not None:
            return publisher._quarantine(row, "invalid", problem)
        for note in plan.notes:
            log.warning("%s: %s", row.source, note)
        try:
            result = self.parts.finish(request, place)
        except PublishError as exc:
            return publisher._failed(row, exc)
        row = self.journal.mark_published(
            row.id, self.clock(), version=result.version, aliases=plan.aliases, best=plan.best
        )
        log.info(
            "published step %d of %s from %d hosts as %s:%s (%d files, %d bytes) with aliases %s",
            row.step, row.collection, place.hosts, row.collection, result.version, len(files),
            sum(files.values()), ", ".join(plan.aliases) or "none",
        )  # fmt: skip
        return publisher.finish(row)

    def _give_up(self, row: Row, why: str) -> None:
        """The step will not be committed: `failed`, with a `partial` drop naming why."""
        now = self.clock()
        detail = f"step {row.step}: {why}; no version was committed"
        self.journal.fail(row.id, now, f"partial: {detail}")
        self.publisher.metrics.failed.labels(collection=row.collection).inc()
        drops = self.publisher.drops
        if drops is not None:
            drops.record(Drop(row.collection, row.source, "partial", detail), now)
        else:
            log.warning("not publishing %s: %s", row.source, detail)

    def _look_again(self, row: Row, distributed: DistributedConfig, why: str) -> None:
        """Read the rendezvous again in a moment; `why` shows in `ckptd status`."""
        now = self.clock()
        self.journal.retry_later(row.id, now, at=now + poll_interval(distributed), error=why)

    def _waited(self, row: Row) -> float:
        """Seconds since this host's part landed."""
        return max(0.0, self.clock() - (row.part_at if row.part_at is not None else self.clock()))


def _missing(place: Place, seen: Rendezvous) -> tuple[int, ...]:
    return tuple(rank for rank in range(place.hosts) if rank not in seen.parts)


def _ranks(ranks: tuple[int, ...]) -> str:
    listed = ", ".join(str(r) for r in ranks)
    return f"rank {listed}" if len(ranks) == 1 else f"ranks {listed}"
