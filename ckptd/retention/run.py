"""Retention, carried out: gather one watch entry's state, plan, delete, record, retry.

`Retention.after_publish(collection, now)` runs once a version is in place (the coordinator
calls it, on a worker thread) and never raises: whatever fails is logged and retried later,
and publishing goes on.
`Retention.run(watch, now, dry_run)` does the same for one watch entry and returns the plan
(`ckptd gc`). Every deletion is logged with its reason and recorded in the journal.

A failed deletion is retried at the next run of its collection once its backoff (the
`upload.retry` policy) has passed; `due(now)` names the collections with a retry due, for a
caller that wants to run them without waiting for the next publish. A version that turns out
to be linked to a registry is kept and not tried again by this process.

Thread safety: runs of one collection are serialised by a lock per collection; runs of
different collections may overlap. `_failures` and `_linked` are guarded by `_lock`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from ckptd.checkpoint import FileState, base_of
from ckptd.config import Config, WatchConfig
from ckptd.errors import PublishError, VersionLinked
from ckptd.journal import Journal, Row
from ckptd.logs import worth_logging
from ckptd.retention.plan import (
    Decision,
    LocalCheckpoint,
    RetentionPlan,
    RetentionPolicy,
    RetentionState,
    journal_aliases,
    plan,
)
from ckptd.retry import RetryPolicy
from ckptd.sinks import RemoteVersion, Sink

__all__ = ["Retention"]

log = logging.getLogger(__name__)


@dataclass
class _Failure:
    attempts: int
    next_at: float
    error: str


class Retention:
    """Carries out retention plans for every watch entry of a config against one sink."""

    def __init__(self, config: Config, journal: Journal, sink: Sink) -> None:
        self.config = config
        self.journal = journal
        self.sink = sink
        self.retry = RetryPolicy(config.upload.retry)
        self._run_locks = {watch.artifact: threading.Lock() for watch in config.watch}
        self._lock = threading.Lock()
        self._failures: dict[tuple[str, str], _Failure] = {}  # (collection, target)
        self._linked: set[tuple[str, str]] = set()  # (collection, version) refused as linked
        self._limits_noted = False

    # -- entry points ----------------------------------------------------------------------

    def after_publish(self, collection: str, now: float) -> None:
        """Run retention for every watch entry publishing to `collection`; never raises."""
        for watch in self.config.watch:
            if watch.artifact != collection:
                continue
            target = f"retention of {watch.path}"
            try:
                self.run(watch, now)
            except Exception as exc:  # a journal or filesystem failure: log, go on publishing
                self._failed(collection, target, exc, now)
            else:
                self._succeeded(collection, target)

    def run(self, watch: WatchConfig, now: float, *, dry_run: bool = False) -> RetentionPlan:
        """Plan retention for `watch` and, unless `dry_run`, carry the deletions out."""
        policy = RetentionPolicy.for_watch(watch)
        with self._run_locks[watch.artifact]:
            state = self.gather(watch, now)
            decided = plan(state, policy)
            if self._find_links(watch, decided, now):  # registry links keep versions: replan
                decided = plan(
                    replace(state, remote=self._mark_linked(watch, state.remote)), policy
                )
            if not dry_run:
                for decision in decided.deletions:
                    self._delete(watch, decision, now)
            return decided

    def due(self, now: float) -> tuple[str, ...]:
        """Collections with a failed deletion (or listing) whose retry is due at `now`."""
        with self._lock:
            return tuple(sorted({c for (c, _), f in self._failures.items() if f.next_at <= now}))

    def next_due(self) -> float:
        """When the earliest retry is due (inf if nothing failed)."""
        with self._lock:
            return min((f.next_at for f in self._failures.values()), default=float("inf"))

    def failures(self, collection: str | None = None) -> dict[str, str]:
        """What failed and waits for a retry: target -> the last error."""
        with self._lock:
            return {
                target: f.error
                for (c, target), f in self._failures.items()
                if collection is None or c == collection
            }

    # -- state ----------------------------------------------------------------------------

    def gather(self, watch: WatchConfig, now: float) -> RetentionState:
        """What the planner needs for `watch`: remote versions, local checkpoints, free space."""
        remote, note = self._remote_state(watch, now)
        policy = RetentionPolicy.for_watch(watch)
        if not policy.local_enabled:
            return RetentionState(remote, remote_note=note)
        local = tuple(self._local_state(watch, remote))
        try:
            usage = shutil.disk_usage(watch.path)
        except OSError:
            return RetentionState(remote, local, remote_note=note)
        return RetentionState(remote, local, usage.free, usage.total, note)

    def _remote_state(
        self, watch: WatchConfig, now: float
    ) -> tuple[tuple[RemoteVersion, ...] | None, str | None]:
        collection = watch.artifact
        if not self.sink.capabilities.lists_versions:
            if not self._limits_noted:
                self._limits_noted = True
                log.info(
                    "remote retention is skipped (%s); local retention deletes only with "
                    "allow_offline: true", self.sink.capabilities.limits,
                )  # fmt: skip
            return None, f"{self.sink.capabilities.limits}; remote retention skipped"
        if watch.distributed is not None and not watch.distributed.is_finisher:
            return None, (
                f"a multi-host entry: the finisher (rank {watch.distributed.finisher}) runs "
                "remote retention"
            )
        owner = next(w for w in self.config.watch if w.artifact == collection)
        if owner is not watch:
            return None, f"the versions of {collection} follow the retention of {owner.path}"
        if watch.retention.remote.keep_last is None:
            return None, "retention.remote.keep_last is not set: no version is deleted"
        try:
            listed = self.sink.versions(collection, watch.type)
        except PublishError as exc:
            self._failed(collection, f"listing {collection}", exc, now)
            return None, f"could not list the versions ({exc}); retried later"
        self._succeeded(collection, f"listing {collection}")
        return self._mark_linked(watch, tuple(listed)), None

    def _mark_linked(
        self, watch: WatchConfig, versions: tuple[RemoteVersion, ...] | None
    ) -> tuple[RemoteVersion, ...] | None:
        with self._lock:
            linked = {v for c, v in self._linked if c == watch.artifact}
        if versions is None:
            return None
        promoting = {
            p.version for p in self.journal.promotions(("pending",))
            if p.collection == watch.artifact
        }  # fmt: skip
        return tuple(
            replace(v, linked=v.linked or v.version in linked, promoting=v.version in promoting)
            for v in versions
        )

    def _find_links(self, watch: WatchConfig, decided: RetentionPlan, now: float) -> bool:
        """Ask the sink about registry links of every version the plan deletes (a listing
        cannot show them); True if any is linked. The sink checks again as it deletes."""
        found = False
        for decision in decided.deletions:
            if decision.where != "remote" or decision.version is None:
                continue
            target = f"{watch.artifact}:{decision.version}"
            try:
                links = self.sink.links(watch.artifact, watch.type, decision.version)
            except PublishError as exc:
                self._failed(watch.artifact, target, exc, now)
                continue
            if links:
                found = True
                with self._lock:
                    self._linked.add((watch.artifact, decision.version))
                log.info("retention keeps %s: linked to %s", target, ", ".join(links))
        return found

    def _local_state(
        self, watch: WatchConfig, remote: tuple[RemoteVersion, ...] | None
    ) -> Iterator[LocalCheckpoint]:
        collection = watch.artifact
        rows = self.journal.rows(collection)
        retired = self.journal.retired(collection)
        best = {alias: holder for alias, (holder, _) in self.journal.best(collection).items()}
        published = [r for r in rows if r.state in ("published", "aliased")]
        held = journal_aliases(((r.id, r.step, r.aliases) for r in published), best)
        listed = {v.version: v.aliases for v in remote or ()}
        mine = [r for r in rows if r.watch_path == str(watch.path) and r.state != "superseded"]
        newest_of = {r.relpath: r.id for r in sorted(mine, key=lambda r: r.id)}
        for row in mine:
            if row.id in retired or newest_of[row.relpath] != row.id:
                continue  # deleted already, or its path holds a later checkpoint now
            present, problem = _inspect(watch, row)
            if not present:
                continue  # rotated away by the framework: nothing left to delete
            if row.version is not None and row.version in listed:
                aliases = listed[row.version]
            else:
                aliases = held.get(row.id, row.aliases)
            yield LocalCheckpoint(
                row.id, row.relpath, row.step, row.state, row.version, aliases, row.size, problem
            )

    # -- acting ---------------------------------------------------------------------------

    def _delete(self, watch: WatchConfig, decision: Decision, now: float) -> None:
        collection = watch.artifact
        if decision.where == "remote":
            target = f"{collection}:{decision.version}"
        else:
            target = str(watch.path / (decision.path or ""))
        with self._lock:
            failure = self._failures.get((collection, target))
        if failure is not None and failure.next_at > now:
            return  # backing off; retried at a later run
        try:
            if decision.where == "remote":
                assert decision.version is not None
                self.sink.delete_version(collection, watch.type, decision.version)
            elif not self._delete_local(watch, decision):
                return
        except VersionLinked as exc:
            with self._lock:
                self._linked.add((collection, decision.version or ""))
            self._succeeded(collection, target)
            log.info("retention keeps %s: %s", target, exc)
            return
        except (PublishError, OSError) as exc:
            self._failed(collection, target, exc, now)
            return
        what = "deleted" if decision.where == "remote" else "deleted the files of"
        log.info("retention %s %s (step %s): %s", what, target, decision.step, decision.reason)
        self._succeeded(collection, target)
        checkpoint = decision.checkpoint_id
        self.journal.record_deletion(
            collection, target, decision.reason, now, checkpoint_id=checkpoint
        )

    def _delete_local(self, watch: WatchConfig, decision: Decision) -> bool:
        """Delete a checkpoint's recorded files (and directories left empty); False if they
        changed since the plan was made (then nothing is touched)."""
        assert decision.checkpoint_id is not None
        row = self.journal.get(decision.checkpoint_id)
        present, problem = _inspect(watch, row)
        if problem is not None or row.state != "aliased":
            log.info("retention leaves %s alone: %s", row.source, problem or row.state)
            return False
        base = base_of(row.source, [f.name for f in row.files])
        for f in row.files:
            (base / f.name).unlink(missing_ok=True)
        if base == row.source:  # a directory checkpoint: drop the directories it emptied
            root = os.path.realpath(watch.path)
            for dirpath, _, _ in os.walk(base, topdown=False):
                if os.path.realpath(dirpath) != root:
                    _rmdir_if_empty(Path(dirpath))
        return present

    # -- failures -------------------------------------------------------------------------

    def _failed(self, collection: str, target: str, exc: BaseException, now: float) -> None:
        transient = getattr(exc, "transient", True)
        with self._lock:
            failure = self._failures.setdefault((collection, target), _Failure(0, now, ""))
            failure.attempts += 1
            failure.error = str(exc)
            if transient:
                delay = self.retry.delay(failure.attempts, getattr(exc, "retry_after", None))
            else:
                delay = self.retry.config.max_delay
            failure.next_at = now + delay
            attempts = failure.attempts
        if worth_logging(attempts):
            log.warning(
                "retention could not handle %s (attempt %d), retrying in %.1fs: %s",
                target, attempts, delay, exc,
            )  # fmt: skip

    def _succeeded(self, collection: str, target: str) -> None:
        with self._lock:
            failure = self._failures.pop((collection, target), None)
        if failure is not None:
            log.info("retention handled %s after %d failed attempts", target, failure.attempts)


def _inspect(watch: WatchConfig, row: Row) -> tuple[bool, str | None]:
    """(any file still there, why the files must not be touched or None).

    Touchable: every recorded file that is still there is a regular file inside the watched
    root with the size and mtime it was published with (a rewrite changes the mtime).
    """
    root = os.path.realpath(watch.path)
    base = base_of(row.source, [f.name for f in row.files])
    present = False
    for f in row.files:
        path = base / f.name
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue
        present = True
        if not stat.S_ISREG(st.st_mode):
            return True, f"{f.name} is not a regular file any more"
        real = os.path.realpath(path)
        if os.path.commonpath([root, real]) != root:
            return True, f"{f.name} is outside the watched root"
        if not f.same_bytes(FileState.from_stat(f.name, st), same_inode=False):
            return True, f"{f.name} changed since it was published"
    return present, None


def _rmdir_if_empty(path: Path) -> None:
    with contextlib.suppress(OSError):  # not empty: someone put other files there
        path.rmdir()
