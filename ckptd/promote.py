"""Promotion: a published version goes on to a W&B Registry collection or a Hugging Face
Hub release when a rule of its watch entry fires.

A rule (`watch[].promote`) fires once per version and target. `alias` rules fire at
publish: `fired()` turns the aliases a version gets into (target, aliases) pairs, which the
journal queues in the same transaction that records the publish, so a crash between the
publish and the promotion still promotes it, once. `final` rules fire when a batch run ends
(`plan_final`), for the version that holds the alias then.

`Promoter.run_once(now)` is the coordinator's promotion step: it hands the due promotions to
worker threads, one at a time per target (so a Registry alias such as `candidate` ends on
the last version promoted), oldest first. A promotion is marked done in the journal only
after its target returned. Failures are treated as publishing's are: transient errors back
off with `upload.retry` and give up after `give_up_after` (`failed`); a permanent error parks
the target (`promote:<target>` in the journal's parked list: its queue is kept, it retries
after `max_delay` or at the next start); `ckptd status` lists what is pending or failed.

`promote_now` is `ckptd promote`: one version, one target, at once, outside the journal
(targets are idempotent, so running it twice changes nothing the first run made).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor

from ckptd.config import Config, PromoteRule
from ckptd.errors import CkptdError, JournalError, PromotionRefused, PublishError
from ckptd.journal import Journal, PromotionRow
from ckptd.logs import worth_logging
from ckptd.metrics import Metrics
from ckptd.retry import RetryPolicy
from ckptd.sinks.promotion import Promotion, PromotionTarget, open_target

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
        self._pool: ThreadPoolExecutor | None = None
        # Owned by the coordinator thread: target -> its promotion in flight.
        self._running: dict[str, Future[None]] = {}
        self._targets: dict[str, PromotionTarget] = {}  # opened on first use; under _lock
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return any(w.promote for w in self.config.watch)

    def start(self) -> None:
        if self.enabled:
            self._pool = ThreadPoolExecutor(_WORKERS, thread_name_prefix="ckptd-promote")

    def run_once(self, now: float) -> float:
        """Start each due promotion whose target is idle; returns when the next one is due."""
        if self._pool is None:
            return math.inf
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

    def _promote(self, row: PromotionRow) -> None:
        try:
            self._attempt(row)
        except JournalError as exc:  # nothing was lost: the promotion stays pending
            log.error("promoting %s:%s to %s: %s; it stays queued",
                      row.collection, row.version, row.target, exc)  # fmt: skip

    def _attempt(self, row: PromotionRow) -> None:
        try:
            target = self._target(row.target)
            promotion = Promotion(
                collection=row.collection, type=self._types.get(row.collection, "model"),
                version=row.version, step=row.step, aliases=row.aliases,
            )  # fmt: skip
            result = target.promote(promotion)
        except PublishError as exc:
            self._failed(row, exc)
            return
        except JournalError:
            raise
        except Exception as exc:  # one promotion must never stop the others
            log.exception("promoting %s:%s to %s crashed", row.collection, row.version, row.target)
            self._failed(row, PublishError(f"{type(exc).__name__}: {exc}", transient=True))
            return
        self.journal.update_promotion(
            row.id, self.clock(), state="done", result=result, last_error=None
        )
        self._count(row, "done")
        log.info("promoted %s:%s to %s: %s", row.collection, row.version, row.target, result)

    def _failed(self, row: PromotionRow, exc: PublishError) -> None:
        now = self.clock()
        attempts = row.attempts + 1
        first = row.first_failure_at or now
        label = f"{row.collection}:{row.version} to {row.target}"
        if isinstance(exc, PromotionRefused):  # this version only: the others go on
            self.journal.update_promotion(
                row.id, now, state="failed", attempts=attempts, last_error=str(exc)
            )
            log.error("not promoting %s: %s", label, exc)
            self._count(row, "failed")
            return
        if not exc.transient:
            self.journal.update_promotion(row.id, now, attempts=attempts, last_error=str(exc))
            self.journal.park(f"{PARKED_PREFIX}{row.target}", str(exc), now)
            self._count(row, "parked")
            log.error(
                "promotions to %s are parked: %s. They are kept; fix the cause and restart "
                "ckptd (it also retries by itself after %.0fs)",
                row.target, exc, self.retry.config.max_delay,
            )  # fmt: skip
            return
        if self.retry.gives_up(first, now):
            self.journal.update_promotion(
                row.id, now, state="failed", attempts=attempts, last_error=str(exc),
                first_failure_at=first,
            )  # fmt: skip
            log.error("gave up promoting %s after %d attempts: %s", label, attempts, exc)
            self._count(row, "failed")
            return
        delay = self.retry.delay(attempts, exc.retry_after)
        self.journal.update_promotion(
            row.id, now, attempts=attempts, next_attempt_at=now + delay,
            first_failure_at=first, last_error=str(exc),
        )  # fmt: skip
        self._count(row, "retry")
        if worth_logging(attempts):
            log.warning("promoting %s failed (attempt %d), retrying in %.1fs: %s",
                        label, attempts, delay, exc)  # fmt: skip

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
    config: Config, api_key: str | None, artifact: str, ref: str, spec: str,
    aliases: tuple[str, ...],
) -> str:  # fmt: skip
    """`ckptd promote ARTIFACT:REF --to SPEC`: promote that version now; the target's line."""
    from ckptd.sinks.fetch import resolve_version
    from ckptd.sinks.wandb import WandbSink

    artifact_type = next((w.type for w in config.watch if w.artifact == artifact), "model")
    sink = WandbSink(config, api_key)
    target = open_target(config, spec, api_key)
    try:
        found = resolve_version(sink, artifact, artifact_type, ref)
        if found.step is None:
            raise CkptdError(f"{artifact}:{found.version} was not published by ckptd (no step)")
        promotion = Promotion(
            collection=artifact, type=artifact_type, version=found.version, step=found.step,
            aliases=aliases, metrics=found.metrics,
        )  # fmt: skip
        return target.promote(promotion)
    finally:
        with contextlib.suppress(Exception):
            target.close()
        sink.close()
