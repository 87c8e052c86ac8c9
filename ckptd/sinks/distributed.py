"""Distributed versions: many hosts, one version, through W&B's distributed artifacts.

Every host of a multi-node job upserts its own files into the version of one distributed id,
which each derives alone from the job's group, the collection and the step (`Place`); W&B
keeps that version PENDING and merges the hosts' manifests when one host, the finisher,
commits it. Before the finisher commits, it must know that every host's part is in; the
hosts tell each other through records (the rendezvous): each host keeps one record per
collection with the steps whose parts landed (their file names and metrics), and the
finisher records there what it committed or gave up, which the other hosts read. The
records live in W&B itself (`RunRecords`: a small run per host in the job's run group, job
type `ckptd-parts`, written and read only through the public API; not the upload run, whose
config and summary wandb-core owns and rewrites), or in a directory that every host shares
when the config names one (`DirectoryRecords`, `distributed.rendezvous`).

`PartsSink` is the contract the multi-host publisher (ckptd.multihost) relies on; `WandbParts`
keeps it with the wandb SDK, on top of the `WandbSink` that holds the upload runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol, TypeVar

from ckptd.errors import PublishError
from ckptd.sinks import PublishedVersion, PublishRequest, Sink
from ckptd.sinks.metadata import encode

__all__ = [
    "DirectoryRecords",
    "Part",
    "PartsSink",
    "Place",
    "Rendezvous",
    "RunRecords",
    "WandbParts",
    "parts_of",
    "read_rendezvous",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

JOB_TYPE = "ckptd-parts"
_CONFIG_KEY = "ckptd_parts"
_KEEP_STEPS = 64  # steps each record keeps (older ones are settled long ago)
_WAIT = 300.0  # seconds an upsert or a commit may take before it counts as failed
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


class PartsSink(Protocol):
    """A destination that merges several hosts' parts into one version. Calls for one
    collection never overlap; errors are PublishError as in the Sink contract."""

    def upsert(self, request: PublishRequest, place: Place, part: Part) -> None:
        """Upload `request.files` into the version of `place`'s distributed id (PENDING until
        the finisher commits it) and record `part` in the rendezvous once they landed.
        Idempotent: the same part again changes nothing."""
        ...

    def rendezvous(self, collection: str, place: Place) -> Rendezvous:
        """What the group's hosts recorded for `place.step` of `collection`."""
        ...

    def finish(self, request: PublishRequest, place: Place) -> PublishedVersion:
        """Commit the version of `place`'s distributed id with `request.aliases` and
        `request.metadata` (its files are the parts already upserted), and record it as
        committed for the other hosts. Idempotent: a committed version is returned as is."""
        ...

    def abandon(self, collection: str, place: Place, missing: tuple[int, ...]) -> None:
        """Record, for the other hosts, that `place.step` will not be committed because the
        ranks `missing` never arrived."""
        ...


def parts_of(sink: Sink) -> PartsSink | None:
    """The distributed side of `sink`, or None if it has none (W&B offline mode, others)."""
    from ckptd.sinks.wandb import WandbSink

    if isinstance(sink, WandbSink) and sink.online:
        return WandbParts(sink)
    return None


def _record_run_id(group: str, collection: str, rank: int) -> str:
    """A run id W&B accepts (letters, digits, '-'), the same at every start of this host."""
    digest = hashlib.sha256(f"{group}\0{collection}".encode()).hexdigest()[:16]
    return f"ckptd-parts-{digest}-r{rank}"


def _steps(data: dict[str, Any], key: str) -> dict[str, Any]:
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


