"""Sinks: where published checkpoints go, and the contract every implementation keeps.

A sink is the only code that knows its destination (W&B, or the in-memory sink the tests
drive the coordinator with): its API, its modes, its metadata format, its reachability.
What a destination cannot do it says once, in `capabilities`; no caller asks for a mode.
`ckptd.sinks.factory` chooses the sink from the config.

Concurrency: publishing calls for one collection arrive in step order from one thread at a
time, but a sink that can pipeline (`capabilities.pipelines`) is handed version N+1 through
`submit` while N is still committing and must keep their order. Calls for different
collections may run in parallel. Retention's calls (`versions`, `links`, `delete_version`)
for one collection never overlap each other, but may run while a version of the same
collection is being published, and must not disturb it.

Errors: every method raises `PublishError` with `transient=True` when retrying can help
(network, timeouts, 5xx, 429 with `retry_after`) and `transient=False` when it cannot (bad
key, no permission, an invalid name); nothing else escapes.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "Capabilities",
    "Pending",
    "PublishRequest",
    "PublishedVersion",
    "RemoteVersion",
    "Sink",
    "SinkFile",
    "StoredFile",
    "StoredVersion",
    "VersionFacts",
]


@dataclass(frozen=True)
class Capabilities:
    """What a sink can do. `limits` says, for a person, why it cannot do what it cannot
    (for example "W&B offline mode: versions get their numbers at `wandb sync`")."""

    moves_aliases: bool = True  # put an alias on an older version (`latest` back to the top)
    lists_versions: bool = True  # list, look up and delete versions: remote retention
    records_lineage: bool = True  # record a version as an output of the training run
    confirms_later: bool = False  # `publish` may return committed=False: ask `recorded` later
    pipelines: bool = False  # `submit` returns before the version is committed
    reads: bool = True  # `resolve` and `download`: `ckptd restore`
    limits: str = ""


@dataclass(frozen=True)
class SinkFile:
    """One file of a checkpoint: its name inside the version, where its bytes are now (the
    snapshot), and the base64 md5 that ckptd already computed.

    With `ref` (a `file://`, `s3://` or `gs://` URI where these same bytes already live) the
    sink records a reference to it and uploads nothing; it refuses (transient PublishError)
    an object whose size, or md5 where the store reports one, is not this file's."""

    name: str
    path: Path
    md5_b64: str
    size: int
    ref: str | None = None


@dataclass(frozen=True)
class VersionFacts:
    """What ckptd records about a checkpoint in its version's metadata. Only
    `ckptd.sinks.metadata` turns it into a destination's format and back."""

    step: int
    epoch: float | None = None
    metrics: Mapping[str, Any] = field(default_factory=dict)
    format: str = "file"
    source_path: str = ""
    host: str = ""
    files: Mapping[str, int] = field(default_factory=dict)  # name -> size
    sidecar: str | None = None  # the file the step and metrics came from
    detected_at: float = 0.0
    extra: Mapping[str, Any] = field(default_factory=dict)  # the sidecar's own metadata


@dataclass(frozen=True)
class PublishRequest:
    """One checkpoint to publish as a new version of `collection`."""

    collection: str
    type: str
    files: tuple[SinkFile, ...]
    aliases: tuple[str, ...]
    facts: VersionFacts
    description: str | None = None
    run_path: str | None = None  # the training run, for lineage
    ttl: float | None = None
    key: str | None = None  # names this checkpoint across attempts; kept in its metadata

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class PublishedVersion:
    """Where a checkpoint landed. `version` ("v3") is None where the sink cannot know it yet
    (W&B offline mode assigns numbers at `wandb sync`). `committed` is False where the sink
    logged the version but cannot vouch yet that it survives a crash (only a sink with
    `capabilities.confirms_later`): ask `recorded` later."""

    version: str | None
    committed: bool = True


class Pending(Protocol):
    """A publish handed to the sink and not yet committed (see `Sink.submit`)."""

    def result(self) -> PublishedVersion:
        """Wait for the version to be committed and return it; raises PublishError."""
        ...


