"""What a journal row is: the states a checkpoint goes through, the transitions allowed
between them, the database schema, and how a row is stored and read back.

`ckptd.journal` is the only module that talks to the database; this one has no I/O.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptd.checkpoint import CheckpointInfo, FileState

__all__ = [
    "MIGRATIONS",
    "SCHEMA",
    "SCHEMA_VERSION",
    "STATES",
    "TRANSITIONS",
    "Deletion",
    "Dropped",
    "NewRow",
    "PromotionRow",
    "Row",
    "decode",
    "encode",
]

STATES = ("ready", "hashed", "upserted", "published", "aliased", "superseded", "failed")
TRANSITIONS = {
    "ready": {"hashed", "superseded", "failed"},
    "hashed": {"published", "upserted", "ready", "superseded", "failed"},
    # A multi-host entry: this host's part is in W&B's distributed version, which the
    # finisher commits once every host's part is (ckptd.multihost).
    "upserted": {"published", "superseded", "failed"},
    "published": {"aliased"},
    "aliased": set(),
    "superseded": set(),
    "failed": {"ready"},
}
SCHEMA_VERSION = 4
# Each version's change to the one before it; SCHEMA itself stays the version-1 tables, so an
# existing journal and a new one go through the same steps.
MIGRATIONS = {
    # 2: an offline publish is "recorded, unconfirmed" (0) until ckptd has read its record
    # back from an offline run file; every earlier row counts as durable.
    2: "ALTER TABLE checkpoints ADD COLUMN durable INTEGER NOT NULL DEFAULT 1",
    # 3: multi-host entries: when this host's part landed in the distributed version (the
    # finisher's timeout counts from it); rows may now be in state `upserted`.
    3: "ALTER TABLE checkpoints ADD COLUMN part_at REAL",
    # 4: promotions (ckptd.promote): one row per version and target, `pending` until the
    # target holds it (`done`), or `failed` once retrying gave up.
    4: """CREATE TABLE IF NOT EXISTS promotions (
        id INTEGER PRIMARY KEY,
        checkpoint_id INTEGER NOT NULL,
        collection TEXT NOT NULL,
        version TEXT NOT NULL,
        step INTEGER NOT NULL,
        target TEXT NOT NULL,
        aliases TEXT NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL DEFAULT 0,
        first_failure_at REAL,
        last_error TEXT,
        result TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        UNIQUE (checkpoint_id, target)
    )""",
}
SCHEMA = """
CREATE TABLE IF NOT EXISTS checkpoints (
    id INTEGER PRIMARY KEY,
    collection TEXT NOT NULL,
    watch_path TEXT NOT NULL,
    relpath TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    format TEXT NOT NULL,
    step INTEGER NOT NULL,
    state TEXT NOT NULL,
    files TEXT NOT NULL,
    info TEXT NOT NULL,
    snapshot TEXT,
    md5s TEXT,
    digest TEXT,
    version TEXT,
    aliases TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    first_failure_at REAL,
    last_error TEXT,
    lease_owner TEXT,  -- unused since 0.1 (the state_dir lock is the guard); kept for old journals
    lease_expires REAL,  -- unused, as lease_owner
    detected_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    UNIQUE (collection, watch_path, relpath, fingerprint)
);
CREATE INDEX IF NOT EXISTS checkpoints_by_state ON checkpoints (collection, state, step);
-- The coordinator asks every second for the live rows of all collections and for the last
-- publish: without these, each question scans every row ever recorded.
CREATE INDEX IF NOT EXISTS checkpoints_live ON checkpoints (state, collection, step);
CREATE INDEX IF NOT EXISTS checkpoints_by_update ON checkpoints (updated_at, id);
CREATE TABLE IF NOT EXISTS best (
    collection TEXT NOT NULL,
    alias TEXT NOT NULL,
    checkpoint_id INTEGER NOT NULL,
    value REAL NOT NULL,
    PRIMARY KEY (collection, alias)
);
CREATE TABLE IF NOT EXISTS parked (
    collection TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    since REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS deletions (
    id INTEGER PRIMARY KEY,
    collection TEXT NOT NULL,
    target TEXT NOT NULL,
    reason TEXT NOT NULL,
    at REAL NOT NULL,
    checkpoint_id INTEGER
);
CREATE INDEX IF NOT EXISTS deletions_by_checkpoint ON deletions (checkpoint_id);
-- Candidates seen and not published (ckptd.drops): one row per path and reason, the latest.
CREATE TABLE IF NOT EXISTS dropped (
    collection TEXT NOT NULL,
    path TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (collection, path, reason)
);
"""


@dataclass(frozen=True)
class NewRow:
    """A finished checkpoint about to be queued (`Journal.add`). `step` None: the next after
    the collection's highest, so that detection order stands in for it."""

    collection: str
    watch_path: Path
    relpath: str
    fingerprint: str
    format: str
    step: int | None
    files: tuple[FileState, ...]
    info: CheckpointInfo
    snapshot: Path | None


@dataclass(frozen=True)
class Row:
    """One checkpoint as the journal knows it."""

    id: int
    collection: str
    watch_path: str
    relpath: str
    fingerprint: str
    format: str
    step: int
    state: str
    files: tuple[FileState, ...]
    info: CheckpointInfo
    snapshot: str | None
    md5s: dict[str, str]
    digest: str | None
    version: str | None
    aliases: tuple[str, ...]
    attempts: int
    next_attempt_at: float
    first_failure_at: float | None
    last_error: str | None
    detected_at: float
    updated_at: float
    durable: bool = True  # False: logged offline, its record not yet read back from disk
    part_at: float | None = None  # multi-host: when this host's part landed (upserted)

    @property
    def source(self) -> Path:
        """Where the checkpoint lives in the watched directory."""
        return Path(self.watch_path) / self.relpath

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class Deletion:
    """Something retention deleted: a version (`target` "model:v3") or the local files of
    checkpoint `checkpoint_id` (`target` their path)."""

    collection: str
    target: str
    reason: str
    at: float
    checkpoint_id: int | None


@dataclass(frozen=True)
class Dropped:
    """A candidate that was seen and not published (see ckptd.drops), as the journal keeps it."""

    collection: str
    path: str
    reason: str
    detail: str
    at: float


@dataclass(frozen=True)
class PromotionRow:
    """One promotion of a published version to a target (ckptd.promote), as journaled."""

    id: int
    checkpoint_id: int
    collection: str
    version: str
    step: int
    target: str
    aliases: tuple[str, ...]
    state: str  # pending | done | failed
    attempts: int
    next_attempt_at: float
    first_failure_at: float | None
    last_error: str | None
    result: str | None
    updated_at: float

    @classmethod
    def decode(cls, r: sqlite3.Row) -> PromotionRow:
        return cls(
            id=r["id"], checkpoint_id=r["checkpoint_id"], collection=r["collection"],
            version=r["version"], step=r["step"], target=r["target"],
            aliases=tuple(json.loads(r["aliases"])), state=r["state"], attempts=r["attempts"],
            next_attempt_at=r["next_attempt_at"], first_failure_at=r["first_failure_at"],
            last_error=r["last_error"], result=r["result"], updated_at=r["updated_at"],
        )  # fmt: skip


_JSON_FIELDS = {"files", "info", "md5s", "aliases"}


def encode(key: str, value: Any) -> Any:
    if key in _JSON_FIELDS and value is not None:
        if key == "files":
            return json.dumps([f.to_json() for f in value])
        if key == "info":
            return json.dumps(value.to_json())
        return json.dumps(list(value) if key == "aliases" else value)
    if isinstance(value, Path):
        return str(value)
    return value


def decode(r: sqlite3.Row) -> Row:
    return Row(
        id=r["id"],
        collection=r["collection"],
        watch_path=r["watch_path"],
        relpath=r["relpath"],
        fingerprint=r["fingerprint"],
        format=r["format"],
        step=r["step"],
        state=r["state"],
        files=tuple(FileState.from_json(f) for f in json.loads(r["files"])),
        info=CheckpointInfo.from_json(json.loads(r["info"])),
        snapshot=r["snapshot"],
        md5s=json.loads(r["md5s"]) if r["md5s"] else {},
        digest=r["digest"],
        version=r["version"],
        aliases=tuple(json.loads(r["aliases"])) if r["aliases"] else (),
        attempts=r["attempts"],
        next_attempt_at=r["next_attempt_at"],
        first_failure_at=r["first_failure_at"],
        last_error=r["last_error"],
        detected_at=r["detected_at"],
        updated_at=r["updated_at"],
        durable=bool(r["durable"]),
        part_at=r["part_at"],
    )