class WandbParts:
    """`PartsSink` with the wandb SDK. Uses `sink`'s upload run of each collection for the
    uploads and its public API for the rendezvous; `_records` is guarded by `_lock`."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink
        in_wandb = RunRecords(sink)
        self._records: dict[str, DirectoryRecords | RunRecords] = {
            w.artifact: DirectoryRecords(w.distributed.rendezvous)
            if w.distributed.rendezvous is not None else in_wandb
            for w in sink.config.watch
            if w.distributed is not None
        }  # fmt: skip
        self._in_wandb = in_wandb

    # -- the PartsSink contract ----------------------------------------------------------

    def upsert(self, request: PublishRequest, place: Place, part: Part) -> None:
        def upsert() -> None:
            import wandb

            from ckptd.sinks.wandb import _add_file

            run = self.sink._run(request.collection)
            artifact = wandb.Artifact(
                request.collection, type=request.type, metadata=encode(request)
            )
            for file in request.files:
                _add_file(artifact, file)
            landed = run.upsert_artifact(
                artifact, distributed_id=place.distributed_id(request.collection)
            )
            landed.wait(timeout=int(_WAIT + sum(f.size for f in request.files) / 5e6))

        self._guard(f"upserting {request.collection} step {place.step}", upsert)
        self._write(
            request.collection, place,
            lambda data: _steps(data, "parts").update({str(place.step): part.to_json()}),
        )  # fmt: skip

    def rendezvous(self, collection: str, place: Place) -> Rendezvous:
        records = self._records_of(collection)
        found = self._guard(
            f"reading the parts of {collection} step {place.step}",
            lambda: records.all(collection, place),
        )
        return read_rendezvous(found, collection, place)

    def finish(self, request: PublishRequest, place: Place) -> PublishedVersion:
        def finish() -> str:
            import wandb

            run = self.sink._run(request.collection)
            metadata = encode(request)  # its files are the parts: their sizes, not its own
            metadata.update(size_bytes=sum(request.facts.files.values()), hosts=place.hosts)
            metadata["ckptd"].update(
                distributed_id=place.distributed_id(request.collection), group=place.group
            )
            artifact = wandb.Artifact(
                request.collection,
                type=request.type,
                description=request.description,
                metadata=metadata,
            )
            if request.ttl is not None:
                artifact.ttl = timedelta(seconds=request.ttl)
            done = run.finish_artifact(
                artifact,
                distributed_id=place.distributed_id(request.collection),
                aliases=list(request.aliases),
            )
            done.wait(timeout=int(_WAIT))
            return str(done.version)

        version = self._guard(f"committing {request.collection} step {place.step}", finish)
        self._write(
            request.collection, place,
            lambda data: _steps(data, "committed").update({str(place.step): version}),
        )  # fmt: skip
        return PublishedVersion(version=version)

    def abandon(self, collection: str, place: Place, missing: tuple[int, ...]) -> None:
        self._write(
            collection, place,
            lambda data: _steps(data, "abandoned").update({str(place.step): list(missing)}),
        )  # fmt: skip

    # -- the records ----------------------------------------------------------------------

    def _records_of(self, collection: str) -> DirectoryRecords | RunRecords:
        return self._records.get(collection, self._in_wandb)

    def _write(
        self, collection: str, place: Place, change: Callable[[dict[str, Any]], None]
    ) -> None:
        """Apply `change` to this host's record of `collection` and store it."""
        records = self._records_of(collection)

        def write() -> None:
            data = records.load(collection, place)
            data.update(collection=collection, rank=place.rank, hosts=place.hosts)
            change(data)
            try:
                records.store(collection, place, data)
            except Exception:
                records.forget(collection)  # read back next time; the change is made again
                raise

        self._guard(f"recording this host's part of {collection}", write)

    def _guard(self, doing: str, call: Callable[[], T]) -> T:
        """Run an SDK call; any failure becomes a PublishError saying whether to retry."""
        from ckptd.sinks.wandb import _SERVICE_LOST

        generation = self.sink._generation
        try:
            return call()
        except PublishError:
            raise
        except Exception as exc:
            if type(exc).__name__ in _SERVICE_LOST:
                self.sink._replace_service(generation)
            raise self.sink._classify(exc, doing) from exc
