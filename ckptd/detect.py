"""The detector: turns watcher hints and scans into finished checkpoints, one watch entry each.

A candidate goes through three questions. Is it whole (every file the format names is there
and passes its structural check)? Then it is held at once: hard links keep its bytes when
the framework rotates it away a second later (ckptd.holds). Is it finished (a rename or a
commit marker says so, inotify saw every file closed after its last write, or nothing changed
for `settle` seconds)? Once the name is gone, the held links are judged instead. Is its
sidecar in (waited for only where one is expected)? Then it is a `ReadyCheckpoint`.

A candidate that will not be published is dropped by name (ckptd.drops): deleted before it
was whole, zero bytes, still incomplete after `incomplete_after`, or a directory of
checkpoint-like files in a layout ckptd does not know.

Only the service's coordinator thread calls a Detector. Its state is in memory on purpose:
after a restart the start-up scan finds every candidate again and the settle window simply
starts over; what was already published is recognised by the journal, not here.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptd import sidecar
from ckptd.checkpoint import CheckpointInfo, FileState, base_of, fingerprint, stat_files
from ckptd.config import WatchConfig
from ckptd.drops import Drop
from ckptd.errors import CheckpointChanged, SidecarError
from ckptd.formats import CheckpointFormat, Verdict, format_for, is_temp_name
from ckptd.formats.checks import UNREADABLE
from ckptd.holds import Hold, Holder
from ckptd.inputs import name_problem, printable
from ckptd.writers import open_for_writing

__all__ = ["Detector", "ReadyCheckpoint"]

log = logging.getLogger(__name__)

_MAX_RECHECK = 1.0  # seconds between re-checks of a pending candidate with no events
_MAX_BACKOFF = 30.0  # seconds: the longest an unchanged, unfinished candidate waits unhinted
_PER_POLL = 2000  # candidates evaluated per step at most: a flood never starves a fresh hint
_CHANGED_RECHECK = 0.05  # seconds: a candidate that changed while it was being held


@dataclass(frozen=True)
class ReadyCheckpoint:
    """A finished checkpoint, as the detector saw it; the service snapshots and journals it.

    `base` is the directory the files' names are relative to: the unit itself for a
    directory checkpoint, its parent for a file (or a TensorFlow-style prefix of files).
    `hold`, when set, already pins the files: it becomes the snapshot.
    """

    watch: WatchConfig
    unit: Path
    relpath: str
    format: str
    files: tuple[FileState, ...]
    info: CheckpointInfo
    base: Path
    hold: Hold | None = None

    @property
    def fingerprint(self) -> str:
        """The files' identities; a rewrite of any file changes it."""
        return fingerprint(self.files)


@dataclass
class _Candidate:
    first_seen: float
    recheck_at: float
    hinted: bool = True
    seen: tuple[tuple[str, int, int, int], ...] = ()  # identities last observed (no ctime)
    files: tuple[FileState, ...] = ()  # the files last observed
    base: Path | None = None
    stable_since: float = 0.0
    newest_ns: int = 0  # the newest write among `files` (mtime, or ctime before we held it)
    renamed: bool = False
    conclusive: bool = True  # the last verdict's (see Verdict.conclusive)
    closed: dict[str, bool] = field(default_factory=dict)  # path -> closed since last write
    whole_since: float | None = None
    ready_since: float | None = None
    hold: Hold | None = None
    info: CheckpointInfo | None = None  # the name's and framework's, read when it was whole
    found_sidecar: tuple[dict[str, Any], Path] | None = None
    quiet: int = 0  # checks in a row that saw nothing new, for back-off
    reason: str = "not checked yet"

    @classmethod
    def new(cls, now: float, *, hinted: bool = True) -> _Candidate:
        return cls(first_seen=now, recheck_at=now, hinted=hinted, stable_since=now)