@dataclass(frozen=True)
class RemoteVersion:
    """One committed version of a collection, as retention sees it.

    `index` orders versions by creation (3 for "v3"). `step` is None for a version that ckptd
    did not publish (no ckptd metadata): retention never deletes those. `linked` is True where
    the listing itself shows the version linked into another collection (a registry); where a
    listing cannot tell, it is False and retention asks `links()` before it deletes.
    """

    version: str
    index: int
    step: int | None
    aliases: tuple[str, ...]
    size: int
    linked: bool = False
    metrics: Mapping[str, Any] = field(default_factory=dict)  # as ckptd recorded them
    promoting: bool = False  # a promotion of it is queued (ckptd.promote); set by retention


@dataclass(frozen=True)
class StoredFile:
    """One file of a stored version: its size and base64 md5 (None where the destination
    keeps none), or `ref`, the URI it references instead of holding its bytes."""

    name: str
    size: int | None
    md5_b64: str | None
    ref: str | None = None


@dataclass(frozen=True)
class StoredVersion:
    """A version found by `resolve`: `label` names it for a person (`entity/project/a:v3`)."""

    collection: str
    version: str
    label: str
    files: tuple[StoredFile, ...]
    handle: Any = None  # the sink's own object, for `download`
    metadata: Mapping[str, Any] = field(default_factory=dict)  # sinks.metadata decodes it
    url: str | None = None  # where a person sees it, if the destination has such a page


class Sink(Protocol):
    """A destination for checkpoint versions."""

    capabilities: Capabilities

    def submit(self, request: PublishRequest) -> Pending:
        """Start publishing `request` and return without waiting for the commit where the
        sink can (`capabilities.pipelines`); versions of a collection are committed in the
        order they were submitted. Idempotent like `publish`."""
        ...

    def publish(self, request: PublishRequest) -> PublishedVersion:
        """Create a version from `request.files` with `request.aliases` and return it once it
        is committed. Idempotent: the same content published again returns the existing
        version and creates no new one; so is a `key` that is recorded already."""
        ...

    def problem(self, now: float) -> str | None:
        """None while the destination can be reached (for /readyz), else why not. Cheap:
        it may answer from a probe made up to a few seconds before `now`."""
        ...

    def recorded(self, collection: str, keys: Collection[str]) -> set[str]:
        """Which of `keys` (the `PublishRequest.key` of versions that `publish` returned with
        `committed=False`) are durably recorded now. A key left out was lost and must be
        published again. A sink whose publishes are always committed returns every key."""
        ...

    def move_alias(self, collection: str, type: str, alias: str, version: str) -> None:
        """Put `alias` on `version` of `collection` (taking it from any other version).
        Raises PublishError(transient=False) without `capabilities.moves_aliases`."""
        ...

    def versions(self, collection: str, type: str) -> list[RemoteVersion]:
        """Every committed version of `collection` (oldest first) with its current aliases;
        [] if the collection does not exist yet. Versions still uploading are not listed.
        Raises PublishError(transient=False) without `capabilities.lists_versions`."""
        ...

    def links(self, collection: str, type: str, version: str) -> tuple[str, ...]:
        """The other collections (registries) that `version` is linked into; () if none, or
        if the version does not exist."""
        ...

    def delete_version(self, collection: str, type: str, version: str) -> None:
        """Delete `version` of `collection` together with the aliases it holds. A version
        that is already gone is not an error. Raises `VersionLinked` (never deleting) if the
        version is linked into another collection, checked at the moment of deletion."""
        ...

    def resolve(self, collection: str, ref: str) -> StoredVersion | None:
        """The version named `ref` (an alias, or "vN") with its files; None if the
        destination says no such version exists. Raises PublishError otherwise."""
        ...

    def download(self, version: StoredVersion, dest: Path) -> None:
        """Write every file of `version` under `dest` (its name as a relative path)."""
        ...

    def close(self) -> None:
        """Flush and release everything; no call is made after this."""
        ...
