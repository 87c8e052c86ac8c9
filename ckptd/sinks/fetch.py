"""Bring a published version's files and facts back through its sink, for promotion targets
that need the bytes (a Hugging Face release) or the facts (the step, the metrics).

`resolve_version` names a version (an alias or `vN`) with ckptd's facts from its metadata;
`fetch_version` also downloads its files (`Sink.download`) into a directory the caller owns
and checks each against the size and md5 the sink recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from ckptd.errors import PromotionRefused, PublishError
from ckptd.hashing import md5_b64
from ckptd.sinks import Sink, StoredVersion, metadata

__all__ = ["FetchedVersion", "fetch_version", "resolve_version"]


@dataclass(frozen=True)
class FetchedVersion:
    """A version as ckptd published it: its number, step and metrics from its metadata,
    its full name and page, and (after `fetch_version`) its files under `root`."""

    collection: str
    version: str
    qualified: str  # entity/project/collection:v3
    step: int | None
    metrics: dict[str, Any] = field(default_factory=dict)
    url: str | None = None
    root: Path | None = None
    files: tuple[str, ...] = ()


def resolve_version(sink: Sink, collection: str, ref: str) -> FetchedVersion:
    """What `collection:ref` names; PromotionRefused if it does not exist."""
    return _described(_stored(sink, collection, ref))


def fetch_version(sink: Sink, collection: str, ref: str, dest: Path) -> FetchedVersion:
    """Download `collection:ref` into the empty directory `dest` and verify every file."""
    stored = _stored(sink, collection, ref)
    for file in stored.files:
        path = PurePosixPath(file.name)
        if path.is_absolute() or ".." in path.parts or file.ref is not None:
            raise PromotionRefused(f"{stored.label}: cannot promote a file named {file.name!r}")
    sink.download(stored, dest)
    for file in stored.files:
        local = dest / file.name
        whole = local.is_file() and (file.size is None or local.stat().st_size == file.size)
        if not whole or (file.md5_b64 is not None and md5_b64(local) != file.md5_b64):
            raise PublishError(
                f"{stored.label}: {file.name} downloaded corrupt or incomplete", transient=True
            )
    return replace(_described(stored), root=dest, files=tuple(f.name for f in stored.files))


def _stored(sink: Sink, collection: str, ref: str) -> StoredVersion:
    stored = sink.resolve(collection, ref)
    if stored is None:
        raise PromotionRefused(f"{collection}:{ref} does not exist on W&B")
    return stored


def _described(stored: StoredVersion) -> FetchedVersion:
    facts = metadata.decode(stored.metadata)
    return FetchedVersion(
        collection=stored.collection,
        version=stored.version,
        qualified=stored.label,
        step=None if facts is None else facts.step,
        metrics={} if facts is None else dict(facts.metrics),
        url=stored.url,
    )
