"""Distributed versions: many hosts, one version, through W&B's distributed artifacts.

Every host of a multi-node job upserts its own files into the version of one distributed id,
which each derives alone from the job's group, the collection and the step (`Place`); W&B
keeps that version PENDING and merges the hosts' manifests when one host, the finisher,
commits it. Before the finisher commits, it must know that every host's part is in: the
hosts tell each other through the rendezvous records (`ckptd.sinks.rendezvous`), in W&B
itself or in a directory they share.

`PartsSink` is the contract the multi-host publisher (ckptd.multihost) relies on; `WandbParts`
keeps it with the wandb SDK, on top of the `WandbSink` that holds the upload runs.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any, Protocol, TypeVar

from ckptd.errors import PublishError
from ckptd.sinks import PublishedVersion, PublishRequest, Sink
from ckptd.sinks.metadata import encode
from ckptd.sinks.rendezvous import (
    DirectoryRecords,
    Part,
    Place,
    Rendezvous,
    RunRecords,
    read_rendezvous,
    record_steps,
)

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

T = TypeVar("T")

_WAIT = 300.0  # seconds an upsert or a commit may take before it counts as failed


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
            lambda data: record_steps(data, "parts").update({str(place.step): part.to_json()}),
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
            lambda data: record_steps(data, "committed").update({str(place.step): version}),
        )  # fmt: skip
        return PublishedVersion(version=version)

    def abandon(self, collection: str, place: Place, missing: tuple[int, ...]) -> None:
        self._write(
            collection, place,
            lambda data: record_steps(data, "abandoned").update({str(place.step): list(missing)}),
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
