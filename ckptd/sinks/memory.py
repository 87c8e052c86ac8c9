"""A sink that keeps versions in memory, with W&B's semantics: what the coordinator's tests
publish to, and the second implementation that keeps the sink contract honest.

Like W&B it numbers versions in creation order, keeps an alias on one version of a
collection, puts `latest` on the newest version it creates, deduplicates content and keys,
and commits a collection's submitted versions in submission order (`submit` returns at once;
`Pending.result()` commits). Faults are injected per operation with `fail`; every call is
recorded in `calls` so a test can read the order things happened in.
"""

from __future__ import annotations

import threading
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptd.errors import PublishError, VersionLinked
from ckptd.sinks import (
    Capabilities,
    PublishedVersion,
    PublishRequest,
    RemoteVersion,
    StoredFile,
    StoredVersion,
    metadata,
)

__all__ = ["MemorySink", "StoredInMemory"]


@dataclass
class StoredInMemory:
    """One version: its files' bytes and md5s, aliases and metadata."""

    index: int
    files: dict[str, tuple[bytes, str]]  # name -> (bytes, md5)
    aliases: set[str]
    metadata: dict[str, Any]
    key: str | None
    links: list[str] = field(default_factory=list)
    deleted: bool = False

    @property
    def version(self) -> str:
        return f"v{self.index}"

    @property
    def content(self) -> frozenset[tuple[str, str]]:
        return frozenset((name, md5) for name, (_, md5) in self.files.items())


class _Pending:
    def __init__(self, sink: MemorySink, request: PublishRequest, ticket: int) -> None:
        self._sink = sink
        self._request = request
        self._ticket = ticket

    def result(self) -> PublishedVersion:
        return self._sink._commit(self._request, self._ticket)


