"""The rendezvous of a multi-host version: how the hosts of a job tell each other which
parts landed and what the finisher did, with nothing shared but W&B (or a directory).

Each host keeps one record per collection: the steps whose parts landed (their file names,
metrics, epoch and aliases), and, on the finisher, the steps it committed (with the version)
or gave up (with the missing ranks). `RunRecords` keeps the records in W&B: a small run per
host in the job's run group (job type `ckptd-parts`), whose config is the record, written
with the public API's `Run.update()` and read by listing the group's runs; never the upload
run, whose config and summary wandb-core owns and rewrites. `DirectoryRecords` keeps them as
one JSON file per host in a directory every host shares (`distributed.rendezvous`).
`read_rendezvous` reads one step out of every host's record.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "JOB_TYPE",
    "DirectoryRecords",
    "Part",
    "Place",
    "Rendezvous",
    "RunRecords",
    "read_rendezvous",
    "record_steps",
]

JOB_TYPE = "ckptd-parts"
_CONFIG_KEY = "ckptd_parts"
_KEEP_STEPS = 64  # steps each record keeps (older ones are settled long ago)
_MISSING_RUN = re.compile(r"could not find run", re.IGNORECASE)


@dataclass(frozen=True)
class Place:
    """Where one host's part of one step goes."""

    group: str
    hosts: int
    rank: int
    finisher: int
    step: int

    def distributed_id(self, collection: str) -> str:
        """The id every host derives alone for this step's version."""
        return f"ckptd/{self.group}/{collection}/step-{self.step}"


@dataclass(frozen=True)
class Part:
    """One host's contribution to a step, as the rendezvous records it."""

    rank: int
    files: Mapping[str, int]  # name -> size
    metrics: Mapping[str, Any] = field(default_factory=dict)
    epoch: float | None = None
    aliases: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "files": dict(self.files), "metrics": dict(self.metrics), "epoch": self.epoch,
            "aliases": list(self.aliases),
        }  # fmt: skip

    @classmethod
    def from_json(cls, rank: int, data: Mapping[str, Any]) -> Part:
        files = data.get("files")
        metrics = data.get("metrics")
        epoch = data.get("epoch")
        aliases = data.get("aliases")
        return cls(
            rank=rank,
            files={str(k): int(v) for k, v in files.items()} if isinstance(files, dict) else {},
            metrics=metrics if isinstance(metrics, dict) else {},
            epoch=epoch if isinstance(epoch, int | float) and not isinstance(epoch, bool) else None,
            aliases=tuple(str(a) for a in aliases) if isinstance(aliases, list) else (),
        )


@dataclass(frozen=True)
class Rendezvous:
    """What the hosts of a group recorded about one step: each rank's part that landed,
    and the finisher's outcome (the committed version, or the ranks it gave up waiting for)."""

    parts: Mapping[int, Part]
    committed: str | None = None
    abandoned: tuple[int, ...] | None = None


def _record_run_id(group: str, collection: str, rank: int) -> str:
    """A run id W&B accepts (letters, digits, '-'), the same at every start of this host."""
    digest = hashlib.sha256(f"{group}\0{collection}".encode()).hexdigest()[:16]
    return f"ckptd-parts-{digest}-r{rank}"


def record_steps(data: dict[str, Any], key: str) -> dict[str, Any]:
    """One map of a host's record (`parts`, `committed`, `abandoned`), the oldest steps
    dropped beyond _KEEP_STEPS."""
    found = data.setdefault(key, {})
    if len(found) > _KEEP_STEPS:
        for old in sorted(found, key=int)[: len(found) - _KEEP_STEPS]:
            del found[old]
    return found  # type: ignore[no-any-return]


def read_rendezvous(records: list[Any], collection: str, place: Place) -> Rendezvous:
    """What every host's record says about `place.step` of `collection` (records of other
    collections, and ranks outside the group, are ignored)."""
    parts: dict[int, Part] = {}
    committed: str | None = None
    abandoned: tuple[int, ...] | None = None
    key = str(place.step)
    for data in records:
        if not isinstance(data, dict) or data.get("collection") != collection:
            continue
        rank = data.get("rank")
        if not isinstance(rank, int) or not 0 <= rank < place.hosts:
            continue
        landed = (data.get("parts") or {}).get(key)
        if isinstance(landed, dict):
            parts[rank] = Part.from_json(rank, landed)
        if rank == place.finisher:
            version = (data.get("committed") or {}).get(key)
            committed = version if isinstance(version, str) else None
            missing = (data.get("abandoned") or {}).get(key)
            if isinstance(missing, list):
                abandoned = tuple(int(r) for r in missing)
    return Rendezvous(parts, committed, abandoned)


