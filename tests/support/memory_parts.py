"""An in-memory `PartsSink` over a `MemorySink`, shared by several "hosts" in one test.

It keeps what W&B keeps for distributed versions: each rank's upserted files per distributed
id (a later upsert of the same rank replaces its part), the rendezvous records, and at
`finish` one committed version holding the union of the parts (once: a second finish returns
the committed version). `fail(operation, error, after=...)` arms a fault: raised before the
operation, or after it took effect (`after=True`: the answer is lost).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace

from ckptd.errors import PublishError
from ckptd.sinks import PublishedVersion, PublishRequest, SinkFile
from ckptd.sinks.distributed import Part, Place, Rendezvous
from ckptd.sinks.memory import MemorySink

__all__ = ["MemoryParts", "PartsStore"]


@dataclass
class PartsStore:
    """What the server holds, shared by every host's MemoryParts."""

    sink: MemorySink
    files: dict[str, dict[int, tuple[SinkFile, ...]]] = field(default_factory=dict)
    parts: dict[tuple[str, int], dict[int, Part]] = field(default_factory=dict)
    committed: dict[tuple[str, int], str] = field(default_factory=dict)
    abandoned: dict[tuple[str, int], tuple[int, ...]] = field(default_factory=dict)
    faults: dict[str, list[tuple[PublishError, bool]]] = field(default_factory=dict)
    calls: list[tuple[str, int, int]] = field(default_factory=list)  # (operation, rank, step)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(self, operation: str, error: PublishError, *, after: bool = False) -> None:
        """The next `operation` ("upsert", "rendezvous", "finish", "abandon") raises."""
        with self.lock:
            self.faults.setdefault(operation, []).append((error, after))


class MemoryParts:
    """One host's view of the shared `PartsStore`."""

    def __init__(self, store: PartsStore) -> None:
        self.store = store

    def upsert(self, request: PublishRequest, place: Place, part: Part) -> None:
        def act() -> None:
            for f in request.files:  # read now, as an upload would
                f.path.read_bytes()
            if (request.collection, place.step) in self.store.committed:
                return  # a patch after the commit is refused; nothing changes
            did = place.distributed_id(request.collection)
            self.store.files.setdefault(did, {})[place.rank] = request.files
            self.store.parts.setdefault((request.collection, place.step), {})[place.rank] = part

        self._run("upsert", place, act)

    def rendezvous(self, collection: str, place: Place) -> Rendezvous:
        def act() -> Rendezvous:
            key = (collection, place.step)
            return Rendezvous(
                dict(self.store.parts.get(key, {})),
                self.store.committed.get(key),
                self.store.abandoned.get(key),
            )

        return self._run("rendezvous", place, act)

    def finish(self, request: PublishRequest, place: Place) -> PublishedVersion:
        def act() -> PublishedVersion:
            key = (request.collection, place.step)
            done = self.store.committed.get(key)
            if done is not None:
                return PublishedVersion(done)
            parts = self.store.files.get(place.distributed_id(request.collection), {})
            files = tuple(f for rank in sorted(parts) for f in parts[rank])
            result = self.store.sink.publish(replace(request, files=files))
            assert result.version is not None
            self.store.committed[key] = result.version
            return result

        return self._run("finish", place, act)

    def abandon(self, collection: str, place: Place, missing: tuple[int, ...]) -> None:
        def act() -> None:
            self.store.abandoned[(collection, place.step)] = missing

        self._run("abandon", place, act)

    def _run(self, operation: str, place: Place, act):  # type: ignore[no-untyped-def]
        with self.store.lock:
            self.store.calls.append((operation, place.rank, place.step))
            faults = self.store.faults.get(operation)
            error, after = faults.pop(0) if faults else (None, False)
            if error is not None and not after:
                raise error
            result = act()
        if error is not None:
            raise error
        return result
