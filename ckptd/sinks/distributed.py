"""Distributed versions: many hosts, one version, through W&B's distributed artifacts.

Every host of a multi-node job upserts its own files into the version of one distributed id,
which each derives alone from the job's group, the collection and the step (`Place`); W&B
keeps that version PENDING and merges the hosts' manifests when one host, the finisher,
commits it. Before the finisher commits, it must know that every host's part is in; the
hosts tell each other through W&B itself (the rendezvous): each host keeps one small run per
collection in the job's group (job type `ckptd-parts`), written and read only through the
public API, whose config records the steps whose parts landed, with their file names and
metrics; the finisher records there what it committed or gave up, which the other hosts
read. (Not the upload run: wandb-core owns that run's config and summary and rewrites them.)

`PartsSink` is the contract the multi-host publisher (ckptd.multihost) relies on; `WandbParts`
keeps it with the wandb SDK, on top of the `WandbSink` that holds the upload runs.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol, TypeVar

from ckptd.errors import PublishError
from ckptd.sinks import PublishedVersion, PublishRequest, Sink
from ckptd.sinks.metadata import encode

__all__ = ["Part", "PartsSink", "Place", "Rendezvous", "WandbParts", "parts_of"]

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


class _Record:
    """This host's record run for one collection and what it holds (its config)."""

    def __init__(self, run: Any, data: dict[str, Any]) -> None:
        self.run = run
        self.data = data

    def steps(self, key: str) -> dict[str, Any]:
        found = self.data.setdefault(key, {})
        if len(found) > _KEEP_STEPS:  # the lowest steps go first
            for old in sorted(found, key=int)[: len(found) - _KEEP_STEPS]:
                del found[old]
        return found  # type: ignore[no-any-return]


class WandbParts:
    """`PartsSink` with the wandb SDK. Uses `sink`'s upload run of each collection for the
    uploads and its public API for the rendezvous; `_records` is guarded by `_lock`."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink
        self._lock = threading.Lock()
        self._records: dict[str, _Record] = {}  # collection -> this host's record run
        self._reading = threading.Lock()  # one rendezvous listing at a time

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
            request.collection, place, lambda rec: rec.steps("parts").update(
                {str(place.step): part.to_json()}
            ),
        )  # fmt: skip

    def rendezvous(self, collection: str, place: Place) -> Rendezvous:
        def read() -> Rendezvous:
            entity, project = self._where(collection)
            api = self.sink._public_api()
            api.flush()  # the API keeps what it listed before: read the records anew
            runs = api.runs(
                f"{entity}/{project}", filters={"group": place.group, "jobType": JOB_TYPE},
                lazy=False,
            )  # fmt: skip
            parts: dict[int, Part] = {}
            committed: str | None = None
            abandoned: tuple[int, ...] | None = None
            key = str(place.step)
            for run in runs:
                data = run.config.get(_CONFIG_KEY)
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

        def read_alone() -> Rendezvous:
            with self._reading:  # the API's cache of listings is shared by every collection
                return read()

        return self._guard(f"reading the parts of {collection} step {place.step}", read_alone)

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
            lambda rec: rec.steps("committed").update({str(place.step): version}),
        )  # fmt: skip
        return PublishedVersion(version=version)

    def abandon(self, collection: str, place: Place, missing: tuple[int, ...]) -> None:
        self._write(
            collection, place,
            lambda rec: rec.steps("abandoned").update({str(place.step): list(missing)}),
        )  # fmt: skip

    # -- the record run --------------------------------------------------------------------

    def _write(self, collection: str, place: Place, change: Callable[[_Record], None]) -> None:
        """Apply `change` to this host's record and store it on its run."""

        def write() -> None:
            record = self._record(collection, place)
            change(record)
            record.run.config[_CONFIG_KEY] = record.data
            try:
                record.run.update()
            except Exception:
                with self._lock:  # read back from W&B next time; the change is made again
                    self._records.pop(collection, None)
                raise

        self._guard(f"recording this host's part of {collection}", write)

    def _record(self, collection: str, place: Place) -> _Record:
        """This host's record run of `collection` (created on first use), with its data as
        W&B holds it (a restarted host carries on from there)."""
        with self._lock:
            found = self._records.get(collection)
        if found is not None:
            return found
        from wandb.apis.public import Run

        entity, project = self._where(collection)
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
        stored = run.config.get(_CONFIG_KEY)
        data = dict(stored) if isinstance(stored, dict) else {}
        data.update(collection=collection, rank=place.rank, hosts=place.hosts)
        run.group = place.group  # what Run.update() sends as the run's group and job type
        run.job_type = JOB_TYPE
        run.name = f"ckptd parts of {collection}, rank {place.rank}"
        record = _Record(run, data)
        with self._lock:
            self._records[collection] = record
        return record

    def _where(self, collection: str) -> tuple[str, str]:
        entity, project, _ = self.sink._qualified(collection, "").split("/", 2)
        return entity, project

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
