"""Bring a published version's files and metadata back from W&B, for promotion targets
that need the bytes (a Hugging Face release). The W&B sink's `download`, until the sink
contract carries one.

Files are downloaded with the public API (`skip_cache=True`: no cache copy) into a
directory the caller owns, and each is checked against the manifest's size and md5.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ckptd.errors import PromotionRefused, PublishError
from ckptd.hashing import md5_b64
from ckptd.sinks.wandb import WandbSink

__all__ = ["FetchedVersion", "fetch_version", "resolve_version"]


@dataclass(frozen=True)
class FetchedVersion:
    """A version as ckptd published it: its number, step and metrics from its metadata,
    the link to it on W&B, and (after `fetch_version`) its files under `root`."""

    collection: str
    type: str
    version: str
    qualified: str  # entity/project/collection:v3
    step: int | None
    metrics: dict[str, Any] = field(default_factory=dict)
    url: str | None = None
    root: Path | None = None
    files: tuple[str, ...] = ()


def resolve_version(sink: WandbSink, collection: str, type: str, ref: str) -> FetchedVersion:
    """What `collection:ref` (an alias or `vN`) names; PublishError(transient=False) if it
    does not exist."""
    artifact = _lookup(sink, collection, type, ref)
    return _described(artifact, collection, type)


def fetch_version(
    sink: WandbSink, collection: str, type: str, ref: str, dest: Path
) -> FetchedVersion:
    """Download `collection:ref` into the empty directory `dest` and verify every file."""
    artifact = _lookup(sink, collection, type, ref)
    label = f"{collection}:{artifact.version}"
    entries = artifact.manifest.entries
    for name, entry in entries.items():
        path = PurePosixPath(name)
        if path.is_absolute() or ".." in path.parts or getattr(entry, "ref", None) is not None:
            raise PromotionRefused(f"{label}: cannot promote a file named {name!r}")
    try:
        artifact.download(root=str(dest), skip_cache=True)
    except Exception as exc:
        raise sink.classify(exc, f"downloading {label}") from exc
    for name, entry in sorted(entries.items()):
        local = dest / name
        whole = local.is_file() and local.stat().st_size == entry.size
        if not whole or md5_b64(local) != entry.digest:
            raise PublishError(f"{label}: {name} downloaded corrupt or incomplete", transient=True)
    found = _described(artifact, collection, type)
    return FetchedVersion(**{**found.__dict__, "root": dest, "files": tuple(sorted(entries))})


def _lookup(sink: WandbSink, collection: str, type: str, ref: str) -> Any:
    try:
        artifact = sink.artifact(collection, type, ref)
    except Exception as exc:
        raise sink.classify(exc, f"looking up {collection}:{ref}") from exc
    if artifact is None:
        raise PromotionRefused(f"{collection}:{ref} does not exist on W&B")
    return artifact


def _described(artifact: Any, collection: str, type: str) -> FetchedVersion:
    metadata = artifact.metadata or {}
    step = metadata.get("step")
    metrics = metadata.get("metrics")
    return FetchedVersion(
        collection=collection,
        type=type,
        version=artifact.version,
        qualified=artifact.qualified_name,
        step=step if isinstance(step, int) and not isinstance(step, bool) else None,
        metrics=metrics if isinstance(metrics, dict) else {},
        url=getattr(artifact, "url", None),
    )