@dataclass
class Detector:
    """Finds finished checkpoints under one watched root. With `staging`, whole candidates
    are held there (ckptd.holds); without, the service snapshots them once finished."""

    watch: WatchConfig
    staging: Path | None = None
    close_evidence: bool = True  # the observer reports closes (inotify), not polling
    fmt: CheckpointFormat = field(init=False)
    _pending: dict[Path, _Candidate] = field(default_factory=dict, init=False)
    _done: dict[Path, str] = field(default_factory=dict, init=False)
    _done_files: dict[Path, frozenset[str]] = field(default_factory=dict, init=False)
    _dropped: dict[Path, str] = field(default_factory=dict, init=False)  # unit -> fingerprint
    _warned: set[str] = field(default_factory=set, init=False)
    _drops: list[Drop] = field(default_factory=list, init=False)
    _expect_sidecar: bool = field(default=False, init=False)
    _holder: Holder | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.fmt = format_for(self.watch)
        if self.staging is not None:
            self._holder = Holder(self.staging, self.watch.artifact)

    @property
    def root(self) -> Path:
        return self.watch.path

    # -- inputs ---------------------------------------------------------------------------

    def hint(
        self,
        path: Path,
        now: float,
        *,
        moved_in: bool = False,
        written: bool = False,
        closed: bool = False,
    ) -> None:
        """A watcher event touched `path`; re-check the checkpoint it belongs to, soon."""
        if path.name.endswith(sidecar.SUFFIX) or path.name == sidecar.INSIDE:
            self._expect_sidecar = True
            for pending in self._pending.values():
                pending.recheck_at = now
            self._late_sidecar(path)
            return
        unit = self.fmt.unit_for(self.root, path) or self._unrecognised_unit(path)
        if unit is None:
            return
        pending = self._pending.setdefault(unit, _Candidate.new(now))
        pending.recheck_at, pending.hinted = now, True
        # A rename into place is a commit signal for the unit renamed; any later write
        # event withdraws it (the detector then falls back to the evidence of closes and
        # the settle window). The moves watchdog synthesizes for a renamed directory's
        # contents keep it.
        if path == unit:
            pending.renamed = moved_in
        elif not moved_in:
            pending.renamed = False
        if closed or moved_in:
            pending.closed[str(path)] = True  # written in full: closed, or renamed in whole
        elif written:
            pending.closed[str(path)] = False

    def scan(self, now: float) -> int:
        """Walk the root for candidates (start-up, rescans, after an overflow); count them."""
        try:
            units = list(self.fmt.scan(self.root))
            units += self._unrecognised_dirs(set(units))
        except FileNotFoundError:
            self._warn_once(
                f"missing:{self.root}", "watched directory %s does not exist", self.root
            )
            return 0
        for unit in units:
            if unit not in self._pending:
                self._pending[unit] = _Candidate.new(now, hinted=False)
        return len(units)

    def expect_sidecars(self) -> None:
        """This entry's checkpoints have come with sidecars before (the journal says so)."""
        self._expect_sidecar = True

    def forget(self, unit: Path) -> None:
        """Stop tracking `unit` (published, superseded or refused), releasing its hold."""
        pending = self._pending.pop(unit, None)
        if pending is not None and pending.hold is not None and self._holder is not None:
            self._holder.release(pending.hold)

    def drop(self, unit: Path, reason: str, detail: str = "") -> None:
        """Give up on `unit`: it will not be published (ckptd.drops says why it matters).
        It is looked at again only once its files change."""
        pending = self._pending.get(unit)
        if pending is not None and pending.files:
            self._dropped[unit] = fingerprint(pending.files)
        self.forget(unit)
        self._drops.append(Drop(self.watch.artifact, unit, reason, detail))

    def take_drops(self) -> list[Drop]:
        """The candidates given up since the last call, for the coordinator to record."""
        drops, self._drops = self._drops, []
        return drops

    def mark_done(self, ready: ReadyCheckpoint) -> None:
        """`ready` is in the journal (its hold is the journal's now, or released by the
        service): ignore the unit until its files change."""
        pending = self._pending.get(ready.unit)
        if pending is not None:
            pending.hold = None  # handed over, not ours to release
        self.remember(ready.relpath, ready.files)

    def remember(self, relpath: str, files: tuple[FileState, ...]) -> None:
        """The checkpoint at `relpath` with these files is in the journal: ignore the unit
        until they change. At start-up this spares re-reading every known checkpoint."""
        unit = self.root / relpath
        self._done[unit] = fingerprint(files)
        self._done_files[unit] = _identities(files)
        self._dropped.pop(unit, None)
        self.forget(unit)

    # -- the single step --------------------------------------------------------------------

    def poll(self, now: float) -> list[ReadyCheckpoint]:
        """Re-check the candidates that are due, freshly hinted ones first; return those
        that are finished. At most _PER_POLL are checked: the rest stay due."""
        due = [(u, p) for u, p in self._pending.items() if p.recheck_at <= now]
        if len(due) > _PER_POLL:
            due.sort(key=lambda item: (not item[1].hinted, item[1].recheck_at))
            del due[_PER_POLL:]
        ready = []
        for unit, pending in due:
            try:
                result = self._evaluate(unit, pending, now)
            except Exception as exc:  # one bad candidate must never stop the others
                log.debug("evaluating %s failed", printable(unit), exc_info=True)
                self.drop(unit, "crashed", f"{type(exc).__name__}: {exc}")
                continue
            if result is not None:
                ready.append(result)
        return ready

    def flush(self, now: float) -> list[ReadyCheckpoint]:
        """At shutdown: every held candidate whose files the framework deleted already, as
        finished (they were whole when held and their writer is done with them), so that
        the journal keeps them; a candidate that still exists is found again at start."""
        out = []
        for unit, pending in list(self._pending.items()):
            if pending.hold is not None and pending.info is not None and not _exists(unit):
                info = self._merge(pending.info, pending.found_sidecar)
                out.append(self._ready(unit, pending, pending.hold.files, info))
        return out

    def next_due(self) -> float:
        """The earliest time a pending candidate needs another look (inf when none)."""
        return min((p.recheck_at for p in self._pending.values()), default=math.inf)

    def pending(self) -> dict[Path, str]:
        """Each candidate not yet finished, with the reason."""
        return {unit: p.reason for unit, p in self._pending.items()}

    def _evaluate(self, unit: Path, pending: _Candidate, now: float) -> ReadyCheckpoint | None:
        pending.hinted = False
        pending.recheck_at = now + self._interval(pending)
        if (bad_name := name_problem(unit, self.root)) is not None:
            self.drop(unit, "refused", bad_name)
            return None
        if unit.is_symlink():
            self._skip_symlink(unit)
            self.forget(unit)
            return None
        if unit in self._done and self._unchanged(unit, self._done[unit]):
            self.forget(unit)
            return None
        if unit in self._dropped and self._unchanged(unit, self._dropped[unit]):
            self.forget(unit)
            return None
        try:
            verdict = self.fmt.check(unit)
        except FileNotFoundError:
            return self._vanished(unit, pending, now)
        except OSError as exc:
            pending.reason = f"cannot read: {exc.strerror or exc}"
            self._warn_once(f"read:{unit}", "cannot read checkpoint %s: %s; will retry", unit, exc)
            return None
        if verdict.refused:
            self.drop(unit, "refused", verdict.refused)
            return None
        observed = _listing(unit) if verdict.unrecognised else verdict.files
        if self._observe(pending, observed + verdict.signals, now):
            pending.base = base_of(unit)
        held = pending.hold
        if held is not None and _identities(verdict.files) < _identities(held.files):
            return self._vanished(unit, pending, now)  # its writer is deleting it file by file
        if self._done.get(unit) == fingerprint(verdict.files):
            self.forget(unit)
            return None
        if _identities(verdict.files) < self._done_files.get(unit, frozenset()):
            log.debug("%s lost files since it was published: being deleted", unit)
            self.forget(unit)
            return None
        if not verdict.ready:
            return self._unfinished(unit, pending, verdict, now)
        pending.files, pending.conclusive = verdict.files, verdict.conclusive
        if not self._hold(unit, pending, verdict.files, now):
            return None
        settled = (
            verdict.committed
            or pending.renamed
            or self._closed_after_writing(pending, now)
            or self._settled(pending, now)
        )
        if not settled:
            reason = f"waiting for the files to stay unchanged for {self.watch.settle:g}s"
            if reason != pending.reason:
                log.debug("%s is whole; %s (no close evidence)", unit, reason)
            pending.reason = reason
            return None
        if not verdict.committed and self._part_still_written(pending):
            pending.reason = "one of this host's files is still open for writing"
            return None
        return self._finish(unit, pending, verdict.files, now)

    def _part_still_written(self, pending: _Candidate) -> bool:
        """A host's part of a multi-host save has no commit marker (but on the coordinator's
        host): besides the settle window, none of its files may be open for writing, where
        the kernel can tell (ckptd.writers; with inotify only: remote writers are invisible)."""
        if self.watch.distributed is None or not self.close_evidence:
            return False
        assert pending.base is not None
        return any(open_for_writing(pending.base / f.name) for f in pending.files)

    def _observe(self, pending: _Candidate, files: tuple[FileState, ...], now: float) -> bool:
        """Record what a check saw; True if anything changed since the last one."""
        seen = tuple((f.name, f.size, f.ino, f.mtime_ns) for f in files)
        if seen == pending.seen:
            pending.quiet += 1
            return False
        held = {f.ino for f in pending.hold.files} if pending.hold is not None else set()
        # ckptd's own hard link changes a held file's ctime: only a write's mtime counts then.
        pending.newest_ns = max(
            (f.mtime_ns if f.ino in held else max(f.mtime_ns, f.ctime_ns) for f in files),
            default=0,
        )
        pending.seen, pending.files, pending.stable_since = seen, files, now
        pending.ready_since, pending.quiet = None, 0
        return True

    def _hold(
        self, unit: Path, pending: _Candidate, files: tuple[FileState, ...], now: float
    ) -> bool:
        """Hold a whole candidate's files (again, if they changed); False to wait."""
        if pending.whole_since is None:
            pending.whole_since = now
        if self._holder is None:
            return True
        if pending.hold is not None:
            if _identities(pending.hold.files) == _identities(files):
                return True
            self._holder.release(pending.hold)
            pending.hold, pending.info = None, None
        assert pending.base is not None
        try:
            pending.hold = self._holder.take(pending.base, files)
        except FileNotFoundError:
            return False  # deleted while it was linked: the next check decides
        except OSError as exc:
            pending.reason = f"cannot hold it in {self._holder.staging}: {exc.strerror or exc}"
            self._warn_once(
                f"hold:{self._holder.staging}", "cannot hold checkpoint %s in %s: %s; "
                "it is snapshotted once finished instead", unit, self._holder.staging, exc,
            )  # fmt: skip
        except CheckpointChanged as exc:  # it is being written: look again soon, not in 1 s
            log.debug("%s: %s", unit, exc)
            pending.recheck_at = now + _CHANGED_RECHECK
            return False
        if pending.info is None:
            pending.info = self.fmt.info(unit)
        return True

    def _vanished(self, unit: Path, pending: _Candidate, now: float) -> ReadyCheckpoint | None:
        """The unit's name is gone: a held candidate is judged on its links, anything else
        that had files is dropped (deleted before it was whole)."""
        hold = pending.hold
        if hold is None or pending.info is None:
            if pending.files and unit not in self._done:
                self.drop(unit, "vanished", pending.reason)
            else:
                self.forget(unit)
            return None
        linked = hold.still_whole()
        if linked is None:
            self.drop(unit, "vanished", f"its hold in {hold.dest} was removed")
            return None
        self._observe(pending, linked, now)
        if not (self._closed_after_writing(pending, now) or self._settled(pending, now)):
            pending.reason = "deleted by its writer; its held files are settling"
            return None
        log.info("%s was deleted after it was whole; publishing the held files", unit)
        return self._finish(unit, pending, hold.files, now)

    def _unfinished(
        self, unit: Path, pending: _Candidate, verdict: Verdict, now: float
    ) -> ReadyCheckpoint | None:
        """Not whole by the format's rules: wait, and drop what stays empty, unknown or
        incomplete for too long."""
        if verdict.reason != pending.reason:
            log.debug("%s is not finished: %s", unit, verdict.reason)
        pending.reason = verdict.reason
        if UNREADABLE in verdict.reason:
            self._warn_once(f"read:{unit}", "checkpoint %s: %s; will retry", unit, verdict.reason)
        if pending.hold is not None:
            return None  # a rewrite in progress: the hold waits for the new content
        steady = self._settled(pending, now)
        files = pending.files
        if steady and files and all(f.size == 0 for f in files):
            self.drop(unit, "zero-bytes", f"{len(files)} file(s), all empty")
        elif steady and verdict.unrecognised and files:
            names = ", ".join(f.name for f in files[:3]) + (", ..." if len(files) > 3 else "")
            self.drop(unit, "unrecognised", f"holds {names}")
        elif now - pending.first_seen >= self.watch.incomplete_after:
            self.drop(unit, "incomplete", verdict.reason)
        return None

    def _finish(
        self, unit: Path, pending: _Candidate, files: tuple[FileState, ...], now: float
    ) -> ReadyCheckpoint | None:
        """Settled: read the sidecar (waiting for it where one is expected)."""
        if pending.ready_since is None:
            pending.ready_since = now
        if pending.hold is None or pending.info is None:  # a hold's info was read with it
            pending.info = self.fmt.info(unit)
        info = self._info(unit, pending, pending.info, now)
        if info is None:
            return None
        return self._ready(unit, pending, files, info)

    def _ready(
        self, unit: Path, pending: _Candidate, files: tuple[FileState, ...], info: CheckpointInfo
    ) -> ReadyCheckpoint:
        relpath = unit.relative_to(self.root).as_posix()
        base = pending.base if pending.base is not None else base_of(unit)
        fmt = self.fmt.name
        return ReadyCheckpoint(self.watch, unit, relpath, fmt, files, info, base, pending.hold)

    def _unchanged(self, unit: Path, known: str) -> bool:
        """Do the unit's files still have these identities? Stat calls only: the structural
        check, the sidecar and the journal are skipped for what is known. Anything else (a
        format that publishes fewer files than the unit holds, a prefix unit that is no
        file) is simply not a match and gets the full check."""
        try:
            return fingerprint(stat_files(unit)) == known
        except OSError:
            return False

    def _interval(self, pending: _Candidate) -> float:
        """How soon to look again: a fraction of `settle`, backing off while nothing changes
        for a candidate that is not whole (a hint brings it back at once)."""
        base = min(_MAX_RECHECK, max(0.05, self.watch.settle / 4))
        if pending.whole_since is not None or pending.quiet < 4:
            return base
        return min(_MAX_BACKOFF, base * 2.0 ** min(pending.quiet - 3, 10))

    def _closed_after_writing(self, pending: _Candidate, now: float) -> bool:
        """inotify's evidence that the unit is written: no file has been written since it
        was last closed, and each one either was seen closed or, the kernel says, is open
        for writing nowhere (ckptd.writers). The latter covers files written before the
        watch reached them (a new directory's first files, reported only as created). The
        polling observer has no such evidence (remote writers are invisible to local
        leases): there, and where the kernel will not say, `settle` decides."""
        if not (self.close_evidence and pending.conclusive and pending.files):
            return False
        assert pending.base is not None
        paths = [pending.base / f.name for f in pending.files]
        states = [pending.closed.get(str(path)) for path in paths]
        if False in states:
            log.debug("%s: written since its last close", paths[states.index(False)])
            return False
        for path, closed in zip(paths, states, strict=True):
            busy = open_for_writing(path)
            if busy and closed:
                # The close event comes before the kernel drops the file's write count: a
                # few microseconds in which a closed file still counts as open. Look again
                # soon rather than at the next re-check, which no event will bring forward.
                pending.recheck_at = min(pending.recheck_at, now + _CHANGED_RECHECK)
            if busy or (busy is None and not closed):
                log.debug("%s: no close evidence yet (closed %s, open for writing %s)",
                          path, closed, busy)  # fmt: skip
                return False
        return True

    def _settled(self, pending: _Candidate, now: float) -> bool:
        if now - pending.stable_since >= self.watch.settle:
            return True
        # Files untouched (by wall clock) for the settle window are settled too: this makes
        # checkpoints that were finished before ckptd started publishable at once.
        return now - pending.newest_ns / 1e9 >= self.watch.settle

    def _info(
        self, unit: Path, pending: _Candidate, base: CheckpointInfo, now: float
    ) -> CheckpointInfo | None:
        """Merge the name's, the framework's and the sidecar's information; None to wait."""
        try:
            found = sidecar.read(unit, self.root, flat_metadata=self.watch.sidecar.flat_metadata)
        except SidecarError as exc:
            self._warn_once(f"sidecar:{unit}:{exc}", "%s; publishing without its metrics", exc)
            return base
        if found is not None:
            self._expect_sidecar = True
            pending.found_sidecar = found
            data, path = found
            if data.get("ignored"):
                self._warn_once(
                    f"ignored:{path}", "%s: %s; left out of its metrics (it cannot compete "
                    "for best)", path, "; ".join(data["ignored"]),
                )  # fmt: skip
        found = found or pending.found_sidecar  # read before the framework deleted it
        if found is not None:
            return self._merge(base, found)
        if not self._wants_sidecar(base):
            return base
        assert pending.ready_since is not None
        waited = now - pending.ready_since
        if waited < self.watch.sidecar.wait:
            pending.reason = f"waiting up to {self.watch.sidecar.wait:g}s for a sidecar"
            return None
        if self.watch.sidecar.wait > 0:
            log.info(
                "no sidecar for %s after %.0fs; publishing with step %s from %s",
                unit, waited, base.step, base.source or "detection order",
            )  # fmt: skip
        return base

    def _wants_sidecar(self, base: CheckpointInfo) -> bool:
        """`sidecar.expect: auto` waits only where a sidecar is expected: the entry has had
        one before, or neither the name nor the framework gives the step."""
        expect = self.watch.sidecar.expect
        if expect != "auto":
            return expect == "always"
        return self._expect_sidecar or base.step is None

    @staticmethod
    def _merge(base: CheckpointInfo, found: tuple[dict[str, Any], Path] | None) -> CheckpointInfo:
        if found is None:
            return base
        data, path = found
        return CheckpointInfo(
            step=data.get("step", base.step),
            epoch=data.get("epoch", base.epoch),
            metrics={**base.metrics, **data["metrics"]},
            aliases=tuple(data["aliases"]),
            metadata=data["metadata"],
            run_path=data["run_path"],
            description=data["description"],
            source=str(path),
        )

    # -- directories no format recognises ------------------------------------------------

    def _unrecognised_unit(self, path: Path) -> Path | None:
        """With `format: auto`, a checkpoint-like file (one matching `patterns`) inside a
        top-level directory that no format claims makes that directory a candidate, so that
        it is reported instead of ignored."""
        if self.watch.format != "auto" or not self._checkpoint_like(path.name):
            return None
        try:
            parts = path.relative_to(self.root).parts
        except ValueError:
            return None
        if len(parts) < 2 or any(is_temp_name(part) for part in parts):
            return None
        return self.root / parts[0]

    def _unrecognised_dirs(self, claimed: set[Path]) -> list[Path]:
        """Top-level directories no format claims that directly hold checkpoint-like files."""
        if self.watch.format != "auto":
            return []
        found = []
        with os.scandir(self.root) as entries:
            dirs = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
        for name in sorted(dirs):
            entry = self.root / name
            if entry in claimed or is_temp_name(name):
                continue
            try:
                with os.scandir(entry) as inner:
                    if any(e.is_file() and self._checkpoint_like(e.name) for e in inner):
                        found.append(entry)
            except OSError:
                continue
        return found

    def _checkpoint_like(self, name: str) -> bool:
        return not is_temp_name(name) and any(
            fnmatch.fnmatch(name, pattern) for pattern in self.watch.patterns
        )

    # -- messages ----------------------------------------------------------------------------

    def _late_sidecar(self, path: Path) -> None:
        """Warn (once) when a sidecar lands after its checkpoint was queued without it."""
        base = path.name.removesuffix(sidecar.SUFFIX)
        owner = path.parent if path.name == sidecar.INSIDE else None
        for unit in self._done:
            ours = unit == owner or (unit.parent == path.parent and base in (unit.name, unit.stem))
            if ours and unit not in self._pending:
                self._warn_once(
                    f"late:{path}",
                    "sidecar %s arrived after %s was queued without it; its metrics and "
                    "aliases are not applied (write the sidecar before the checkpoint, or set "
                    "sidecar.expect: always)",
                    path, unit,
                )  # fmt: skip
                return

    def _skip_symlink(self, unit: Path) -> None:
        """A symlinked checkpoint (`last.ckpt -> epoch=3-step=1200.ckpt`) is published through
        its target, a candidate of its own; a target outside the watched root is refused."""
        target = Path(os.path.realpath(unit))
        root = Path(os.path.realpath(self.root))
        if not target.is_relative_to(root):
            self._warn_once(
                f"symlink:{unit}",
                "refusing %s: it is a symlink to %s, outside the watched root %s",
                unit, target, self.root,
            )  # fmt: skip
            return
        log.debug("%s links to %s inside the root; the target is published instead", unit, target)

    def _warn_once(self, key: str, message: str, *args: object) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        log.warning(message, *args)


def _exists(unit: Path) -> bool:
    return os.path.lexists(unit)


def _listing(unit: Path) -> tuple[FileState, ...]:
    """The files of a unit no format recognises, for stability and the drop's detail."""
    try:
        return stat_files(unit)
    except OSError:
        return ()


def _identities(files: tuple[FileState, ...]) -> frozenset[str]:
    return frozenset(f.identity for f in files)
