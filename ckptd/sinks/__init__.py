"""Sinks: where published checkpoints go. The contract every implementation keeps.

A sink is called by the publisher only. Calls for one collection never overlap (the
publisher serialises them to keep versions in step order); calls for different collections
may run in parallel on different threads.

Errors: every method raises `PublishError` with `transient=True` when retrying can help
(network, timeouts, 5xx, 429 with `retry_after`) and `transient=False` when it cannot (bad
key, no permission, an invalid name); nothing else escapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

__all__ = ["PublishRequest", "PublishedVersion", "Sink", "SinkFile"]


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


@dataclass(frozen=True)
class PublishedVersion:
    """Where a checkpoint landed. `version` ("v3") is None where the sink cannot know it yet
    (W&B offline mode assigns numbers at `wandb sync`)."""

    version: str | None
    artifact_id: str | None = None
    committed: bool = True


class Sink(Protocol):
    """A destination for checkpoint versions."""

    def publish(self, request: PublishRequest) -> PublishedVersion:
        """Create a version from `request.files` with `request.aliases` and return it once it
        is committed. Idempotent: the same content published again returns the existing
        version and creates no new one."""
        ...

    def move_alias(self, collection: str, type: str, alias: str, version: str) -> None:
        """Put `alias` on `version` of `collection` (taking it from any other version).
        Raises PublishError(transient=False) where the sink cannot move aliases."""
        ...

    def close(self) -> None:
        """Flush and release everything; no call is made after this."""
        ...
