"""The journal: every checkpoint's state, durable in one SQLite database (WAL) in state_dir.

A checkpoint row moves `ready -> hashed -> published -> aliased`, or ends `superseded`
(deleted or replaced before it could be published, or identical to a published version) or
`failed` (with the reason). Progress lives here, never only in memory: after a crash the
daemon resumes every row that did not reach an end state.

Retention records everything it deletes in `deletions`: a version (`model:v3`), or the local
files of a checkpoint (with its row id; such a row is *retired* and keeps its `aliased` state,
since its version still exists).

Thread safety: one connection, guarded by `_lock`; every method is one short transaction.
Only one process may open a state_dir for writing (an exclusive flock on `ckptd.lock`): that
lock, not a per-row lease, is what keeps two daemons from publishing the same checkpoint.
Each state change is a typed method (`mark_hashed`, `retry_later`, `mark_published`, ...)
that checks the move against `TRANSITIONS`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ckptd import sidecar
from ckptd.checkpoint import FileState
from ckptd.errors import JournalError, NewerJournal, StateDirLocked
from ckptd.journal.rows import (
    MIGRATIONS,
    SCHEMA,
    SCHEMA_VERSION,
    STATES,
    TRANSITIONS,
    Deletion,
    Dropped,
    NewRow,
    PromotionRow,
    Row,
    decode,
    encode,
)  # fmt: skip

__all__ = [
    "MAX_STEP", "STATES", "Deletion", "Dropped", "Journal", "NewRow", "PromotionRow", "Row",
]  # fmt: skip


MAX_STEP = 2**63 - 1  # SQLite's INTEGER; sidecar and name parsing keep steps within it


def _migrate(db: sqlite3.Connection) -> None:
    """Bring a journal of any earlier schema version up to SCHEMA_VERSION, in one transaction."""
    db.execute("BEGIN IMMEDIATE")
    try:
        (recorded,) = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if int(recorded) > SCHEMA_VERSION:
            raise NewerJournal(
                f"the journal was written by a newer ckptd (schema {recorded}; this one knows "
                f"schema {SCHEMA_VERSION}): upgrade ckptd, or start it on a new state_dir"
            )
        for version in range(int(recorded) + 1, SCHEMA_VERSION + 1):
            db.execute(MIGRATIONS[version])
        db.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema_version'",
            (str(max(int(recorded), SCHEMA_VERSION)),),
        )
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


# A row that moved on: no failure of an earlier attempt is left on it.
_NO_FAILURE: dict[str, object] = {
    "attempts": 0, "next_attempt_at": 0, "first_failure_at": None, "last_error": None,
}  # fmt: skip


def _failure(error: str, attempts: int | None, first_failure_at: float | None) -> dict[str, object]:
    """The fields recording a failed attempt; what is not given stays as it is."""
    fields: dict[str, object] = {"last_error": error}
    if attempts is not None:
        fields["attempts"] = attempts
    if first_failure_at is not None:
        fields["first_failure_at"] = first_failure_at
    return fields


class Journal:
    """The durable state machine of every checkpoint of one state_dir."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / "journal.sqlite3"
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._lockfile: int | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def open(self, *, exclusive: bool = True) -> Journal:
        """Create or open the database. `exclusive` takes the state_dir lock (the daemon);
        readers such as `ckptd status` open without it."""
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            if exclusive:
                self._take_lock()
                if not self.path.exists():
                    # Created 0600 before SQLite opens it, and never opened again: closing
                    # any descriptor of the file would drop SQLite's POSIX locks on it.
                    os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
                self._restrict()
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA busy_timeout = 5000")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")
            db.executescript(SCHEMA)
            db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', '1')")
            _migrate(db)
        except NewerJournal as exc:
            self.close()
            raise NewerJournal(f"{self.path}: {exc}") from None
        except sqlite3.Error as exc:
            self.close()
            raise JournalError(f"{self.path}: cannot open the journal: {exc}") from None
        except OSError as exc:
            self.close()
            raise JournalError(
                f"{self.state_dir}: cannot use the state directory: {exc.strerror or exc}"
            ) from None
        self._db = db
        if exclusive:
            self._restrict()  # the -wal and -shm files exist now
        return self

    def _restrict(self) -> None:
        """The state directory 0700 and the journal's files 0600, whatever the umask: they
        name every checkpoint, its metrics and the project (never the key, which they do not
        hold). SQLite gives -wal and -shm the database file's mode. chmod only: no open."""
        modes = {self.state_dir: 0o700, self.path: 0o600}
        modes.update({Path(f"{self.path}{end}"): 0o600 for end in ("-wal", "-shm")})
        for path, mode in modes.items():
            # Missing (-wal before the first write) or not ours (a shared directory an
            # administrator set up): leave it as it is.
            with contextlib.suppress(FileNotFoundError, PermissionError):
                path.chmod(mode)

    @property
    def is_open(self) -> bool:
        return self._db is not None

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._lockfile is not None:
            os.close(self._lockfile)
            self._lockfile = None

    def __enter__(self) -> Journal:
        """`with Journal(d):` opens it exclusively; `with Journal(d).open(exclusive=False):`
        keeps the reader's open."""
        return self if self.is_open else self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _take_lock(self) -> None:
        fd = os.open(self.state_dir / "ckptd.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise StateDirLocked(
                f"{self.state_dir} is in use by ckptd {holder}; two daemons cannot share a "
                "state_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        self._lockfile = fd

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        if self._db is None:
            raise JournalError(f"{self.path}: the journal is not open")
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise JournalError(f"{self.path}: {exc}") from None

    # -- writing ----------------------------------------------------------------------

    def add(self, new: NewRow, now: float) -> int | None:
        """Record a finished checkpoint as `ready`; None if this exact one is known already.

        A checkpoint without a step gets the next one after the collection's highest, so
        that detection order stands in for it.
        """
        collection, step = new.collection, new.step
        with self._tx() as db:
            if step is None:
                (highest,) = db.execute(
                    "SELECT MAX(step) FROM checkpoints WHERE collection = ?", (collection,)
                ).fetchone()
                # The highest step the journal holds stays the highest (it cannot grow).
                step = 0 if highest is None else min(highest + 1, MAX_STEP)
            cursor = db.execute(
                "INSERT OR IGNORE INTO checkpoints (collection, watch_path, relpath, "
                "fingerprint, format, step, state, files, info, snapshot, detected_at, "
                "updated_at) VALUES (?, ?, ?, ?, ?, ?, 'ready', ?, ?, ?, ?, ?)",
                (
                    collection, str(new.watch_path), new.relpath, new.fingerprint, new.format,
                    step, json.dumps([f.to_json() for f in new.files]),
                    json.dumps(new.info.to_json()),
                    None if new.snapshot is None else str(new.snapshot), now, now,
                ),
            )  # fmt: skip
            return cursor.lastrowid if cursor.rowcount else None

    def known(self, collection: str, watch_path: Path, relpath: str, fingerprint: str) -> bool:
        """Is this exact checkpoint (same files, same identities) already recorded?"""
        return bool(
            self._query(
                "SELECT 1 FROM checkpoints WHERE collection = ? AND watch_path = ? AND "
                "relpath = ? AND fingerprint = ?",
                (collection, str(watch_path), relpath, fingerprint),
            )
        )

    def recorded_files(self, collection: str, watch_path: Path) -> dict[str, tuple[FileState, ...]]:
        """Each checkpoint path of a watch entry the journal has a row for, with the files
        of its newest row: what the detector may skip at start-up without reading it."""
        rows = self._query(
            "SELECT relpath, files FROM checkpoints WHERE id IN (SELECT MAX(id) FROM "
            "checkpoints WHERE collection = ? AND watch_path = ? GROUP BY relpath)",
            (collection, str(watch_path)),
        )
        return {
            r["relpath"]: tuple(FileState.from_json(f) for f in json.loads(r["files"]))
            for r in rows
        }

    def had_sidecar(self, collection: str, watch_path: Path) -> bool:
        """Has any checkpoint of this watch entry come with a sidecar (`*metrics.json`)?"""
        return bool(
            self._query(
                "SELECT 1 FROM checkpoints WHERE collection = ? AND watch_path = ? AND "
                "json_extract(info, '$.source') LIKE ? LIMIT 1",
                (collection, str(watch_path), f"%{sidecar.INSIDE}"),
            )
        )

    def mark_hashed(self, row_id: int, now: float, *, md5s: Mapping[str, str], digest: str) -> Row:
        """`ready -> hashed`: every file's md5 and the content digest they make."""
        return self._move(row_id, "hashed", now, md5s=dict(md5s), digest=digest, **_NO_FAILURE)

    def retry_later(
        self,
        row_id: int,
        now: float,
        *,
        at: float,
        error: str,
        attempts: int | None = None,
        first_failure_at: float | None = None,
    ) -> None:
        """Keep the row in its state and try it again at `at`, recording why."""
        fields = _failure(error, attempts, first_failure_at)
        self._move(row_id, None, now, next_attempt_at=at, **fields)

    def mark_upserted(self, row_id: int, now: float) -> Row:
        """`hashed -> upserted`: this host's part of a multi-host version landed at `now`;
        the version waits for the other hosts' parts and the finisher's commit."""
        return self._move(row_id, "upserted", now, part_at=now, **_NO_FAILURE)

    def supersede(self, row_id: int, now: float, reason: str) -> None:
        """The row will never be published: replaced, deleted, or the same content as a
        version. An end state."""
        self._move(row_id, "superseded", now, last_error=reason)

    def fail(
        self,
        row_id: int,
        now: float,
        error: str,
        *,
        attempts: int | None = None,
        first_failure_at: float | None = None,
    ) -> None:
        """The row ends `failed` with `error` (its snapshot is the caller's to keep or drop)."""
        fields = _failure(error, attempts, first_failure_at)
        self._move(row_id, "failed", now, **fields)

    def mark_aliased(self, row_id: int, now: float) -> Row:
        """`published -> aliased`: its aliases are where they belong; nothing is left to do."""
        return self._move(row_id, "aliased", now)

    def _move(self, row_id: int, to: str | None, now: float, **fields: object) -> Row:
        with self._tx() as db:
            return self._transition(db, row_id, to, now, fields)

    def _transition(
        self,
        db: sqlite3.Connection,
        row_id: int,
        to: str | None,
        now: float,
        fields: Mapping[str, object],
    ) -> Row:
        """Set `fields` and move to state `to` (None: stay); refuse moves the machine forbids."""
        current = db.execute("SELECT state FROM checkpoints WHERE id = ?", (row_id,)).fetchone()
        if current is None:
            raise JournalError(f"{self.path}: no checkpoint #{row_id}")
        state = current["state"] if to is None else to
        if to is not None and to not in TRANSITIONS[current["state"]]:
            raise JournalError(
                f"{self.path}: checkpoint #{row_id} cannot go from {current['state']} to {to}"
            )
        encoded = {key: encode(key, value) for key, value in fields.items()}
        assignments = "".join(f", {key} = ?" for key in encoded)
        db.execute(
            f"UPDATE checkpoints SET state = ?, updated_at = ?{assignments} WHERE id = ?",
            (state, now, *encoded.values(), row_id),
        )
        return decode(db.execute("SELECT * FROM checkpoints WHERE id = ?", (row_id,)).fetchone())

    def mark_published(
        self,
        row_id: int,
        now: float,
        *,
        version: str | None,
        aliases: Iterable[str],
        best: Mapping[str, float],
        durable: bool = True,
        promotions: Iterable[tuple[str, tuple[str, ...]]] = (),
    ) -> Row:
        """`hashed -> published` and the best aliases it won, in one transaction: a crash
        can never leave a published version whose best-so-far value was not recorded.
        `durable=False`: the sink logged it but cannot vouch for it yet (W&B offline).
        `promotions` ((target, aliases) the version's aliases fired) are queued with it, so
        that a crash between publish and promotion still promotes it once."""
        fields: dict[str, object] = {
            "version": version, "aliases": tuple(aliases), "last_error": None,
            "next_attempt_at": 0, "durable": int(durable),
        }  # fmt: skip
        with self._tx() as db:
            row = self._transition(db, row_id, "published", now, fields)
            for alias, value in best.items():
                db.execute(
                    "INSERT INTO best VALUES (?, ?, ?, ?) ON CONFLICT (collection, alias) "
                    "DO UPDATE SET checkpoint_id = excluded.checkpoint_id, value = excluded.value",
                    (row.collection, alias, row_id, value),
                )
            if version is not None:
                for target, target_aliases in promotions:
                    self._queue_promotion(db, row, version, target, target_aliases, now)
        return row

    def confirm(self, row_id: int, now: float) -> None:
        """The sink now vouches for a published row's version: it is durable."""
        with self._tx() as db:
            db.execute(
                "UPDATE checkpoints SET durable = 1, updated_at = ? WHERE id = ?", (now, row_id)
            )

    def seed_best(self, collection: str, alias: str, value: float) -> None:
        """Record a best alias's value learnt from W&B (a fresh journal on a new host); it
        never overrides a value this journal already holds."""
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO best VALUES (?, ?, ?, ?)", (collection, alias, -1, value)
            )

    def park(self, collection: str, reason: str, now: float) -> None:
        """Stop publishing `collection` after a permanent error; its queue is kept."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO parked VALUES (?, ?, ?) ON CONFLICT (collection) "
                "DO UPDATE SET reason = excluded.reason",
                (collection, reason, now),
            )

    def unpark(self, collection: str | None = None) -> None:
        """Let a parked collection (or every one) try again."""
        with self._tx() as db:
            if collection is None:
                db.execute("DELETE FROM parked")
            else:
                db.execute("DELETE FROM parked WHERE collection = ?", (collection,))

    def record_deletion(
        self,
        collection: str,
        target: str,
        reason: str,
        now: float,
        *,
        checkpoint_id: int | None = None,
    ) -> None:
        """Record that retention deleted `target`; with `checkpoint_id`, that checkpoint's
        local files are gone (the row is retired)."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO deletions (collection, target, reason, at, checkpoint_id) "
                "VALUES (?, ?, ?, ?, ?)",
                (collection, target, reason, now, checkpoint_id),
            )

    def record_drop(self, collection: str, path: str, reason: str, detail: str, now: float) -> None:
        """Record that the candidate at `path` will not be published, and why (ckptd.drops)."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO dropped VALUES (?, ?, ?, ?, ?) ON CONFLICT (collection, path, "
                "reason) DO UPDATE SET detail = excluded.detail, at = excluded.at",
                (collection, path, reason, detail, now),
            )

    def clear_drops(self, collection: str, path: str) -> None:
        """The candidate at `path` was queued after all: its drops no longer stand."""
        with self._tx() as db:
            db.execute("DELETE FROM dropped WHERE collection = ? AND path = ?", (collection, path))

    # -- promotions (ckptd.promote) ---------------------------------------------------

    def queue_promotion(
        self, checkpoint_id: int, target: str, aliases: tuple[str, ...], now: float
    ) -> bool:
        """Queue the promotion of a published checkpoint's version to `target`; False if
        that version was queued for that target before (a rule fires once per version)."""
        with self._tx() as db:
            found = db.execute("SELECT * FROM checkpoints WHERE id = ?", (checkpoint_id,))
            row = decode(found.fetchone())
            if row.version is None:
                raise JournalError(f"{self.path}: checkpoint #{checkpoint_id} has no version")
            return self._queue_promotion(db, row, row.version, target, aliases, now)

    def _queue_promotion(
        self,
        db: sqlite3.Connection,
        row: Row,
        version: str,
        target: str,
        aliases: tuple[str, ...],
        now: float,
    ) -> bool:
        cursor = db.execute(
            "INSERT OR IGNORE INTO promotions (checkpoint_id, collection, version, step, "
            "target, aliases, state, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
            (row.id, row.collection, version, row.step, target, json.dumps(list(aliases)),
             now, now),
        )  # fmt: skip
        return bool(cursor.rowcount)

    def promotions(
        self, states: Iterable[str] = ("pending", "done", "failed")
    ) -> list[PromotionRow]:
        """Promotions in the given states, oldest first."""
        wanted = tuple(states)
        marks = ", ".join("?" for _ in wanted)
        rows = self._query(f"SELECT * FROM promotions WHERE state IN ({marks}) ORDER BY id", wanted)
        return [PromotionRow.decode(r) for r in rows]

    def update_promotion(self, promotion_id: int, now: float, **fields: Any) -> None:
        """Set fields of a promotion (`state`, retry bookkeeping, `result`)."""
        assignments = ", ".join(f"{key} = ?" for key in fields)
        with self._tx() as db:
            db.execute(
                f"UPDATE promotions SET updated_at = ?, {assignments} WHERE id = ?",
                (now, *fields.values(), promotion_id),
            )

    # -- reading ----------------------------------------------------------------------

    def drops(self, collection: str | None = None, since: float = 0.0) -> list[Dropped]:
        """Candidates seen and not published (at or after `since`), oldest first."""
        sql = "SELECT collection, path, reason, detail, at FROM dropped WHERE at >= ?"
        args: tuple[Any, ...] = (since,)
        if collection is not None:
            sql, args = sql + " AND collection = ?", (since, collection)
        return [Dropped(*r) for r in self._query(sql + " ORDER BY at, path", args)]

    def parked(self) -> dict[str, tuple[str, float]]:
        """Each parked collection: (reason, since)."""
        rows = self._query("SELECT collection, reason, since FROM parked", ())
        return {r["collection"]: (r["reason"], r["since"]) for r in rows}

    def get(self, row_id: int) -> Row:
        rows = self._query("SELECT * FROM checkpoints WHERE id = ?", (row_id,))
        if not rows:
            raise JournalError(f"{self.path}: no checkpoint #{row_id}")
        return decode(rows[0])

    def rows(self, collection: str | None = None, states: Iterable[str] = STATES) -> list[Row]:
        """Rows in the given states, by collection then step then id."""
        wanted = tuple(states)
        marks = ", ".join("?" for _ in wanted)
        sql = f"SELECT * FROM checkpoints WHERE state IN ({marks})"
        args: tuple[Any, ...] = wanted
        if collection is not None:
            sql += " AND collection = ?"
            args = (*wanted, collection)
        return [decode(r) for r in self._query(sql + " ORDER BY collection, step, id", args)]

    def unconfirmed(self) -> list[Row]:
        """Published rows whose versions the sink has not confirmed durable, by step."""
        return [
            decode(r)
            for r in self._query(
                "SELECT * FROM checkpoints WHERE durable = 0 AND state IN ('published', "
                "'aliased') ORDER BY collection, step, id",
                (),
            )
        ]

    def count(self, states: Iterable[str]) -> int:
        """How many rows are in the given states."""
        wanted = tuple(states)
        marks = ", ".join("?" for _ in wanted)
        rows = self._query(f"SELECT COUNT(*) FROM checkpoints WHERE state IN ({marks})", wanted)
        return int(rows[0][0])

    def last_published(self) -> Row | None:
        """The row published most recently, of any collection."""
        rows = self._query(
            # `+state`: walk checkpoints_by_update from the newest row, not every published one
            "SELECT * FROM checkpoints WHERE +state IN ('published', 'aliased') "
            "ORDER BY updated_at DESC, id DESC LIMIT 1",
            (),
        )
        return decode(rows[0]) if rows else None

    def best(self, collection: str) -> dict[str, tuple[int, float]]:
        """Each best alias of a collection: (checkpoint id, metric value)."""
        rows = self._query(
            "SELECT alias, checkpoint_id, value FROM best WHERE collection = ?", (collection,)
        )
        return {r["alias"]: (r["checkpoint_id"], r["value"]) for r in rows}

    def deletions(self, collection: str | None = None) -> list[Deletion]:
        """What retention deleted, oldest first."""
        sql = "SELECT collection, target, reason, at, checkpoint_id FROM deletions"
        args: tuple[Any, ...] = ()
        if collection is not None:
            sql, args = sql + " WHERE collection = ?", (collection,)
        return [Deletion(*r) for r in self._query(sql + " ORDER BY id", args)]

    def retired(self, collection: str) -> set[int]:
        """Ids of the checkpoints of `collection` whose local files retention deleted."""
        rows = self._query(
            "SELECT checkpoint_id FROM deletions WHERE collection = ? AND "
            "checkpoint_id IS NOT NULL",
            (collection,),
        )
        return {r["checkpoint_id"] for r in rows}

    def _query(self, sql: str, args: tuple[Any, ...]) -> list[sqlite3.Row]:
        if self._db is None:
            raise JournalError(f"{self.path}: the journal is not open")
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise JournalError(f"{self.path}: {exc}") from None
