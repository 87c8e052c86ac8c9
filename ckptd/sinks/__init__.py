"""Sinks: where published checkpoints go. The contract every implementation keeps.

A sink is called by the publisher and by retention. Publishing calls for one collection
never overlap (the publisher serialises them to keep versions in step order); calls for
different collections may run in parallel on different threads. Retention's calls
(`versions`, `links`, `delete_version`) for one collection never overlap each other, but may
run while a version of the same collection is being published, and must not disturb it.

Errors: every method raises `PublishError` with `transient=True` when retrying can help
(network, timeouts, 5xx, 429 with `retry_after`) and `transient=False` when it cannot (bad
key, no permission, an invalid name); nothing else escapes.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

__all__ = ["PublishRequest", "PublishedVersion", "RemoteVersion", "Sink", "SinkFile"]


@dataclass(frozen=True)
class SinkFile:
    """One file of a checkpoint: its name inside the artifact, where its bytes are now (the
    snapshot), and the base64 md5 that ckptd already computed."""

    name: str
    path: Path
    md5_b64: str
    size: int


@dataclass(frozen=True)
class PublishRequest:
    """One checkpoint to publish as a new version of `collection`."""

    collection: str
    type: str
    files: tuple[SinkFile, ...]
    aliases: tuple[str, ...]
    metadata: dict[str, Any] = field(default_factory=dict)
    description: str | None = None
    run_path: str | None = None
    ttl: float | None = None
    key: str | None = None  # names this checkpoint across attempts; kept in its metadata


@dataclass(frozen=True)
class PublishedVersion:
    """Where a checkpoint landed. `version` ("v3") is None where the sink cannot know it yet
    (W&B offline mode assigns numbers at `wandb sync`). `committed` is False where the sink
    logged the version but cannot vouch yet that it survives a crash (W&B offline mode, until
    the record is read back from disk): ask `recorded` later."""

    version: str | None
    artifact_id: str | None = None
    committed: bool = True


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


class Sink(Protocol):
    """A destination for checkpoint versions."""

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
        Raises PublishError(transient=False) where the sink cannot move aliases."""
        ...

    def versions(self, collection: str, type: str) -> list[RemoteVersion]:
        """Every committed version of `collection` (oldest first) with its current aliases;
        [] if the collection does not exist yet. Versions still uploading are not listed.
        Raises PublishError(transient=False) where the sink cannot list (W&B offline mode)."""
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

    def close(self) -> None:
        """Flush and release everything; no call is made after this."""
        ...
