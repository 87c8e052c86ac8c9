"""Retention policy: which versions and local files to delete, and why. Pure, no I/O.

`plan(state, policy)` looks at one watch entry: the versions of its collection on W&B and
the checkpoints of its watched directory that the journal knows and that are still on disk.
It returns a `RetentionPlan` with one decision per version and per checkpoint, each with its
reason, keeps included (they make the `ckptd gc` table). The executor (`ckptd.retention.run`)
gathers the state, carries the deletions out and records them.

Remote rules (`retention.remote`), in the order they are checked; the first that keeps a
version is its reason:

1. A version without ckptd's metadata (no `step`) was not published by ckptd: kept.
2. A version linked to a registry (another collection), or queued for a promotion that has
   not landed yet (ckptd.promote), is kept.
3. A version holding an alias that matches a `protect` glob (fnmatch, case-sensitive) is kept.
4. A version holding an alias ckptd does not manage is kept. ckptd manages `latest`, the
   aliases its `templates` render (`step-{step}` matches `step-` followed by anything) and the
   aliases of its `best` rules; anything else (a sidecar's `candidate`, a `production` set by
   hand) is foreign. A `protect` entry starting with `!` releases foreign aliases that match
   the rest of it (`!candidate*`): those no longer keep a version by rule 4. A release never
   overrides rule 3: an alias matching both a plain entry and a `!` entry is protected.
5. Without `keep_last`, nothing is deleted.
6. The newest `keep_last` versions by step (ties: the later version) are kept.
7. With `keep_every: N`, the first version at or after each multiple of N steps is kept (the
   lowest step in each window [k*N, (k+1)*N)); versions are rarely saved at exact multiples.
8. Everything else is deleted, with its aliases (ckptd's own, or foreign ones released).

Rule 4 is how "never a version holding an alias outside the config's control unless
`protect` says so" reads: `protect` says so with a `!` entry.

`ttl` is set on each version as it is published and is not the planner's business.

Local rules (`retention.local`): nothing is deleted unless `delete_after_upload` is true or
`min_free` is set. Only a checkpoint that is published (journal state `aliased`) with a
committed version (a version number; a version published offline counts only with
`allow_offline: true`, for after `wandb sync`) and whose files on disk are still exactly the
ones published (same size and mtime; regular files, all inside the watched root) can be
deleted. Of those, the newest `keep_last` by step and every one whose version holds an alias
kept by remote rules 3 and 4 stay. The
rest are deleted at once with `delete_after_upload`; otherwise, only while the free space of
the checkpoint filesystem is under `min_free`, oldest step first, until the bytes freed would
lift it to `min_free`.
"""

from __future__ import annotations

import fnmatch
import functools
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from ckptd.config import (
    AliasConfig,
    LocalRetention,
    RemoteRetention,
    RetentionConfig,
    Size,
    WatchConfig,
)
from ckptd.sinks import RemoteVersion

__all__ = [
    "Decision",
    "LocalCheckpoint",
    "RetentionPlan",
    "RetentionPolicy",
    "RetentionState",
    "format_size",
    "journal_aliases",
    "plan",
]

_VERSION_ALIAS = re.compile(r"^v\d+$")


@dataclass(frozen=True)
class LocalCheckpoint:
    """A checkpoint of the watched directory, as local retention needs to see it."""

    checkpoint_id: int
    path: str  # relative to the watched root
    step: int
    state: str  # its journal state
    version: str | None  # None: not published, or published offline
    aliases: tuple[str, ...]  # the aliases its version holds now
    size: int
    problem: str | None = None  # why its files must not be touched (changed, outside the root)


@dataclass(frozen=True)
class RetentionState:
    """Everything the planner looks at for one watch entry.

    `remote` is None when the versions could not be listed; `remote_note` says why. Free and
    total bytes are of the filesystem holding the watched directory (None: unknown).
    """

    remote: tuple[RemoteVersion, ...] | None
    local: tuple[LocalCheckpoint, ...] = ()
    free_bytes: int | None = None
    total_bytes: int | None = None
    remote_note: str | None = None


@dataclass(frozen=True)
class RetentionPolicy:
    """The retention settings of one watch entry and the aliases ckptd manages for it."""

    remote: RemoteRetention
    local: LocalRetention
    aliases: AliasConfig

    @classmethod
    def for_watch(cls, watch: WatchConfig) -> RetentionPolicy:
        return cls(watch.retention.remote, watch.retention.local, watch.aliases)

    @property
    def local_enabled(self) -> bool:
        return self.local.delete_after_upload or self.local.min_free is not None

    def manages(self, alias: str) -> bool:
        """Is `alias` one that ckptd itself sets on this watch entry's versions?"""
        if alias == "latest" or any(alias == r.alias_name for r in self.aliases.best):
            return True
        return any(_template_regex(t).match(alias) for t in self.aliases.templates)

    def alias_keeps(self, alias: str) -> str | None:
        """Why holding `alias` keeps a version (remote rules 3 and 4), or None."""
        plain = [p for p in self.remote.protect if not p.startswith("!")]
        released = [p[1:] for p in self.remote.protect if p.startswith("!")]
        if any(fnmatch.fnmatchcase(alias, p) for p in plain):
            return f"holds protected alias {alias!r}"
        if not self.manages(alias) and not any(fnmatch.fnmatchcase(alias, p) for p in released):
            return f"holds alias {alias!r}, which ckptd does not manage"
        return None


