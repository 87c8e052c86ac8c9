"""The detector: turns watcher hints and scans into finished checkpoints, one watch entry each.

Only the service's coordinator thread calls a Detector. Its state is in memory on purpose:
after a restart the start-up scan finds every candidate again and the settle window simply
starts over; what was already published is recognised by the journal, not here.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ckptd import sidecar
from ckptd.checkpoint import CheckpointInfo, FileState, stat_files
from ckptd.config import WatchConfig
from ckptd.drops import Drop
from ckptd.errors import SidecarError
from ckptd.formats import CheckpointFormat, format_for
from ckptd.formats.checks import UNREADABLE
from ckptd.inputs import name_problem, printable

__all__ = ["Detector", "ReadyCheckpoint"]

log = logging.getLogger(__name__)

_MAX_RECHECK = 1.0  # seconds between re-checks of a pending candidate with no events


@dataclass(frozen=True)
class ReadyCheckpoint:
    """A finished checkpoint, as the detector saw it; the service snapshots and journals it."""

    watch: WatchConfig
    unit: Path
    relpath: str
    format: str
    files: tuple[FileState, ...]
    info: CheckpointInfo

    @property
    def base(self) -> Path:
        """The directory the files' names are relative to: the unit itself for a directory
        checkpoint, its parent for a file (or a TensorFlow-style prefix of files)."""
        return self.unit if self.unit.is_dir() else self.unit.parent

    @property
    def fingerprint(self) -> str:
        """The files' identities; a rewrite of any file changes it."""
        return _fingerprint(self.files)


@dataclass
class _Pending:
    first_seen: float
    recheck_at: float
    files: tuple[FileState, ...] = ()
    stable_since: float = 0.0
    renamed: bool = False
    ready_since: float | None = None
    reason: str = "not checked yet"


