"""Promotion: a published version goes on to a W&B Registry collection or a Hugging Face
Hub release when a rule of its watch entry fires.

A rule (`watch[].promote`) fires once per version and target. `alias` rules fire at
publish: `fired()` turns the aliases a version gets into (target, aliases) pairs, which the
journal queues in the same transaction that records the publish, so a crash between the
publish and the promotion still promotes it, once. `final` rules fire when a batch run ends
(`plan_final`), for the version that holds the alias then.

`Promoter.run_once(now)` is the coordinator's promotion step: it parks the targets whose
promotion hit a permanent error, and hands the due promotions to worker threads (the
service's pools), one at a time per target (so a Registry alias such as `candidate` ends on
the last version promoted), oldest first. A promotion is marked done in the journal only
after its target returned. Failures are treated as publishing's are: transient errors back
off with `upload.retry` and give up after `give_up_after` (`failed`), decided by the same
`retry.next_after_failure` as publishing; a permanent error parks the target
(`promote:<target>` in the journal's parked list: its queue is kept, it retries after
`max_delay` or at the next start); a version the target cannot take fails alone; `ckptd
status` lists what is pending or failed.

`promote_now` is `ckptd promote`: one version, one target, at once, outside the journal
(targets are idempotent, so running it twice changes nothing the first run made).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future

from ckptd.config import Config, PromoteRule
from ckptd.errors import CkptdError, JournalError, PromotionRefused, PublishError
from ckptd.journal import Journal, PromotionRow
from ckptd.logs import worth_logging
from ckptd.metrics import Metrics
from ckptd.retry import GiveUp, Park, RetryPolicy, next_after_failure
from ckptd.sinks import Sink
from ckptd.sinks.promotion import Promotion, PromotionTarget

__all__ = ["PARKED_PREFIX", "Promoter", "fired", "promote_now"]

log = logging.getLogger(__name__)

PARKED_PREFIX = "promote:"  # a parked target's key in the journal's parked list
_WORKERS = 2

TargetFactory = Callable[[str], PromotionTarget]


def fired(
    rules: Iterable[PromoteRule], aliases: Iterable[str]
) -> list[tuple[str, tuple[str, ...]]]:
    """The (target, aliases) of each `alias` rule that a version with `aliases` fires."""
    held = set(aliases)
    return [(r.to, r.aliases) for r in rules if r.when.alias is not None and r.when.alias in held]


class Promoter:
    """Carries out the journal's pending promotions. Cheap to construct; `start()` makes
    the worker pool, `shutdown()` waits for nothing and closes the targets."""

    def __init__(
        self,
        config: Config,
        journal: Journal,
        targets: TargetFactory,
        wake: threading.Event,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.journal = journal
        self.retry = RetryPolicy(config.upload.retry)
        self.clock = clock
        self._open_target = targets
        self._wake = wake
        self._types = {w.artifact: w.type for w in config.watch}
        self._final = [(w.artifact, r) for w in config.watch for r in w.promote if r.when.final]
        self._pool: Executor | None = None
        # Owned by the coordinator thread: target -> its promotion in flight, whose result
        # is the reason to park that target (a permanent error), or None.
        self._running: dict[str, Future[str | None]] = {}
        self._targets: dict[str, PromotionTarget] = {}  # opened on first use; under _lock
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return any(w.promote for w in self.config.watch)

    def start(self, make: Callable[[int, str], Executor]) -> None:
        """Make the worker pool with `make(workers, name)` (the service's Pools)."""
        if self.enabled:
            self._pool = make(_WORKERS, "ckptd-promote")

    def run_once(self, now: float) -> float:
        """Park the targets whose promotion just hit a permanent error, then start each due
        promotion whose target is idle; returns when the next one is due. Coordinator only."""
        if self._pool is None:
            return math.inf
        self._collect(now)
        parked = self.journal.parked()
        due = math.inf
        for promotion in self.journal.promotions(("pending",)):
            if f"{PARKED_PREFIX}{promotion.target}" in parked:
                continue
            busy = self._running.get(promotion.target)
            if busy is not None and not busy.done():
                continue
            if promotion.next_attempt_at > now:
                due = min(due, promotion.next_attempt_at)
                continue
            future = self._pool.submit(self._promote, promotion)
            future.add_done_callback(lambda _: self._wake.set())
            self._running[promotion.target] = future
        return due

    def _collect(self, now: float) -> None:
        for target, future in list(self._running.items()):
            if not future.done():
                continue
            del self._running[target]
            reason = None if future.cancelled() or future.exception() else future.result()
            if reason is not None:
                self.journal.park(f"{PARKED_PREFIX}{target}", reason, now)
                log.error(
                    "promotions to %s are parked: %s. They are kept; fix the cause and "
                    "restart ckptd (it also retries by itself after %.0fs)",
                    target, reason, self.retry.config.max_delay,
                )  # fmt: skip

    def plan_final(self, now: float) -> bool:
        """Queue each `final` rule's promotion of the version holding its alias now (a
        batch run ends); True if any was new."""
        queued = False
        for collection, rule in self._final:
            assert rule.when.final is not None
            holder = self._holder(collection, rule.when.final)
            if holder is not None:
                queued |= self.journal.queue_promotion(holder, rule.to, rule.aliases, now)
        return queued

    def busy(self) -> bool:
        """Is a promotion running?"""
        return any(not f.done() for f in self._running.values())

    def waiting(self) -> list[PromotionRow]:
        """Pending promotions whose target is not parked: what a batch run waits for."""
        parked = self.journal.parked()
        pending = self.journal.promotions(("pending",))
        return [p for p in pending if f"{PARKED_PREFIX}{p.target}" not in parked]

    def unfinished(self, since: float) -> list[str]:
        """Each promotion still pending, or failed at or after `since`, with its reason:
        what a batch run reports before it exits 1."""
        lines = []
        for p in self.journal.promotions(("pending", "failed")):
            if p.state == "failed" and p.updated_at < since:
                continue
            why = f"{p.state}: {p.last_error}" if p.last_error else p.state
            lines.append(f"{p.collection}:{p.version} not promoted to {p.target} ({why})")
        return lines

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            targets, self._targets = list(self._targets.values()), {}
        for target in targets:
            target.close()

    # -- one promotion, on a worker thread -------------------------------------------------

    def _promote(self, row: PromotionRow) -> str | None:
        """Promote `row`; the reason to park its target, or None. Never raises."""
        try:
            return self._attempt(row)
        except JournalError as exc:  # nothing was lost: the promotion stays pending
            log.error("promoting %s:%s to %s: %s; it stays queued",
                      row.collection, row.version, row.target, exc)  # fmt: skip
            return None

    def _attempt(self, row: PromotionRow) -> str | None:
        try:
            target = self._target(row.target)
            promotion = Promotion(
                collection=row.collection, type=self._types.get(row.collection, "model"),
                version=row.version, step=row.step, aliases=row.aliases,
            )  # fmt: skip
            result = target.promote(promotion)
        except PublishError as exc:
            return self._failed(row, exc)
        except JournalError:
            raise
        except Exception as exc:  # one promotion must never stop the others
            log.exception("promoting %s:%s to %s crashed", row.collection, row.version, row.target)
            return self._failed(row, PublishError(f"{type(exc).__name__}: {exc}", transient=True))
        self.journal.update_promotion(
            row.id, self.clock(), state="done", result=result, last_error=None
        )
        self._count(row, "done")
        log.info("promoted %s:%s to %s: %s", row.collection, row.version, row.target, result)
        return None

    def _failed(self, row: PromotionRow, exc: PublishError) -> str | None:
        """Record a failed attempt as publishing does (retry.next_after_failure); the reason
        to park the target, or None."""
        now = self.clock()
        attempts = row.attempts + 1
        label = f"{row.collection}:{row.version} to {row.target}"
        if isinstance(exc, PromotionRefused):  # this version only: the others go on
            self.journal.update_promotion(
                row.id, now, state="failed", attempts=attempts, last_error=str(exc)
            )
            log.error("not promoting %s: %s", label, exc)
            self._count(row, "failed")
            return None
        decision = next_after_failure(
            self.retry, exc, attempts=attempts, first_failure_at=row.first_failure_at, now=now
        )
        if isinstance(decision, Park):
            self.journal.update_promotion(row.id, now, attempts=attempts, last_error=str(exc))
            self._count(row, "parked")
            return decision.reason
        if isinstance(decision, GiveUp):
            self.journal.update_promotion(
                row.id, now, state="failed", attempts=attempts, last_error=str(exc),
                first_failure_at=decision.first_failure_at,
            )  # fmt: skip
            log.error("gave up promoting %s after %d attempts: %s", label, attempts, exc)
            self._count(row, "failed")
            return None
        self.journal.update_promotion(
            row.id, now, attempts=attempts, next_attempt_at=decision.at,
            first_failure_at=decision.first_failure_at, last_error=str(exc),
        )  # fmt: skip
        self._count(row, "retry")
        if worth_logging(attempts):
            log.warning("promoting %s failed (attempt %d), retrying in %.1fs: %s",
                        label, attempts, decision.at - now, exc)  # fmt: skip
        return None

    def _count(self, row: PromotionRow, outcome: str) -> None:
        self.metrics.promotions.labels(target=row.target, outcome=outcome).inc()

    def _target(self, spec: str) -> PromotionTarget:
        with self._lock:
            if spec not in self._targets:
                self._targets[spec] = self._open_target(spec)
            return self._targets[spec]

    def _holder(self, collection: str, alias: str) -> int | None:
        """The checkpoint whose version holds `alias` in `collection` now."""
        best = self.journal.best(collection).get(alias)
        if best is not None and best[0] >= 0:
            return best[0]
        published = self.journal.rows(collection, ("published", "aliased"))
        holders = [r for r in published if alias in r.aliases and r.version is not None]
        return max(holders, key=lambda r: (r.step, r.id)).id if holders else None


def promote_now(
    config: Config, sink: Sink, target: PromotionTarget, artifact: str, ref: str,
    aliases: tuple[str, ...],
) -> str:  # fmt: skip
    """`ckptd promote ARTIFACT:REF --to TARGET`: promote the version of `sink` that `ref`
    names to `target` now; the target's line saying what it holds."""
    from ckptd.sinks.fetch import resolve_version

    artifact_type = next((w.type for w in config.watch if w.artifact == artifact), "model")
    found = resolve_version(sink, artifact, ref)
    if found.step is None:
        raise CkptdError(f"{artifact}:{found.version} was not published by ckptd (no step)")
    promotion = Promotion(
        collection=artifact, type=artifact_type, version=found.version, step=found.step,
        aliases=aliases, metrics=found.metrics,
    )  # fmt: skip
    return target.promote(promotion)