@dataclass(frozen=True)
class Decision:
    """What happens to one version (`where="remote"`) or one checkpoint's files ("local")."""

    where: Literal["remote", "local"]
    action: Literal["keep", "delete"]
    reason: str
    version: str | None
    step: int | None
    aliases: tuple[str, ...]
    size: int
    path: str | None = None  # local: relative to the watched root
    checkpoint_id: int | None = None  # local: the journal row


@dataclass(frozen=True)
class RetentionPlan:
    """Every decision for one watch entry, remote first (by version), then local (by step)."""

    decisions: tuple[Decision, ...]
    notes: tuple[str, ...] = ()  # what was not planned and why (offline, listing failed)

    @property
    def deletions(self) -> tuple[Decision, ...]:
        return tuple(d for d in self.decisions if d.action == "delete")

    def table(self) -> str:
        """The plan as an aligned text table: version, step, aliases, size, action, reason."""
        header = ("WHERE", "VERSION", "STEP", "ALIASES", "SIZE", "ACTION", "REASON")
        rows = [header] + [
            (
                d.where if d.path is None else f"local:{d.path}",
                d.version or "-",
                "-" if d.step is None else str(d.step),
                ",".join(d.aliases) or "-",
                format_size(d.size),
                d.action,
                d.reason,
            )
            for d in self.decisions
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
        lines = [
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
            + "  "
            + row[-1]
            for row in rows
        ]
        return "\n".join([*lines, *(f"note: {note}" for note in self.notes)])


def plan(state: RetentionState, policy: RetentionPolicy) -> RetentionPlan:
    """Decide, for one watch entry, what to keep and what to delete; see the module rules."""
    notes = [] if state.remote_note is None else [state.remote_note]
    remote = [] if state.remote is None else _plan_remote(state.remote, policy)
    if policy.local_enabled:
        local = _plan_local(state, policy)
    else:
        local = []
        notes.append("local retention is off (no delete_after_upload, no min_free)")
    return RetentionPlan(tuple(remote + local), tuple(notes))


def _plan_remote(versions: Sequence[RemoteVersion], policy: RetentionPolicy) -> list[Decision]:
    rules = policy.remote
    ours = sorted(
        ((v.step, v.index, v) for v in versions if v.step is not None),
        key=lambda t: (t[0], t[1]),
        reverse=True,
    )
    newest = {v.version for _, _, v in ours[: rules.keep_last or 0]}
    firsts: dict[int, str] = {}  # window start -> the version that keeps it
    if rules.keep_every is not None:
        for step, _, v in reversed(ours):  # oldest first: the first one seen in a window stays
            firsts.setdefault(step // rules.keep_every * rules.keep_every, v.version)
    window_of = {version: start for start, version in firsts.items()}
    decisions = []
    for v in sorted(versions, key=lambda v: v.index):
        reason = _remote_keep_reason(v, policy, newest, window_of)
        action: Literal["keep", "delete"] = "keep"
        if reason is None:
            action, reason = "delete", f"older than the newest {rules.keep_last} by step"
        decisions.append(
            Decision("remote", action, reason, v.version, v.step, _shown(v.aliases), v.size)
        )
    return decisions


def _remote_keep_reason(
    v: RemoteVersion, policy: RetentionPolicy, newest: set[str], window_of: Mapping[str, int]
) -> str | None:
    rules = policy.remote
    if v.step is None:
        return "not published by ckptd (no step in its metadata)"
    if v.linked:
        return "linked to a registry"
    if v.promoting:
        return "queued for promotion"
    if (why := _alias_keeps(v.aliases, policy)) is not None:
        return why
    if rules.keep_last is None:
        return "keep_last is not set"
    if v.version in newest:
        return f"among the newest {rules.keep_last} by step"
    if v.version in window_of:
        return f"first at or after step {window_of[v.version]} (keep_every {rules.keep_every})"
    return None


def _plan_local(state: RetentionState, policy: RetentionPolicy) -> list[Decision]:
    rules = policy.local
    eligible = sorted(
        (c for c in state.local if _local_block(c, rules) is None), key=_by_step, reverse=True
    )
    newest = {c.checkpoint_id for c in eligible[: rules.keep_last]}
    candidates = [
        c
        for c in reversed(eligible)  # oldest first
        if c.checkpoint_id not in newest and _alias_keeps(c.aliases, policy) is None
    ]
    deleting: dict[int, str] = {}
    if rules.delete_after_upload:
        for c in candidates:
            deleting[c.checkpoint_id] = "published; delete_after_upload is on"
    elif rules.min_free is not None and state.free_bytes is not None:
        target = rules.min_free.resolve(state.total_bytes or 0)
        free = state.free_bytes
        for c in candidates:
            if free >= target:
                break
            deleting[c.checkpoint_id] = (
                f"free space {format_size(free)} is under min_free {format_size(target)}; "
                "oldest published first"
            )
            free += c.size
    decisions = []
    for c in sorted(state.local, key=_by_step):
        action: Literal["keep", "delete"] = "delete" if c.checkpoint_id in deleting else "keep"
        reason = deleting.get(c.checkpoint_id) or _local_keep_reason(
            c, state, policy, c.checkpoint_id in newest
        )
        shown = _shown(c.aliases)
        decisions.append(
            Decision(
                "local", action, reason, c.version, c.step, shown, c.size, c.path, c.checkpoint_id
            )
        )
    return decisions


def _local_block(c: LocalCheckpoint, rules: LocalRetention) -> str | None:
    """Why this checkpoint's files cannot be deleted whatever the space, or None."""
    if c.state != "aliased":
        return f"not published yet ({c.state})"
    if c.version is None and not rules.allow_offline:
        return "published offline only; allow_offline is false"
    return c.problem


def _local_keep_reason(
    c: LocalCheckpoint, state: RetentionState, policy: RetentionPolicy, newest: bool
) -> str:
    rules = policy.local
    if (why := _local_block(c, rules) or _alias_keeps(c.aliases, policy)) is not None:
        return why
    if newest:
        return f"among the newest {rules.keep_last} published"
    if rules.min_free is None:
        return "min_free is not set"
    if state.free_bytes is None:
        return "free space is unknown"
    target = rules.min_free.resolve(state.total_bytes or 0)
    if state.free_bytes < target:
        return f"deleting older checkpoints frees enough for min_free {format_size(target)}"
    return f"free space is enough for min_free {format_size(target)}"


def _alias_keeps(aliases: Iterable[str], policy: RetentionPolicy) -> str | None:
    for alias in _shown(aliases):
        if (why := policy.alias_keeps(alias)) is not None:
            return why
    return None


def journal_aliases(
    published: Iterable[tuple[int, int, tuple[str, ...]]],
    best_holders: Mapping[str, int],
) -> dict[int, tuple[str, ...]]:
    """The aliases each published checkpoint's version holds now, as far as the journal knows.

    `published` is (checkpoint id, step, aliases it was published with) for every published
    checkpoint of a collection; `best_holders` maps each best alias to its checkpoint id.
    `latest` is on the highest step (W&B puts it on the newest version even where ckptd does
    not); a best alias only on its holder; every other alias (templates, a sidecar's) is
    assumed still held, which can only keep more.
    """
    rows = list(published)
    top = max(rows, key=lambda r: (r[1], r[0]), default=None)
    best_aliases = set(best_holders)
    held: dict[int, tuple[str, ...]] = {}
    for row_id, _, aliases in rows:
        mine = [a for a in aliases if a != "latest" and a not in best_aliases]
        mine += [a for a, holder in best_holders.items() if holder == row_id]
        if top is not None and top[0] == row_id:
            mine.insert(0, "latest")
        held[row_id] = tuple(dict.fromkeys(mine))
    return held


def describe(retention: RetentionConfig) -> str:
    """A watch entry's effective retention in one line, for `ckptd check`."""
    remote = retention.remote
    if remote.keep_last is None:
        parts = ["W&B: keeps every version (retention.remote.keep_last is not set)"]
    else:
        kept = [f"the newest {remote.keep_last} by step"]
        if remote.keep_every is not None:
            kept.append(f"one in every {remote.keep_every} steps")
        if remote.protect:
            kept.append(f"aliases matching {', '.join(remote.protect)}")
        parts = [f"W&B: deletes versions except {'; '.join(kept)}"]
    if remote.ttl is not None:
        parts.append(f"each version expires after {remote.ttl:g}s")
    local = retention.local
    if local.delete_after_upload:
        parts.append(f"disk: deletes published checkpoints but the newest {local.keep_last}")
    elif local.min_free is not None:
        parts.append(
            f"disk: deletes the oldest published checkpoints while free space is under "
            f"{_size_text(local.min_free)} (keeps the newest {local.keep_last})"
        )
    else:
        parts.append("disk: deletes nothing")
    return "; ".join(parts)


def _size_text(size: Size) -> str:
    return f"{size.percent:g}%" if size.percent is not None else format_size(size.bytes or 0)


def format_size(size: int) -> str:
    """Bytes in binary units: `512 B`, `1.5 MiB`."""
    if size < 1024:
        return f"{size} B"
    value = size / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _by_step(c: LocalCheckpoint) -> tuple[int, int]:
    return (c.step, c.checkpoint_id)


def _shown(aliases: Iterable[str]) -> tuple[str, ...]:
    """Aliases without W&B's own version names (`v3`), which are not aliases one can hold."""
    return tuple(a for a in aliases if not _VERSION_ALIAS.match(a))


@functools.lru_cache(maxsize=256)
def _template_regex(template: str) -> re.Pattern[str]:
    """`step-{step}` -> `^step\\-.+$`: every field may render as anything non-empty."""
    parts = []
    for literal, field_name, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if field_name is not None:
            parts.append(".+")
    return re.compile("^" + "".join(parts) + "$", re.DOTALL)