class MemorySink:
    """Versions in memory. Thread-safe; `capabilities` may be narrowed by a test."""

    def __init__(self, capabilities: Capabilities | None = None) -> None:
        self.capabilities = capabilities or Capabilities(pipelines=True)
        self.collections: dict[str, list[StoredInMemory]] = {}
        self.calls: list[tuple[str, str, str]] = []  # (operation, collection, detail)
        self.unreachable: str | None = None
        self._faults: dict[str, list[PublishError]] = {}
        self._tickets: dict[str, list[int]] = {}  # collection -> submitted, uncommitted
        self._next_ticket = 0
        self._lock = threading.Lock()
        self.closed = False

    # -- test controls ---------------------------------------------------------------------

    def fail(self, operation: str, error: PublishError, times: int = 1) -> None:
        """The next `times` calls of `operation` ("submit", "commit", "move_alias",
        "versions", "links", "delete_version", "resolve", "download") raise `error`."""
        with self._lock:
            self._faults.setdefault(operation, []).extend([error] * times)

    def heal(self) -> None:
        """Drop every fault still armed."""
        with self._lock:
            self._faults.clear()

    def link(self, collection: str, version: str, target: str) -> None:
        """Link `version` into another collection, as a registry link would."""
        with self._lock:
            self._find(collection, version).links.append(target)

    def alias_holder(self, collection: str, alias: str) -> str | None:
        with self._lock:
            for stored in self.collections.get(collection, []):
                if alias in stored.aliases and not stored.deleted:
                    return stored.version
        return None

    def live(self, collection: str) -> list[StoredInMemory]:
        with self._lock:
            return [v for v in self.collections.get(collection, []) if not v.deleted]

    # -- the Sink contract -----------------------------------------------------------------

    def submit(self, request: PublishRequest) -> _Pending:
        self._call("submit", request.collection, ",".join(f.name for f in request.files))
        with self._lock:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._tickets.setdefault(request.collection, []).append(ticket)
        return _Pending(self, request, ticket)

    def publish(self, request: PublishRequest) -> PublishedVersion:
        return self.submit(request).result()

    def _commit(self, request: PublishRequest, ticket: int) -> PublishedVersion:
        collection = request.collection
        with self._lock:
            queue = self._tickets.get(collection, [])
            if not queue or queue[0] != ticket:
                raise AssertionError(f"{collection}: committed out of submission order")
            queue.pop(0)
        self._call("commit", collection, f"step {request.facts.step}")
        files = {f.name: (f.path.read_bytes(), f.md5_b64) for f in request.files}
        with self._lock:
            versions = self.collections.setdefault(collection, [])
            content = frozenset((name, md5) for name, (_, md5) in files.items())
            for stored in versions:
                if not stored.deleted and (
                    stored.content == content or (request.key and stored.key == request.key)
                ):
                    self._put_aliases(versions, stored, request.aliases)
                    return PublishedVersion(stored.version)
            stored = StoredInMemory(
                len(versions), files, set(), metadata.encode(request), request.key
            )
            versions.append(stored)
            self._put_aliases(versions, stored, (*request.aliases, "latest"))
            return PublishedVersion(stored.version)

    def problem(self, now: float) -> str | None:
        return self.unreachable

    def recorded(self, collection: str, keys: Collection[str]) -> set[str]:
        return set(keys)

    def move_alias(self, collection: str, type: str, alias: str, version: str) -> None:
        self._call("move_alias", collection, f"{alias} -> {version}")
        if not self.capabilities.moves_aliases:
            raise PublishError("this sink cannot move aliases", transient=False)
        with self._lock:
            versions = self.collections.get(collection, [])
            self._put_aliases(versions, self._find(collection, version), (alias,))

    def versions(self, collection: str, type: str) -> list[RemoteVersion]:
        self._call("versions", collection, "")
        if not self.capabilities.lists_versions:
            raise PublishError("this sink cannot list versions", transient=False)
        with self._lock:
            listed = [v for v in self.collections.get(collection, []) if not v.deleted]
            return [_remote(v) for v in listed]

    def links(self, collection: str, type: str, version: str) -> tuple[str, ...]:
        self._call("links", collection, version)
        with self._lock:
            try:
                return tuple(self._find(collection, version).links)
            except KeyError:
                return ()

    def delete_version(self, collection: str, type: str, version: str) -> None:
        self._call("delete_version", collection, version)
        with self._lock:
            try:
                stored = self._find(collection, version)
            except KeyError:
                return
            if stored.links:
                raise VersionLinked(f"{collection}:{version} is linked to {stored.links[0]}")
            stored.deleted = True
            stored.aliases.clear()

    def resolve(self, collection: str, ref: str) -> StoredVersion | None:
        self._call("resolve", collection, ref)
        with self._lock:
            for stored in self.collections.get(collection, []):
                if not stored.deleted and ref in (stored.version, *stored.aliases):
                    files = tuple(
                        StoredFile(name, len(data), md5)
                        for name, (data, md5) in sorted(stored.files.items())
                    )
                    label = f"memory/{collection}:{stored.version}"
                    return StoredVersion(
                        collection, stored.version, label, files, stored, stored.metadata
                    )
        return None

    def download(self, version: StoredVersion, dest: Path) -> None:
        self._call("download", version.collection, version.version)
        for name, (data, _) in version.handle.files.items():
            path = dest / name
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("wb") as out:
                out.write(data)

    def close(self) -> None:
        self.closed = True

    # -- internals -------------------------------------------------------------------------

    def _call(self, operation: str, collection: str, detail: str) -> None:
        with self._lock:
            self.calls.append((operation, collection, detail))
            faults = self._faults.get(operation)
            error = faults.pop(0) if faults else None
        if error is not None:
            raise error

    def _find(self, collection: str, version: str) -> StoredInMemory:
        for stored in self.collections.get(collection, []):
            if stored.version == version and not stored.deleted:
                return stored
        raise KeyError(f"{collection}:{version}")

    @staticmethod
    def _put_aliases(
        versions: list[StoredInMemory], stored: StoredInMemory, aliases: tuple[str, ...]
    ) -> None:
        for alias in aliases:
            for other in versions:
                other.aliases.discard(alias)
            stored.aliases.add(alias)


def _remote(stored: StoredInMemory) -> RemoteVersion:
    ours = metadata.decode(stored.metadata)
    return RemoteVersion(
        version=stored.version,
        index=stored.index,
        step=None if ours is None else ours.step,
        aliases=tuple(sorted(stored.aliases)),
        size=sum(len(data) for data, _ in stored.files.values()),
        linked=False,
        metrics={} if ours is None else ours.metrics,
    )