@dataclass
class Detector:
    """Finds finished checkpoints under one watched root."""

    watch: WatchConfig
    fmt: CheckpointFormat = field(init=False)
    _pending: dict[Path, _Pending] = field(default_factory=dict, init=False)
    _done: dict[Path, str] = field(default_factory=dict, init=False)
    _done_files: dict[Path, frozenset[str]] = field(default_factory=dict, init=False)
    _warned: set[str] = field(default_factory=set, init=False)
    _drops: list[Drop] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.fmt = format_for(self.watch)

    @property
    def root(self) -> Path:
        return self.watch.path

    # -- inputs ---------------------------------------------------------------------------

    def hint(self, path: Path, now: float, *, moved_in: bool = False) -> None:
        """A watcher event touched `path`; re-check the checkpoint it belongs to, soon."""
        if path.name.endswith(sidecar.SUFFIX) or path.name == "metrics.json":
            for pending in self._pending.values():
                pending.recheck_at = now
            self._late_sidecar(path)
            return
        unit = self.fmt.unit_for(self.root, path)
        if unit is None:
            return
        pending = self._pending.setdefault(unit, _Pending(first_seen=now, recheck_at=now))
        pending.recheck_at = now
        # A rename into place is a commit signal for the unit renamed; any later write
        # event withdraws it (the detector then falls back to the settle window). The
        # moves watchdog synthesizes for a renamed directory's contents keep it.
        if path == unit:
            pending.renamed = moved_in
        elif not moved_in:
            pending.renamed = False

    def scan(self, now: float) -> int:
        """Walk the root for candidates (start-up, rescans, after an overflow); count them."""
        found = 0
        try:
            units = list(self.fmt.scan(self.root))
        except FileNotFoundError:
            self._warn_once(
                f"missing:{self.root}", "watched directory %s does not exist", self.root
            )
            return 0
        for unit in units:
            found += 1
            if unit not in self._pending:
                self._pending[unit] = _Pending(first_seen=now, recheck_at=now)
        return found

    def take_drops(self) -> list[Drop]:
        """The candidates given up since the last call, for the coordinator to record."""
        drops, self._drops = self._drops, []
        return drops

    def drop(self, unit: Path, reason: str, detail: str = "") -> None:
        """Give up on `unit`: it will not be published (ckptd.drops says why it matters)."""
        self.forget(unit)
        self._drops.append(Drop(self.watch.artifact, unit, reason, detail))

    def forget(self, unit: Path) -> None:
        """Stop tracking `unit` (published, superseded or refused)."""
        self._pending.pop(unit, None)

    def mark_done(self, ready: ReadyCheckpoint) -> None:
        """`ready` is in the journal; ignore the unit until its files change."""
        self.remember(ready.relpath, ready.files)

    def remember(self, relpath: str, files: tuple[FileState, ...]) -> None:
        """The checkpoint at `relpath` with these files is in the journal: ignore the unit
        until they change. At start-up this spares re-reading every known checkpoint."""
        unit = self.root / relpath
        self._done[unit] = _fingerprint(files)
        self._done_files[unit] = _identities(files)
        self._pending.pop(unit, None)

    # -- the single step --------------------------------------------------------------------

    def poll(self, now: float) -> list[ReadyCheckpoint]:
        """Re-check every candidate that is due; return those that are finished."""
        ready = []
        for unit, pending in list(self._pending.items()):
            if pending.recheck_at > now:
                continue
            try:
                result = self._evaluate(unit, pending, now)
            except Exception as exc:  # one bad candidate must never stop the others
                log.debug("evaluating %s failed", printable(unit), exc_info=True)
                self.drop(unit, "crashed", f"{type(exc).__name__}: {exc}")
                continue
            if result is not None:
                ready.append(result)
        return ready

    def next_due(self) -> float:
        """The earliest time a pending candidate needs another look (inf when none)."""
        return min((p.recheck_at for p in self._pending.values()), default=math.inf)

    def pending(self) -> dict[Path, str]:
        """Each candidate not yet finished, with the reason."""
        return {unit: p.reason for unit, p in self._pending.items()}

    def _evaluate(self, unit: Path, pending: _Pending, now: float) -> ReadyCheckpoint | None:
        pending.recheck_at = now + min(_MAX_RECHECK, max(0.05, self.watch.settle / 4))
        if (bad_name := name_problem(unit, self.root)) is not None:
            self.drop(unit, "refused", bad_name)
            return None
        if unit.is_symlink():
            self._skip_symlink(unit)
            self.forget(unit)
            return None
        if unit in self._done and self._unchanged(unit):
            self.forget(unit)
            return None
        try:
            verdict = self.fmt.check(unit)
        except FileNotFoundError:
            log.debug("candidate %s vanished before it was finished", unit)
            self.forget(unit)
            return None
        except OSError as exc:
            pending.reason = f"cannot read: {exc.strerror or exc}"
            self._warn_once(f"read:{unit}", "cannot read checkpoint %s: %s; will retry", unit, exc)
            return None
        if verdict.refused:
            self.drop(unit, "refused", verdict.refused)
            return None
        observed = verdict.files + verdict.signals  # trackers restart the window too
        if observed != pending.files:
            pending.files, pending.stable_since = observed, now
            pending.ready_since = None
        if self._done.get(unit) == _fingerprint(verdict.files):
            self.forget(unit)
            return None
        if _identities(verdict.files) < self._done_files.get(unit, frozenset()):
            log.debug("%s lost files since it was published: being deleted", unit)
            self.forget(unit)
            return None
        if not verdict.ready:
            pending.reason = verdict.reason
            if UNREADABLE in verdict.reason:
                self._warn_once(
                    f"read:{unit}", "checkpoint %s: %s; will retry", unit, verdict.reason
                )
            return None
        settled = verdict.committed or pending.renamed or self._settled(pending, now)
        if not settled:
            pending.reason = f"waiting for the files to stay unchanged for {self.watch.settle:g}s"
            return None
        if pending.ready_since is None:
            pending.ready_since = now
        info = self._info(unit, pending, now)
        if info is None:
            return None
        relpath = unit.relative_to(self.root).as_posix()
        return ReadyCheckpoint(self.watch, unit, relpath, self.fmt.name, verdict.files, info)

    def _unchanged(self, unit: Path) -> bool:
        """Do the unit's files still have the identities recorded as done? Stat calls only:
        the structural check, the sidecar and the journal are skipped for what is known.
        Anything else (a format that publishes fewer files than the unit holds, a prefix
        unit that is no file) is simply not a match and gets the full check."""
        try:
            return _fingerprint(stat_files(unit)) == self._done[unit]
        except OSError:
            return False

    def _settled(self, pending: _Pending, now: float) -> bool:
        if now - pending.stable_since >= self.watch.settle:
            return True
        # Files untouched (by wall clock) for the settle window are settled too: this makes
        # checkpoints that were finished before ckptd started publishable at once.
        newest = max((max(f.mtime_ns, f.ctime_ns) for f in pending.files), default=0)
        return now - newest / 1e9 >= self.watch.settle

    def _info(self, unit: Path, pending: _Pending, now: float) -> CheckpointInfo | None:
        """Merge the name's, the framework's and the sidecar's information; None to wait."""
        base = self.fmt.info(unit)
        try:
            found = sidecar.read(unit, self.root, flat_metadata=self.watch.sidecar.flat_metadata)
        except SidecarError as exc:
            self._warn_once(f"sidecar:{unit}:{exc}", "%s; publishing without its metrics", exc)
            return base
        if found is None:
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

    def _late_sidecar(self, path: Path) -> None:
        """Warn (once) when a sidecar lands after its checkpoint was queued without it."""
        base = path.name.removesuffix(sidecar.SUFFIX)
        owner = path.parent if path.name == "metrics.json" else None
        for unit in self._done:
            ours = unit == owner or (unit.parent == path.parent and base in (unit.name, unit.stem))
            if ours and unit not in self._pending:
                self._warn_once(
                    f"late:{path}",
                    "sidecar %s arrived after %s was queued without it (sidecar.wait is %gs); "
                    "its metrics and aliases are not applied",
                    path, unit, self.watch.sidecar.wait,
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


def _identities(files: tuple[FileState, ...]) -> frozenset[str]:
    return frozenset(f"{f.name}:{f.size}:{f.ino}:{f.mtime_ns}" for f in files)


def _fingerprint(files: tuple[FileState, ...]) -> str:
    # ctime is left out: ckptd's own hard-link snapshot changes it (the link count is part
    # of the inode), and every real rewrite changes mtime or the inode anyway.
    return ";".join(f"{f.name}:{f.size}:{f.ino}:{f.mtime_ns}" for f in files)