class DirectoryRecords:
    """The rendezvous in a directory every host can read and write (`distributed.
    rendezvous`): one JSON file per host, `<dir>/<group and collection>/rank-<R>.json`,
    replaced atomically (written beside, fsynced, renamed)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _dir(self, collection: str, place: Place) -> Path:
        return self.root / _record_run_id(place.group, collection, 0).removesuffix("-r0")

    def load(self, collection: str, place: Place) -> dict[str, Any]:
        """This host's record (empty the first time)."""
        path = self._dir(collection, place) / f"rank-{place.rank}.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        return data if isinstance(data, dict) else {}

    def store(self, collection: str, place: Place, data: dict[str, Any]) -> None:
        directory = self._dir(collection, place)
        directory.mkdir(parents=True, exist_ok=True)
        final = directory / f"rank-{place.rank}.json"
        tmp = directory / f".rank-{place.rank}.json.tmp"
        with tmp.open("w", encoding="utf-8") as out:
            json.dump(data, out)
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(final)

    def forget(self, collection: str) -> None:
        """Nothing is cached."""

    def all(self, collection: str, place: Place) -> list[Any]:
        found = []
        for path in sorted(self._dir(collection, place).glob("rank-*.json")):
            try:
                found.append(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                continue  # replaced while read: the next look reads the new one
        return found


class RunRecords:
    """The rendezvous in W&B: one run per host and collection in the job's run group (job
    type `ckptd-parts`), its config holding the record; written with the public API's
    `Run.update()`, read by listing the group's runs. `_runs` is guarded by `_lock`."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink
        self._lock = threading.Lock()
        self._runs: dict[str, Any] = {}  # collection -> this host's record run
        self._reading = threading.Lock()  # one listing at a time: the API caches listings

    def load(self, collection: str, place: Place) -> dict[str, Any]:
        stored = self._run(collection, place).config.get(_CONFIG_KEY)
        return dict(stored) if isinstance(stored, dict) else {}

    def store(self, collection: str, place: Place, data: dict[str, Any]) -> None:
        run = self._run(collection, place)
        run.config[_CONFIG_KEY] = data
        run.update()

    def forget(self, collection: str) -> None:
        """Read the run back from W&B next time (after a failed write)."""
        with self._lock:
            self._runs.pop(collection, None)

    def all(self, collection: str, place: Place) -> list[Any]:
        entity, project = _where(self.sink, collection)
        with self._reading:
            api = self.sink._public_api()
            api.flush()  # the API keeps what it listed before: read the records anew
            runs = api.runs(
                f"{entity}/{project}", filters={"group": place.group, "jobType": JOB_TYPE},
                lazy=False,
            )  # fmt: skip
            return [run.config.get(_CONFIG_KEY) for run in runs]

    def _run(self, collection: str, place: Place) -> Any:
        """This host's record run of `collection` (created on first use), as W&B holds it
        (a restarted host carries on from there)."""
        with self._lock:
            found = self._runs.get(collection)
        if found is not None:
            return found
        from wandb.apis.public import Run

        entity, project = _where(self.sink, collection)
        run_id = _record_run_id(place.group, collection, place.rank)
        path = f"{entity}/{project}/{run_id}"
        api = self.sink._public_api()
        try:
            run = api.run(path)
        except Exception as exc:
            if not _MISSING_RUN.search(str(exc)):
                raise
            Run.create(api, run_id=run_id, project=project, entity=entity)
            run = api.run(path)
        run.load(force=True)  # the API keeps runs by path: read what W&B holds now
        run.group = place.group  # what Run.update() sends as the run's group and job type
        run.job_type = JOB_TYPE
        run.name = f"ckptd parts of {collection}, rank {place.rank}"
        with self._lock:
            self._runs[collection] = run
        return run


def _where(sink: Any, collection: str) -> tuple[str, str]:
    entity, project, _ = sink._qualified(collection, "").split("/", 2)
    return entity, project
