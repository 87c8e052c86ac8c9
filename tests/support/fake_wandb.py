"""A stateful loopback fake of the W&B server, for driving the real wandb 0.31 SDK in tests.

The SDK (through its Go helper ``wandb-core``) talks to four kinds of endpoints, all served here
on ``127.0.0.1`` by a :class:`http.server.ThreadingHTTPServer` on a daemon thread:

* ``POST /graphql``: every query and mutation the SDK needs for ``wandb.init``/``finish``,
  ``log_artifact`` + ``wait``, and the public ``wandb.Api`` artifact calls. The operation is
  taken from ``operationName`` or, when that is empty (Python-side calls), from the query text.
  Operations this fake does not know are answered with a GraphQL error, never ``{}``, and
  recorded in :attr:`FakeWandbServer.unknown_operations`, so a protocol change fails loudly.
* ``PUT /storage/<object>``: upload URLs handed out by ``CreateArtifactFiles``,
  ``CreateArtifactManifest`` and ``CreateRunFiles``. Bodies are streamed to files under a
  directory the server owns and checked against ``Content-MD5`` (400 on mismatch). Multipart
  parts go to ``PUT /storage/<object>?partNumber=N&uploadId=U``.
* ``GET /storage/<object>``: the ``directUrl`` of stored files (``Range`` is honoured), so
  ``artifact.download()`` and ``artifact.manifest`` read back what was uploaded.
* ``POST /files/<entity>/<project>/<run>/file_stream``: answered 200 with an empty result.
  Anything else (e.g. ``/sdk/otel/v1/metrics``) gets 404.

The server owns the semantics a real one owns: projects, runs, artifact types, collections per
(entity, project, name), version numbers in ``CreateArtifact`` order, aliases unique within a
collection, ``latest`` on the newest created version, digest deduplication against committed
versions, idempotent ``CreateArtifact`` retries (same ``clientID``), commits that require every
manifest file to be stored, refusal to delete a version that holds aliases unless
``deleteAliases`` is set, ``ProjectArtifacts`` listing committed versions only, and lineage:
every run whose ``CreateArtifact`` landed on a version (its creator, and any run that declared
the same content as an output, as ``wandb.Api().run(path).log_artifact(artifact)`` does) is
one of the version's output runs. Tests create runs with ``wandb.init`` (``UpsertBucket``) or
with :meth:`FakeWandbServer.create_run`; the public API reads them with the ``Run`` query, lists
a project's runs with ``Runs`` (filtered by group, job type or name) and writes a run's config,
group and summary with ``UpsertBucket`` naming the run by its storage id (``Run.update()``).

Tests inspect state through snapshots (:meth:`FakeWandbServer.versions`, ...) and inject faults
(:meth:`FakeWandbServer.inject`). Only the standard library is used.

Example::

    with FakeWandbServer() as server:
        for key, value in server.env(tmp_path).items():
            monkeypatch.setenv(key, value)
        ...  # run the SDK (preferably in a subprocess)
        assert [v.version for v in server.versions("ckpt")] == ["v0", "v1"]
        assert server.alias_holder("ckpt", "latest") == "v1"
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import gzip
import hashlib
import io
import json
import logging
import os
import queue
import random
import re
import shutil
import socket
import struct
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Self
from urllib.parse import parse_qs, quote, unquote, urlsplit

__all__ = [
    "API_KEY",
    "DEFAULT_ENTITY",
    "DEFAULT_ORG",
    "CollectionInfo",
    "FakeWandbServer",
    "Fault",
    "GraphQLError",
    "RegistryMember",
    "RequestRecord",
    "RunInfo",
    "TimedRequest",
    "VersionInfo",
    "operation_names",
]

logger = logging.getLogger(__name__)

API_KEY = "fakewandbtestkey" + "0" * 24
"""The 40-character API key the server accepts by default."""

DEFAULT_ENTITY = "fake-entity"
DEFAULT_ORG = "fake-org"  # the organization of the default entity; registries live under it
"""The viewer's entity, used when a request names none."""

_CHUNK = 1024 * 1024
_MAX_GRAPHQL_BODY = 64 * 1024 * 1024
_MAX_FAULTS = 256
_MAX_DELAY_SECONDS = 300.0
_OP_NAME_RE = re.compile(r"\b(query|mutation)\s+(\w+)")
_VERSION_RE = re.compile(r"^v(\d+)$")

Json = dict[str, Any]


class GraphQLError(Exception):
    """Raised by an operation handler; answered as ``{"errors": [{"message": ...}]}``."""


# --------------------------------------------------------------------------------------------
# Public records and snapshots.


class RequestRecord(NamedTuple):
    """One request as the server saw it: ``(method, path, operation)``.

    ``path`` excludes the query string; ``operation`` is the GraphQL operation name for
    ``/graphql`` and ``None`` otherwise.
    """

    method: str
    path: str
    operation: str | None


class TimedRequest(NamedTuple):
    """A :class:`RequestRecord` with ``at``, the ``time.time()`` at which it arrived (before
    its body was read), for benchmarks that time a client against the server's view."""

    at: float
    method: str
    path: str
    operation: str | None


@dataclass(frozen=True)
class VersionInfo:
    """A snapshot of one artifact version, safe to read after the server moved on."""

    id: str
    entity: str
    project: str
    collection: str
    type: str
    index: int
    aliases: frozenset[str]
    digest: str
    state: str
    metadata: Mapping[str, Any]
    description: str | None
    ttl_duration_seconds: int | None
    """The TTL the client set: seconds, ``-2`` for disabled, ``None`` when inherited."""
    tags: tuple[str, ...]
    run: str | None
    files: Mapping[str, Path]
    """Artifact file name -> path of the stored bytes (uploaded or deduplicated)."""
    manifest: Mapping[str, Any] | None
    """The parsed ``wandb_manifest.json`` the client uploaded, once it arrived."""
    output_runs: frozenset[str] = frozenset()
    """Ids of the runs the version is an output of: the run that created it, and every run
    that logged the same content to the collection later (lineage)."""

    @property
    def version(self) -> str:
        """The version name, ``"v<index>"``."""
        return f"v{self.index}"

    def file_md5(self, name: str) -> str:
        """Hex md5 of the stored bytes of artifact file ``name`` (read from disk now)."""
        digest = hashlib.md5()
        with self.files[name].open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def read_bytes(self, name: str) -> bytes:
        """The stored bytes of artifact file ``name``; for small files only."""
        return self.files[name].read_bytes()


@dataclass(frozen=True)
class CollectionInfo:
    """A snapshot of one artifact collection (an artifact sequence)."""

    id: str
    entity: str
    project: str
    name: str
    type: str
    description: str | None
    version_count: int
    """Versions ever created, deleted ones included (the next index)."""


@dataclass(frozen=True)
class RegistryMember:
    """A snapshot of one version linked into a registry collection (a portfolio)."""

    index: int
    """Its version number within the registry collection (``v<index>``)."""
    source: str
    """The linked version as ``collection:vN`` of its source collection."""
    aliases: frozenset[str]
    metadata: Mapping[str, Any]

    @property
    def version(self) -> str:
        return f"v{self.index}"


@dataclass(frozen=True)
class RunInfo:
    """A snapshot of one run (a W&B "bucket")."""

    id: str
    entity: str
    project: str
    name: str
    display_name: str | None
    state: str | None
    files: Mapping[str, Path]
    """Run file name -> path of the uploaded bytes."""
    file_stream_posts: int
    complete: bool
    """Whether a file_stream post said ``complete: true``."""
    used_artifacts: tuple[str, ...]
    """Ids of the artifact versions the run declared as inputs (``use_artifact``)."""
    job_type: str | None = None
    logged_artifacts: tuple[str, ...] = ()
    """Ids of the artifact versions the run is an output of (deleted ones too), oldest first."""
    group: str | None = None
    config: Mapping[str, Any] = field(default_factory=dict)
    """The run's config as stored (``{key: {"value": ..., "desc": ...}}``)."""


@dataclass
class Fault:
    """A fault armed by :meth:`FakeWandbServer.inject`; ``remaining`` counts down to 0."""

    match: str
    status: int | None
    retry_after: float | None
    delay: float | None
    reset: bool
    after: bool
    remaining: int
    hits: int = 0

    def matches(self, path: str, operation: str | None) -> bool:
        """Whether a request with ``path`` and GraphQL ``operation`` is a target."""
        if self.match.startswith("/"):
            return path.startswith(self.match)
        return operation == self.match


# --------------------------------------------------------------------------------------------
# Internal state.


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _gql_id(kind: str, number: int) -> str:
    return base64.b64encode(f"{kind}:{number}".encode()).decode()


def _gql_number(gql_id: str) -> int:
    """The number inside an id made by :func:`_gql_id` (``projectId`` is such a number)."""
    return int(base64.b64decode(gql_id).decode().rpartition(":")[2])


@dataclass
class _Project:
    id: str
    entity: str
    name: str
    created_at: str


@dataclass
class _StorageObject:
    """Bytes behind one upload URL (artifact file, manifest, run file)."""

    id: str
    path: Path
    kind: str
    entity: str
    expected_md5: str | None = None
    md5: str | None = None  # base64, once the upload finished
    size: int = 0
    file_id: str = ""
    upload_id: str | None = None  # multipart upload in progress
    parts: dict[int, tuple[Path, str]] = field(default_factory=dict)  # n -> (path, etag)
    part_sizes: dict[int, int] = field(default_factory=dict)  # n -> bytes (discarded parts)
    discarded: bool = False  # bytes were hashed and dropped (``discard_uploads``)
    manifest: dict[str, Any] | None = None  # a patch manifest's parsed contents, once uploaded

    @property
    def uploaded(self) -> bool:
        return self.md5 is not None


@dataclass
class _Run:
    id: str
    entity: str
    project: str
    name: str
    display_name: str | None = None
    state: str | None = None
    config: str | None = None
    files: dict[str, _StorageObject] = field(default_factory=dict)
    file_stream_posts: int = 0
    complete: bool = False
    used: list[str] = field(default_factory=list)  # artifact ids, via UseArtifact
    job_type: str | None = None
    created_at: str = field(default_factory=_now)
    group: str | None = None
    summary: str | None = None  # summaryMetrics as the client sent them (a JSON string)


@dataclass
class _ArtifactType:
    id: str
    name: str


@dataclass
class _Version:
    id: str
    collection: _Collection
    index: int
    digest: str
    state: str
    created_at: str
    updated_at: str
    aliases: set[str] = field(default_factory=set)
    pending_aliases: set[str] = field(default_factory=set)
    metadata: dict[str, Any] = field(default_factory=dict)
    description: str | None = None
    ttl_duration_seconds: int | None = None
    tags: list[str] = field(default_factory=list)
    run: str | None = None
    history_step: int | None = None
    client_id: str | None = None
    files: dict[str, _StorageObject] = field(default_factory=dict)
    manifest_object: _StorageObject | None = None
    manifest_digest: str | None = None
    manifest: dict[str, Any] | None = None
    links: list[tuple[str, str, str]] = field(default_factory=list)  # registry (e, p, name)
    output_runs: list[str] = field(default_factory=list)  # run ids, creator first
    distributed_id: str | None = None  # one PENDING version per id, merged from patches
    patches: list[_StorageObject] = field(default_factory=list)  # PATCH manifests, in order

    @property
    def version(self) -> str:
        return f"v{self.index}"

    def manifest_entries(self) -> dict[str, dict[str, Any]]:
        contents = (self.manifest or {}).get("contents") or {}
        return {name: entry for name, entry in contents.items() if isinstance(entry, dict)}

    def size(self) -> int:
        return sum(int(e.get("size") or 0) for e in self.manifest_entries().values())


@dataclass
class _Membership:
    """One version linked into a portfolio: its own index there and its own aliases."""

    version: _Version
    index: int
    created_at: str
    aliases: set[str] = field(default_factory=set)


@dataclass
class _Portfolio:
    """A registry collection (``ArtifactPortfolio``): versions of other collections, linked."""

    id: str
    entity: str  # the organization's entity
    project: str  # wandb-registry-<name>
    name: str
    type: str
    created_at: str
    members: list[_Membership] = field(default_factory=list)

    def member(self, version: _Version) -> _Membership | None:
        return next((m for m in self.members if m.version is version), None)


@dataclass
class _Collection:
    id: str
    entity: str
    project: str
    name: str
    type: str
    created_at: str
    description: str | None = None
    client_id: str | None = None
    versions: list[_Version] = field(default_factory=list)

    def live(self) -> list[_Version]:
        return [v for v in self.versions if v.state != "DELETED"]

    def holder(self, alias: str) -> _Version | None:
        return next((v for v in self.live() if alias in v.aliases), None)

    def latest_committed(self) -> _Version | None:
        committed = [v for v in self.live() if v.state == "COMMITTED"]
        return committed[-1] if committed else None


class _State:
    """Everything the server knows. Callers hold :attr:`FakeWandbServer._lock`."""

    def __init__(self, default_entity: str) -> None:
        self.default_entity = default_entity
        self.counter = 0
        self.projects: dict[tuple[str, str], _Project] = {}
        self.runs: dict[tuple[str, str, str], _Run] = {}
        self.types: dict[tuple[str, str, str], _ArtifactType] = {}
        self.collections: dict[tuple[str, str, str], _Collection] = {}
        self.versions_by_id: dict[str, _Version] = {}
        self.objects: dict[str, _StorageObject] = {}
        self.blobs: dict[tuple[str, str], _StorageObject] = {}  # (entity, md5) -> object
        self.client_ids: dict[str, str] = {}
        self.alias_ids: dict[tuple[str, str], str] = {}  # (collection id, alias) -> id
        self.created_versions = 0
        self.portfolios: dict[tuple[str, str, str], _Portfolio] = {}  # (org entity, p, name)

    def next_id(self, kind: str) -> str:
        self.counter += 1
        return _gql_id(kind, self.counter)

    def project(self, entity: str | None, name: str | None) -> _Project:
        entity = entity or self.default_entity
        name = name or "uncategorized"
        key = (entity, name)
        if key not in self.projects:
            self.projects[key] = _Project(self.next_id("Project"), entity, name, _now())
        return self.projects[key]

    def find_project(self, entity: str | None, name: str | None) -> _Project | None:
        return self.projects.get((entity or self.default_entity, name or "uncategorized"))

    def artifact_type(self, project: _Project, name: str) -> _ArtifactType:
        key = (project.entity, project.name, name)
        if key not in self.types:
            self.types[key] = _ArtifactType(self.next_id("ArtifactType"), name)
        return self.types[key]

    def collection(self, entity: str | None, project: str | None, name: str) -> _Collection | None:
        return self.collections.get((entity or self.default_entity, project or "", name))

    def version(self, artifact_id: str | None) -> _Version:
        version = self.versions_by_id.get(artifact_id or "")
        if version is None or version.state == "DELETED":
            raise GraphQLError(f"artifact {artifact_id!r} not found")
        return version

    def resolve(self, collection: _Collection, alias: str) -> _Version | None:
        """A live version of ``collection`` by ``vN`` or by alias."""
        if match := _VERSION_RE.match(alias):
            index = int(match.group(1))
            return next((v for v in collection.live() if v.index == index), None)
        return collection.holder(alias)

    def alias_id(self, collection: _Collection, alias: str) -> str:
        return self.alias_id_in(collection.id, alias)

    def alias_id_in(self, collection_id: str, alias: str) -> str:
        key = (collection_id, alias)
        if key not in self.alias_ids:
            self.alias_ids[key] = self.next_id("ArtifactAlias")
        return self.alias_ids[key]

    def link(
        self, version: _Version, entity: str, registry: str, name: str, aliases: list[str]
    ) -> tuple[_Portfolio, _Membership]:
        """Link ``version`` into the portfolio ``entity/registry/name`` (created on first
        use) as W&B does: one membership per version and portfolio (linking again returns
        it), each alias unique within the portfolio, ``latest`` on the newest membership."""
        if not registry.startswith("wandb-registry-"):
            raise GraphQLError(f"{registry!r} is not a registry project")
        key = (entity, registry, name)
        portfolio = self.portfolios.get(key)
        if portfolio is None:
            portfolio = _Portfolio(
                self.next_id("ArtifactPortfolio"), entity, registry, name,
                version.collection.type, _now(),
            )  # fmt: skip
            self.portfolios[key] = portfolio
            self.artifact_type(self.project(entity, registry), portfolio.type)
        member = portfolio.member(version)
        if member is None:
            member = _Membership(version, len(portfolio.members), _now())
            portfolio.members.append(member)
            version.links.append((entity, registry, name))
            for other in portfolio.members:
                other.aliases.discard("latest")
            member.aliases.add("latest")
        for alias in aliases:
            if _VERSION_RE.match(alias) or not alias or len(alias) > 128:
                raise GraphQLError(f"invalid alias {alias!r}")
            for other in portfolio.members:
                other.aliases.discard(alias)
            member.aliases.add(alias)
        return portfolio, member

    def memberships(self, version: _Version) -> list[tuple[_Portfolio, _Membership]]:
        """Each registry collection ``version`` is linked into, with its membership there."""
        found = []
        for key in version.links:
            member = self.portfolios[key].member(version)
            assert member is not None
            found.append((self.portfolios[key], member))
        return found

    def resolve_member(self, portfolio: _Portfolio, ref: str) -> _Membership | None:
        """A live member of ``portfolio`` by ``vN`` or by alias."""
        live = [m for m in portfolio.members if m.version.state != "DELETED"]
        if match := _VERSION_RE.match(ref):
            return next((m for m in live if m.index == int(match.group(1))), None)
        return next((m for m in live if ref in m.aliases), None)

    def set_alias(self, version: _Version, alias: str) -> None:
        """Give ``alias`` to ``version``, taking it from any other version of the collection."""
        if _VERSION_RE.match(alias):
            raise GraphQLError(f"alias {alias!r} is reserved for version numbers")
        if not alias or len(alias) > 128:
            raise GraphQLError(f"invalid alias {alias!r}")
        for other in version.collection.versions:
            other.aliases.discard(alias)
        version.aliases.add(alias)
        version.updated_at = _now()


# --------------------------------------------------------------------------------------------
# GraphQL response shapes (the fields the 0.31 queries select; extra fields are ignored).


def _page(items: list[Any], variables: Json, default_per_page: int = 50) -> tuple[list[Any], Json]:
    """Slice ``items`` by the ``cursor``/``perPage`` variables; return it and its pageInfo."""
    start = int(variables.get("cursor") or 0)
    per_page = int(variables.get("perPage") or default_per_page)
    chunk = items[start : start + per_page]
    end = start + len(chunk)
    info = {"__typename": "PageInfo", "endCursor": str(end), "hasNextPage": end < len(items)}
    return chunk, info


def _project_json(project: _Project) -> Json:
    return {
        "__typename": "Project",
        "id": project.id,
        "internalId": project.id,
        "name": project.name,
        "entity": {"id": _gql_id("Entity", 1), "name": project.entity},
    }


def _collection_info_json(state: _State, collection: _Collection) -> Json:
    project = state.project(collection.entity, collection.project)
    return {
        "__typename": "ArtifactSequence",
        "id": collection.id,
        "name": collection.name,
        "project": _project_json(project),
    }


def _collection_json(state: _State, collection: _Collection) -> Json:
    latest = collection.latest_committed()
    return {
        **_collection_info_json(state, collection),
        "description": collection.description,
        "createdAt": collection.created_at,
        "updatedAt": collection.created_at,
        "type": {"name": collection.type},
        "defaultArtifactType": {"name": collection.type},
        "tags": {"edges": []},
        "state": "READY",
        "latestArtifact": {"id": latest.id} if latest else None,
    }


def _alias_json(state: _State, version: _Version, alias: str) -> Json:
    return {
        "__typename": "ArtifactAlias",
        "id": state.alias_id(version.collection, alias),
        "alias": alias,
        "artifactCollectionName": version.collection.name,
        "artifactCollection": _collection_info_json(state, version.collection),
    }


def _artifact_json(state: _State, version: _Version) -> Json:
    ttl = version.ttl_duration_seconds
    return {
        "__typename": "Artifact",
        "id": version.id,
        "artifactSequence": {
            **_collection_info_json(state, version.collection),
            "latestArtifact": _latest_ref(version.collection),
        },
        "versionIndex": version.index,
        "artifactType": {"name": version.collection.type},
        "description": version.description,
        "metadata": json.dumps(version.metadata),
        "ttlDurationSeconds": ttl if ttl is not None else -2,
        "ttlIsInherited": ttl is None,
        "tags": [
            {"__typename": "Tag", "id": _gql_id("Tag", i), "name": t}
            for i, t in enumerate(version.tags)
        ],
        "historyStep": version.history_step,
        "state": version.state,
        "size": version.size(),
        "digest": version.digest,
        "digestAlgorithm": "MANIFEST_MD5",
        "commitHash": hashlib.sha1(version.id.encode()).hexdigest()[:12],
        "fileCount": len(version.manifest_entries()),
        "createdAt": version.created_at,
        "updatedAt": version.updated_at,
        "aliases": [_alias_json(state, version, a) for a in sorted(version.aliases)]
        + [
            {
                "__typename": "ArtifactAlias",
                "id": state.alias_id_in(portfolio.id, alias),
                "alias": alias,
                "artifactCollectionName": portfolio.name,
                "artifactCollection": _portfolio_info_json(state, portfolio),
            }
            for portfolio, member in state.memberships(version)
            for alias in sorted(member.aliases)
        ],
    }


def _latest_ref(collection: _Collection) -> Json | None:
    latest = collection.latest_committed()
    return {"id": latest.id} if latest else None


def _membership_json(state: _State, version: _Version) -> Json:
    return {
        "__typename": "ArtifactCollectionMembership",
        "id": base64.b64encode(
            f"ArtifactCollectionMembership:{version.collection.id}:{version.index}".encode()
        ).decode(),
        "versionIndex": version.index,
        "createdAt": version.created_at,
        "aliases": [
            {
                "__typename": "ArtifactAlias",
                "id": state.alias_id(version.collection, a),
                "alias": a,
            }
            for a in sorted(version.aliases)
        ],
        "artifactCollection": _collection_info_json(state, version.collection),
        "artifact": _artifact_json(state, version),
    }


def _portfolio_info_json(state: _State, portfolio: _Portfolio) -> Json:
    return {
        "__typename": "ArtifactPortfolio",
        "id": portfolio.id,
        "name": portfolio.name,
        "project": _project_json(state.project(portfolio.entity, portfolio.project)),
    }


def _link_membership_json(state: _State, portfolio: _Portfolio, member: _Membership) -> Json:
    """A version as a member of a registry collection: its index and aliases there."""
    return {
        "__typename": "ArtifactCollectionMembership",
        "id": base64.b64encode(
            f"ArtifactCollectionMembership:{portfolio.id}:{member.index}".encode()
        ).decode(),
        "versionIndex": member.index,
        "createdAt": member.created_at,
        "aliases": [
            {"__typename": "ArtifactAlias", "id": state.alias_id_in(portfolio.id, a), "alias": a}
            for a in sorted(member.aliases)
        ],
        "artifactCollection": _portfolio_info_json(state, portfolio),
        "artifact": _artifact_json(state, member.version),
    }


def _viewer_json(entity: str) -> Json:
    return {
        "id": _gql_id("User", 1),
        "name": "Fake User",
        "username": entity,
        "email": f"{entity}@example.invalid",
        "admin": False,
        "flags": "{}",
        "entity": entity,
        "deletedAt": None,
        "apiKeys": {"edges": []},
        "teams": {"edges": []},
    }


# --------------------------------------------------------------------------------------------
# The server.


class FakeWandbServer:
    """A loopback W&B server with real state, inspection helpers and fault injection.

    Construction is cheap; :meth:`start` binds ``127.0.0.1`` on a free port and serves on a
    daemon thread, :meth:`stop` shuts it down (also via ``with``). All inspection methods return
    snapshots taken under the server's lock, so they are safe while the SDK is uploading.
    """

    def __init__(
        self,
        *,
        api_key: str = API_KEY,
        entity: str = DEFAULT_ENTITY,
        features: Mapping[str, bool] | None = None,
        storage_dir: str | os.PathLike[str] | None = None,
        dedup_files: bool = True,
        aliases_on_commit: bool = False,
        discard_uploads: bool = False,
        verify_uploads: bool = True,
    ) -> None:
        """Prepare a server; nothing is bound until :meth:`start`.

        Args:
            api_key: The only key accepted in ``Authorization: Basic base64("api:<key>")``.
            entity: The viewer's (default) entity.
            features: ``serverInfo.features`` to advertise (name -> enabled); none by default.
            storage_dir: Where uploaded bytes go; a temp dir removed by :meth:`stop` if unset.
            dedup_files: Answer ``uploadUrl: null`` for a file whose md5 the entity already
                stored (as the real server does); the version then shares those bytes.
            aliases_on_commit: Hold the aliases of a new version (``latest`` included) until
                ``CommitArtifact``, so a version whose upload never finishes takes no alias.
                By default they apply at ``CreateArtifact``, as the protocol notes describe.
            discard_uploads: Hash the bytes of artifact files (and of multipart parts) and drop
                them instead of writing them to ``storage_dir``, so that a benchmark measures
                the client, not this server's disk. ``Content-MD5`` is still checked;
                manifests and run files are still stored. Discarded files cannot be
                downloaded (``GET`` answers 410), and an assembled multipart file takes the
                md5 the client declared, its parts having been checked one by one.
            verify_uploads: With ``discard_uploads``, False skips hashing the discarded bytes
                and trusts the client's ``Content-MD5`` (or the md5 it declared for the
                file): for benchmarks that must leave every core to the client. Nothing
                is verified then.

        A multipart file (over 2 GiB) is answered with an ``uploadUrl`` beside its part
        URLs, as the real server does: wandb-core skips a file whose ``uploadUrl`` is null,
        multipart or not, so a null there would let a client "pass" without sending a byte.
        """
        self.api_key = api_key
        self.entity = entity
        self.features = dict(features or {})
        self.org = DEFAULT_ORG
        self.dedup_files = dedup_files
        self.aliases_on_commit = aliases_on_commit
        self.discard_uploads = discard_uploads
        self.verify_uploads = verify_uploads
        self._storage_arg = Path(storage_dir) if storage_dir is not None else None
        self._storage: Path | None = None
        self._lock = threading.RLock()
        self._state = _State(entity)
        self._requests: list[RequestRecord] = []
        self._request_times: list[float] = []  # time.time() of each of _requests
        self._unknown: list[str] = []
        self._faults: list[Fault] = []
        self._auth_failure = False
        self._random_faults: tuple[float, random.Random, tuple[Fault, ...]] | None = None
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Self:
        """Bind 127.0.0.1 on a free port and serve on a daemon thread; returns ``self``."""
        if self._httpd is not None:
            raise RuntimeError("FakeWandbServer already started")
        if self._storage_arg is not None:
            self._storage_arg.mkdir(parents=True, exist_ok=True)
            self._storage = self._storage_arg
        else:
            self._storage = Path(tempfile.mkdtemp(prefix="fake-wandb-"))
        self._stopping.clear()
        self._httpd = _HTTPServer(("127.0.0.1", 0), _Handler, self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fake-wandb-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, wake stalled requests, join the thread and drop owned storage."""
        httpd, thread = self._httpd, self._thread
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.server_close()
        httpd.close_connections(timeout=10)
        if thread is not None:
            thread.join(timeout=10)
        self._httpd = self._thread = None
        if self._storage_arg is None and self._storage is not None:
            shutil.rmtree(self._storage, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port; only valid once started."""
        if self._httpd is None:
            raise RuntimeError("FakeWandbServer is not started")
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``, the value for ``WANDB_BASE_URL``."""
        return f"http://127.0.0.1:{self.port}"

    def env(self, tmp_path: str | os.PathLike[str]) -> dict[str, str]:
        """Environment variables pointing the SDK at this server, with dirs under ``tmp_path``.

        Apply them with ``monkeypatch.setenv`` or pass them to a subprocess.
        """
        root = Path(tmp_path)
        dirs = {
            "WANDB_DIR": root / "wandb-dir",
            "WANDB_CACHE_DIR": root / "wandb-cache",
            "WANDB_DATA_DIR": root / "wandb-data",
            "WANDB_CONFIG_DIR": root / "wandb-config",
        }
        for path in dirs.values():
            path.mkdir(parents=True, exist_ok=True)
        return {
            "WANDB_BASE_URL": self.url,
            "WANDB_API_KEY": self.api_key,
            **{name: str(path) for name, path in dirs.items()},
            "WANDB_ERROR_REPORTING": "false",
            "WANDB_DISABLE_GIT": "true",
            "WANDB_DISABLE_CODE": "true",
            "WANDB_SILENT": "true",
            "WANDB_MODE": "online",
        }

    # -- inspection --------------------------------------------------------------------------

    @property
    def requests(self) -> list[RequestRecord]:
        """A copy of every request seen so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    @property
    def timed_requests(self) -> list[TimedRequest]:
        """Like :attr:`requests`, each with the ``time.time()`` at which it arrived."""
        with self._lock:
            return [
                TimedRequest(at, *record)
                for at, record in zip(self._request_times, self._requests, strict=True)
            ]

    def operations(self) -> list[str]:
        """The GraphQL operation names seen so far, in arrival order."""
        return [r.operation for r in self.requests if r.operation]

    @property
    def unknown_operations(self) -> list[str]:
        """GraphQL operation names that were answered with "unknown operation"."""
        with self._lock:
            return list(self._unknown)

    @property
    def created_versions(self) -> int:
        """How many artifact versions ``CreateArtifact`` created (deduplicated calls excluded)."""
        with self._lock:
            return self._state.created_versions

    def collections(self) -> list[CollectionInfo]:
        """All artifact collections, in creation order."""
        with self._lock:
            return [
                CollectionInfo(
                    id=c.id,
                    entity=c.entity,
                    project=c.project,
                    name=c.name,
                    type=c.type,
                    description=c.description,
                    version_count=len(c.versions),
                )
                for c in self._state.collections.values()
            ]

    def versions(
        self,
        name: str,
        project: str | None = None,
        *,
        entity: str | None = None,
        include_deleted: bool = False,
    ) -> list[VersionInfo]:
        """Versions of collection ``name``, oldest first.

        ``project``/``entity`` narrow the search; without ``project`` the name must be unique
        across projects (``LookupError`` otherwise). An unknown collection gives ``[]``.
        """
        with self._lock:
            collection = self._find_collection(name, project, entity)
            if collection is None:
                return []
            return [
                self._snapshot(v)
                for v in collection.versions
                if include_deleted or v.state != "DELETED"
            ]

    def version(self, name: str, ref: str, project: str | None = None) -> VersionInfo | None:
        """The live version of collection ``name`` that ``ref`` (``"v3"`` or an alias) names."""
        with self._lock:
            collection = self._find_collection(name, project, None)
            found = self._state.resolve(collection, ref) if collection else None
            return self._snapshot(found) if found else None

    def alias_holder(self, collection: str, alias: str, project: str | None = None) -> str | None:
        """The version name (``"v1"``) holding ``alias`` in ``collection``, or ``None``."""
        with self._lock:
            found = self._find_collection(collection, project, None)
            holder = found.holder(alias) if found else None
            return holder.version if holder else None

    def ttl(self, name: str, ref: str, project: str | None = None) -> int | None:
        """The TTL the client set on a version: seconds, ``-2`` disabled, ``None`` inherited."""
        found = self.version(name, ref, project)
        return found.ttl_duration_seconds if found else None

    def link(
        self,
        name: str,
        ref: str,
        target: str = "wandb-registry-model/production",
        project: str | None = None,
    ) -> None:
        """Link a version into a registry collection ``target`` (``"project/collection"``), as
        ``artifact.link()`` would; ``FetchLinkedArtifacts`` then reports the link."""
        with self._lock:
            collection = self._find_collection(name, project, None)
            found = self._state.resolve(collection, ref) if collection else None
            if collection is None or found is None:
                raise LookupError(f"no live version {name}:{ref}")
            registry, _, portfolio = target.partition("/")
            self._state.link(found, self.org, registry, portfolio, [])

    def registry(self, target: str) -> list[RegistryMember]:
        """The versions linked into the registry collection ``target``
        (``"wandb-registry-model/demo"``), in link order; [] if it does not exist."""
        registry, _, name = target.partition("/")
        with self._lock:
            portfolio = self._state.portfolios.get((self.org, registry, name))
            if portfolio is None:
                return []
            return [
                RegistryMember(
                    index=m.index,
                    source=f"{m.version.collection.name}:{m.version.version}",
                    aliases=frozenset(m.aliases),
                    metadata=dict(m.version.metadata),
                )
                for m in portfolio.members
                if m.version.state != "DELETED"
            ]

    def runs(self) -> list[RunInfo]:
        """All runs created by ``UpsertBucket``, in creation order."""
        with self._lock:
            return [
                RunInfo(
                    id=r.id,
                    entity=r.entity,
                    project=r.project,
                    name=r.name,
                    display_name=r.display_name,
                    state=r.state,
                    files={n: o.path for n, o in r.files.items() if o.uploaded},
                    file_stream_posts=r.file_stream_posts,
                    complete=r.complete,
                    used_artifacts=tuple(r.used),
                    job_type=r.job_type,
                    group=r.group,
                    config=_parse_json_object(r.config),
                    logged_artifacts=tuple(
                        v.id
                        for v in self._state.versions_by_id.values()
                        if (v.collection.entity, v.collection.project) == (r.entity, r.project)
                        and r.name in v.output_runs
                    ),
                )
                for r in self._state.runs.values()
            ]

    def create_run(
        self,
        entity: str | None,
        project: str,
        run_id: str,
        *,
        job_type: str | None = "train",
        display_name: str | None = None,
        state: str = "finished",
    ) -> RunInfo:
        """Create run ``entity/project/run_id`` as a finished training run would have left it,
        without driving the SDK; an existing run is kept as it is. Returns its snapshot."""
        with self._lock:
            found = self._state.project(entity, project)
            key = (found.entity, found.name, run_id)
            if key not in self._state.runs:
                self._state.runs[key] = _Run(
                    self._state.next_id("Run"),
                    found.entity,
                    found.name,
                    run_id,
                    display_name=display_name,
                    state=state,
                    job_type=job_type,
                )
            return next(r for r in self.runs() if (r.entity, r.project, r.name) == key)

    def output_runs(self, name: str, ref: str, project: str | None = None) -> frozenset[str]:
        """Ids of the runs that version ``ref`` of collection ``name`` is an output of; empty
        if there is no such live version."""
        found = self.version(name, ref, project)
        return found.output_runs if found else frozenset()

    def _find_collection(
        self, name: str, project: str | None, entity: str | None
    ) -> _Collection | None:
        found = [
            c
            for c in self._state.collections.values()
            if c.name == name
            and (project is None or c.project == project)
            and (entity is None or c.entity == entity)
        ]
        if len(found) > 1:
            raise LookupError(f"collection {name!r} exists in several projects; pass project=")
        return found[0] if found else None

    def _snapshot(self, version: _Version) -> VersionInfo:
        collection = version.collection
        return VersionInfo(
            id=version.id,
            entity=collection.entity,
            project=collection.project,
            collection=collection.name,
            type=collection.type,
            index=version.index,
            aliases=frozenset(version.aliases),
            digest=version.digest,
            state=version.state,
            metadata=json.loads(json.dumps(version.metadata)),
            description=version.description,
            ttl_duration_seconds=version.ttl_duration_seconds,
            tags=tuple(version.tags),
            run=version.run,
            files={n: o.path for n, o in version.files.items() if o.uploaded},
            manifest=json.loads(json.dumps(version.manifest)) if version.manifest else None,
            output_runs=frozenset(version.output_runs),
        )

    # -- faults ------------------------------------------------------------------------------

    def inject(
        self,
        match: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        delay: float | None = None,
        reset: bool = False,
        after: bool = False,
        times: int = 1,
    ) -> Fault:
        """Arm a fault for the next ``times`` requests that ``match``.

        Args:
            match: A GraphQL operation name (``"CreateArtifact"``) or, when it starts with
                ``/``, an HTTP path prefix (``"/storage/"``, ``"/graphql"``).
            status: Answer with this HTTP status instead of handling the request (the request
                body is drained first). A GraphQL target gets a JSON ``errors`` body.
            retry_after: Seconds for a ``Retry-After`` header on the ``status`` answer.
            delay: Stall this many seconds, then handle the request normally (or apply
                ``status``/``reset`` if also given). Capped at 300 s; cut short by :meth:`stop`.
            reset: Close the connection abruptly (TCP RST) without any response.
            after: Apply the fault only after the request took effect: the mutation ran or
                the upload was stored, but the answer is delayed, replaced or lost.
            times: How many matching requests the fault applies to (at least 1).

        Returns:
            The armed :class:`Fault`; its ``hits`` and ``remaining`` show what happened.
        """
        if times < 1:
            raise ValueError("times must be at least 1")
        if status is None and delay is None and not reset:
            raise ValueError("inject needs status, delay or reset")
        if delay is not None and not 0 <= delay <= _MAX_DELAY_SECONDS:
            raise ValueError(f"delay must be within 0..{_MAX_DELAY_SECONDS} s")
        if status is not None and not 100 <= status <= 599:
            raise ValueError("status must be an HTTP status code")
        fault = Fault(match, status, retry_after, delay, reset, after, times)
        with self._lock:
            if len(self._faults) >= _MAX_FAULTS:
                raise RuntimeError(f"more than {_MAX_FAULTS} faults armed")
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        """Disarm every pending fault, the random ones and the auth-failure switch."""
        with self._lock:
            self._faults.clear()
            self._auth_failure = False
            self._random_faults = None

    def fail_randomly(self, rate: float, seed: int) -> None:
        """From now on, each GraphQL or storage request fails with probability ``rate``
        (drawn from ``random.Random(seed)``), as one of: HTTP 500, 503, a reset connection,
        or a 500 after the request took effect. Until :meth:`clear_faults`."""
        if not 0 <= rate <= 1:
            raise ValueError("rate must be within 0..1")
        kinds = (
            Fault("*", 500, None, None, False, False, 1),
            Fault("*", 503, None, None, False, False, 1),
            Fault("*", None, None, None, True, False, 1),
            Fault("*", 500, None, None, False, True, 1),
        )
        with self._lock:
            self._random_faults = (rate, random.Random(seed), kinds)

    def set_auth_failure(self, failing: bool = True) -> None:
        """While set, every authenticated endpoint answers 401 as for a bad API key."""
        with self._lock:
            self._auth_failure = failing

    def _take_fault(self, path: str, operation: str | None) -> Fault | None:
        with self._lock:
            if self._random_faults is not None and path.startswith(("/graphql", "/storage/")):
                rate, rng, kinds = self._random_faults
                if rng.random() < rate:
                    return rng.choice(kinds)
            for fault in self._faults:
                if fault.remaining > 0 and fault.matches(path, operation):
                    fault.remaining -= 1
                    fault.hits += 1
                    if fault.remaining == 0:
                        self._faults.remove(fault)
                    return fault
        return None

    # -- request plumbing used by the handler ------------------------------------------------

    def _record(self, method: str, path: str, operation: str | None) -> None:
        with self._lock:
            self._requests.append(RequestRecord(method, path, operation))
            self._request_times.append(time.time())

    def _authorized(self, header: str | None) -> bool:
        with self._lock:
            if self._auth_failure:
                return False
        if not header or not header.startswith("Basic "):
            return False
        try:
            decoded = base64.b64decode(header[6:], validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return False
        user, _, key = decoded.partition(":")
        return user == "api" and key == self.api_key

    def _storage_url(self, obj: _StorageObject) -> str:
        return f"{self.url}/storage/{obj.id}"

    def _new_object(self, kind: str, entity: str) -> _StorageObject:
        assert self._storage is not None
        object_id = uuid.uuid4().hex
        obj = _StorageObject(object_id, self._storage / object_id, kind, entity)
        obj.file_id = self._state.next_id("File")
        self._state.objects[object_id] = obj
        return obj

    # -- GraphQL -----------------------------------------------------------------------------

    def _graphql(self, operation: str, query: str, variables: Json) -> Json:
        """Run one operation under the lock; returns the GraphQL response document."""
        handler = _OPERATIONS.get(operation)
        if handler is None:
            with self._lock:
                self._unknown.append(operation)
            logger.warning("fake wandb: unknown GraphQL operation %s", operation)
            return {"data": None, "errors": [{"message": f"unknown operation {operation}"}]}
        try:
            with self._lock:
                return {"data": handler(self, variables, query)}
        except GraphQLError as exc:
            return {"data": None, "errors": [{"message": str(exc)}]}
        except Exception as exc:  # a bug here, or input the fake does not understand
            logger.exception("fake wandb: %s failed", operation)
            message = f"fake wandb server failed on {operation}: {exc!r}"
            return {"data": None, "errors": [{"message": message}]}

    # Viewer, runs, server info.

    def _op_viewer(self, variables: Json, query: str) -> Json:
        return {"viewer": _viewer_json(self.entity)}

    def _op_server_features(self, variables: Json, query: str) -> Json:
        features = [{"name": k, "isEnabled": v} for k, v in sorted(self.features.items())]
        return {
            "serverInfo": {
                "features": features,
                "cliVersionInfo": {},
                "latestLocalVersionInfo": None,
            }
        }

    def _op_empty_entity(self, variables: Json, query: str) -> Json:
        return {"entity": {"organization": None, "xxhashDigestsEnabled": False}}

    def _op_upsert_bucket(self, variables: Json, query: str) -> Json:
        state = self._state
        by_id = None
        if not variables.get("name") and variables.get("id"):
            # The public API's Run.update() and summary writes name the run by its storage
            # id: they update that run and never create one.
            by_id = next((r for r in state.runs.values() if r.id == variables["id"]), None)
            if by_id is None:
                raise GraphQLError(f"upsertBucket: no run with id {variables['id']!r}")
        if by_id is not None:
            run, inserted = by_id, False
            project = state.project(run.entity, run.project)
        else:
            project = state.project(variables.get("entity"), variables.get("project"))
            name = variables.get("name") or variables.get("id") or uuid.uuid4().hex[:8]
            key = (project.entity, project.name, name)
            inserted = key not in state.runs
            if inserted:
                state.runs[key] = _Run(state.next_id("Run"), project.entity, project.name, name)
            run = state.runs[key]
        for attr, var in (
            ("display_name", "displayName"),
            ("display_name", "display_name"),  # the public API's Run.update()
            ("state", "state"),
            ("config", "config"),
            ("job_type", "jobType"),
            ("group", "groupName"),
            ("summary", "summaryMetrics"),
        ):
            if variables.get(var) is not None:
                setattr(run, attr, variables[var])
        bucket = {
            "id": run.id,
            "name": run.name,
            "displayName": run.display_name or run.name,
            "description": None,
            "config": run.config or "{}",
            "sweepName": None,
            "historyLineCount": 0,
            "project": {
                "id": project.id,
                "name": project.name,
                "entity": {"id": _gql_id("Entity", 1), "name": project.entity},
            },
        }
        return {"upsertBucket": {"bucket": bucket, "inserted": inserted}}

    def _op_run_resume_status(self, variables: Json, query: str) -> Json:
        state = self._state
        project = state.find_project(variables.get("entity"), variables.get("project"))
        if project is None:
            return {"model": None}
        run = state.runs.get((project.entity, project.name, variables.get("name") or ""))
        bucket: Json | None = None
        if run is not None:
            bucket = {
                "id": run.id,
                "name": run.name,
                "summaryMetrics": "{}",
                "displayName": run.display_name,
                "logLineCount": 0,
                "historyLineCount": 0,
                "eventsLineCount": 0,
                "historyTail": "[]",
                "eventsTail": "[]",
                "config": run.config or "{}",
                "tags": [],
                "notes": None,
                "wandbConfig": "{}",
            }
        return {
            "model": {
                "id": project.id,
                "name": project.name,
                "entity": {"id": _gql_id("Entity", 1), "name": project.entity},
                "bucket": bucket,
            }
        }

    def _op_run(self, variables: Json, query: str) -> Json:
        """``api.run("e/p/id")``: the run's RunFragment, ``run: null`` if there is none."""
        state = self._state
        project = state.find_project(variables.get("entity"), variables.get("project"))
        if project is None:
            return {"project": None}
        run = state.runs.get((project.entity, project.name, variables.get("name") or ""))
        if run is None:
            return {"project": {"run": None}}
        return {"project": {"run": self._run_node(project, run)}}

    def _run_node(self, project: _Project, run: _Run) -> Json:
        """A run as the public API's RunFragment selects it."""
        return {
            "__typename": "Run",
            "projectId": _gql_number(project.id),
            "id": run.id,
            "tags": [],
            "name": run.name,
            "displayName": run.display_name or run.name,
            "sweepName": None,
            "state": run.state or "running",
            "config": run.config or "{}",
            "group": run.group,
            "jobType": run.job_type,
            "commit": None,
            "readOnly": False,
            "createdAt": run.created_at,
            "heartbeatAt": run.created_at,
            "description": None,
            "notes": None,
            "systemMetrics": "{}",
            "summaryMetrics": run.summary or "{}",
            "historyLineCount": 0,
            "user": {"name": "Fake User", "username": self.entity},
            "historyKeys": {"keys": {}, "lastStep": -1},
        }

    def _op_runs(self, variables: Json, query: str) -> Json:
        """``api.runs(path, filters=...)``: a project's runs in creation order, filtered by
        equality on group, jobType, name or displayName (other filters are an error, so
        that a caller relying on one fails loudly)."""
        state = self._state
        project = state.find_project(variables.get("entity"), variables.get("project"))
        if project is None:
            return {"project": None}
        filters = _parse_json_object(variables.get("filters"))
        fields = {"group": "group", "jobType": "job_type", "name": "name",
                  "displayName": "display_name"}  # fmt: skip
        unknown = sorted(set(filters) - set(fields))
        if unknown:
            raise GraphQLError(f"runs: the fake cannot filter by {unknown}")
        runs = [
            r
            for r in state.runs.values()
            if (r.entity, r.project) == (project.entity, project.name)
            and all(getattr(r, fields[key]) == value for key, value in filters.items())
        ]
        if variables.get("order") not in (None, "+created_at", "-created_at"):
            raise GraphQLError(f"runs: the fake cannot order by {variables.get('order')!r}")
        if variables.get("order") == "-created_at":
            runs.reverse()
        start = int(variables.get("cursor") or 0)
        chunk, info = _page(runs, variables)
        edges = [
            {"node": self._run_node(project, r), "cursor": str(start + i + 1)}
            for i, r in enumerate(chunk)
        ]
        return {
            "project": {
                "internalId": project.id,
                "runCount": len(runs),
                "readOnly": False,
                "runs": {"edges": edges, "pageInfo": info},
            }
        }

    def _op_create_run_files(self, variables: Json, query: str) -> Json:
        state = self._state
        project = state.project(variables.get("entity"), variables.get("project"))
        key = (project.entity, project.name, variables.get("run") or "")
        run = state.runs.get(key)
        if run is None:
            raise GraphQLError(f"run {key!r} not found")
        files = []
        for name in variables.get("files") or []:
            obj = self._new_object("run-file", project.entity)
            run.files[name] = obj
            files.append({"name": name, "uploadUrl": self._storage_url(obj)})
        return {"createRunFiles": {"runID": run.id, "uploadHeaders": [], "files": files}}

    def _op_mark_run_files_uploaded(self, variables: Json, query: str) -> Json:
        return {"markRunFilesUploaded": {"success": True}}

    # Artifact creation (wandb-core).

    def _op_artifact_type(self, variables: Json, query: str) -> Json:
        state = self._state
        name, _, ref = str(variables.get("name") or "").partition(":")
        collection = state.collection(variables.get("entity"), variables.get("project"), name)
        version = state.resolve(collection, ref or "latest") if collection else None
        artifact = {"artifactType": {"name": collection.type}} if version and collection else None
        return {"project": {"artifact": artifact}}

    def _op_create_artifact(self, variables: Json, query: str) -> Json:
        state = self._state
        # wandb-core sends an input object; the public API's Run.log_artifact, bare variables.
        inp: Json = variables.get("input") or variables
        project = state.project(inp.get("entityName"), inp.get("projectName"))
        type_name = inp.get("artifactTypeName") or "unspecified"
        names = inp.get("artifactCollectionNames") or [inp.get("artifactCollectionName")]
        name = names[0] if names else None
        if not name:
            raise GraphQLError("createArtifact: artifactCollectionName is required")
        state.artifact_type(project, type_name)
        key = (project.entity, project.name, name)
        collection = state.collections.get(key)
        if collection is None:
            collection = _Collection(
                state.next_id("ArtifactSequence"),
                project.entity,
                project.name,
                name,
                type_name,
                _now(),
                description=inp.get("artifactCollectionDescription"),
                client_id=inp.get("sequenceClientID"),
            )
            state.collections[key] = collection
        elif collection.type != type_name:
            raise GraphQLError(
                f"artifact collection {name!r} has type {collection.type!r}, not {type_name!r}"
            )
        if collection.client_id:
            state.client_ids.setdefault(collection.client_id, collection.id)
        aliases = [
            a["alias"]
            for a in inp.get("aliases") or []
            if a.get("artifactCollectionName", name) == name
        ]
        digest = str(inp.get("digest") or "")

        client_id = inp.get("clientID")
        distributed_id = inp.get("distributedID") or None
        retried = next(
            (v for v in collection.live() if client_id and v.client_id == client_id), None
        )
        existing = next(
            (v for v in collection.live() if v.state == "COMMITTED" and v.digest == digest),
            None,
        )
        shared = next(
            (v for v in collection.live() if distributed_id and v.distributed_id == distributed_id),
            None,
        )
        if retried is not None:
            version = retried  # the client retried a request whose answer it never got
        elif shared is not None:
            # Every participant of a distributed artifact gets the one version of its id:
            # PENDING until the finisher commits, COMMITTED after (the client then skips it).
            version = shared
            version.metadata.update(_parse_json_object(inp.get("metadata")))
        elif (
            existing is not None
            and distributed_id is None
            and inp.get("enableDigestDeduplication", True)
        ):
            version = existing
        else:
            version = _Version(
                state.next_id("Artifact"),
                collection,
                len(collection.versions),
                digest,
                "PENDING",
                _now(),
                _now(),
                description=inp.get("description"),
                metadata=_parse_json_object(inp.get("metadata")),
                ttl_duration_seconds=_ttl_from_input(inp.get("ttlDurationSeconds")),
                run=inp.get("runName"),
                history_step=inp.get("historyStep"),
                client_id=client_id,
                distributed_id=distributed_id,
            )
            collection.versions.append(version)
            state.versions_by_id[version.id] = version
            state.created_versions += 1
            if "latest" not in aliases:
                aliases.append("latest")
        if version.client_id:
            state.client_ids[version.client_id] = version.id
        run_name = inp.get("runName")
        if run_name and run_name not in version.output_runs:
            version.output_runs.append(run_name)
        if (self.aliases_on_commit or version.distributed_id) and version.state == "PENDING":
            version.pending_aliases.update(aliases)  # a distributed version's land at commit
        else:
            for alias in aliases:
                state.set_alias(version, alias)
        payload = {
            "id": version.id,
            "state": version.state,
            "artifactSequence": {"id": collection.id, "latestArtifact": _latest_ref(collection)},
        }
        return {"createArtifact": {"artifact": payload}}

    def _manifest_answer(self, version: _Version, digest: str | None, query_vars: Json) -> Json:
        if digest:
            version.manifest_digest = digest
        obj = version.manifest_object
        if obj is None:
            obj = self._new_object("manifest", version.collection.entity)
            version.manifest_object = obj
        file_json: Json = {"id": obj.file_id}
        if query_vars.get("includeUpload", True):
            file_json["uploadUrl"] = self._storage_url(obj)
            file_json["uploadHeaders"] = []
        return {"artifactManifest": {"id": obj.id, "file": file_json}}

    def _op_create_artifact_manifest(self, variables: Json, query: str) -> Json:
        inp = variables.get("input") or variables
        version = self._state.version(inp.get("artifactID"))
        if inp.get("manifestType") == "PATCH":
            # One participant's part of a distributed artifact: a manifest object of its own,
            # merged into the version's manifest at commit; none once it is committed.
            if version.state != "PENDING":
                raise GraphQLError(f"artifact {version.id} is {version.state}: no more patches")
            patch = self._new_object("manifest", version.collection.entity)
            version.patches.append(patch)
            file_json: Json = {"id": patch.file_id}
            if variables.get("includeUpload", True):
                file_json.update(uploadUrl=self._storage_url(patch), uploadHeaders=[])
            return {
                "createArtifactManifest": {"artifactManifest": {"id": patch.id, "file": file_json}}
            }
        answer = self._manifest_answer(version, inp.get("digest"), variables)
        return {"createArtifactManifest": answer}

    def _op_update_artifact_manifest(self, variables: Json, query: str) -> Json:
        obj_id = variables.get("artifactManifestID") or ""
        for v in self._state.versions_by_id.values():
            patch = next((p for p in v.patches if p.id == obj_id), None)
            if patch is not None:
                if v.state != "PENDING":
                    raise GraphQLError(f"artifact {v.id} is {v.state}: no more patches")
                file_json: Json = {"id": patch.file_id}
                if variables.get("includeUpload", True):
                    file_json.update(uploadUrl=self._storage_url(patch), uploadHeaders=[])
                return {
                    "updateArtifactManifest": {
                        "artifactManifest": {"id": patch.id, "file": file_json}
                    }
                }
        version = next(
            (
                v
                for v in self._state.versions_by_id.values()
                if v.manifest_object and v.manifest_object.id == obj_id
            ),
            None,
        )
        if version is None:
            raise GraphQLError(f"artifact manifest {obj_id!r} not found")
        answer = self._manifest_answer(version, variables.get("digest"), variables)
        return {"updateArtifactManifest": answer}

    def _op_create_artifact_files(self, variables: Json, query: str) -> Json:
        state = self._state
        inp: Json = variables.get("input") or {}
        edges = []
        for spec in inp.get("artifactFiles") or []:
            version = state.version(spec.get("artifactID"))
            if version.state != "PENDING":
                raise GraphQLError(f"artifact {version.id} is {version.state}, not PENDING")
            name = str(spec.get("name") or "")
            md5 = spec.get("md5")
            entity = version.collection.entity
            blob = state.blobs.get((entity, md5)) if md5 and self.dedup_files else None
            node: Json = {
                "storagePath": f"wandb_artifacts/{version.id}/{quote(name)}",
                "uploadHeaders": [],
                "uploadMultipartUrls": None,
                "artifact": {"id": version.id},
            }
            if blob is not None:
                version.files[name] = blob
                node["uploadUrl"] = None
            else:
                obj = self._new_object("artifact-file", entity)
                obj.expected_md5 = md5
                version.files[name] = obj
                parts = spec.get("uploadPartsInput")
                if parts:
                    obj.upload_id = uuid.uuid4().hex
                    node["uploadUrl"] = self._storage_url(obj)  # never null: see __init__
                    node["uploadMultipartUrls"] = {
                        "uploadID": obj.upload_id,
                        "uploadUrlParts": [
                            {
                                "partNumber": int(p["partNumber"]),
                                "uploadUrl": f"{self._storage_url(obj)}?partNumber="
                                f"{int(p['partNumber'])}&uploadId={obj.upload_id}",
                            }
                            for p in parts
                        ],
                    }
                else:
                    node["uploadUrl"] = self._storage_url(obj)
            edges.append({"node": node})
        return {"createArtifactFiles": {"files": {"edges": edges}}}

    def _op_complete_multipart(self, variables: Json, query: str) -> Json:
        version = self._state.version(variables.get("artifactID"))
        upload_id = variables.get("uploadID")
        obj = next((o for o in version.files.values() if o.upload_id == upload_id), None)
        if obj is None:
            raise GraphQLError(f"multipart upload {upload_id!r} not found")
        action = variables.get("completeMultipartAction") or "Complete"
        if action.lower() != "complete":
            _discard_parts(obj)
            obj.upload_id = None
            return {"completeMultipartUploadArtifact": {"digest": None}}
        completed = sorted(variables.get("completedParts") or [], key=lambda p: p["partNumber"])
        if not completed or [p["partNumber"] for p in completed] != sorted(obj.parts):
            raise GraphQLError("completeMultipartUpload: parts missing or unknown")
        for part in completed:
            _path, etag = obj.parts[int(part["partNumber"])]
            if str(part.get("hexMD5") or part.get("etag") or "").strip('"') not in ("", etag):
                raise GraphQLError(f"part {part['partNumber']}: ETag mismatch")
        if obj.discarded:
            # Each part's bytes were checked against its Content-MD5 and dropped: there is
            # nothing to join, so the file is what the client declared.
            size = sum(obj.part_sizes.values())
            md5 = obj.expected_md5
            if md5 is None:
                raise GraphQLError("completeMultipartUpload: parts discarded, no md5 declared")
            _discard_parts(obj)
            obj.upload_id = None
            self._finish_object(obj, md5, size)
            return {"completeMultipartUploadArtifact": {"digest": md5}}
        # Joined under the server lock: simple, and other requests merely wait meanwhile.
        digest = hashlib.md5()
        size = 0
        with obj.path.open("wb") as out:
            for number in sorted(obj.parts):
                with obj.parts[number][0].open("rb") as src:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
        _discard_parts(obj)
        obj.upload_id = None
        md5 = base64.b64encode(digest.digest()).decode()
        if obj.expected_md5 and obj.expected_md5 != md5:
            obj.path.unlink(missing_ok=True)
            raise GraphQLError("completeMultipartUpload: md5 of the assembled file mismatches")
        self._finish_object(obj, md5, size)
        return {"completeMultipartUploadArtifact": {"digest": md5}}

    def _op_commit_artifact(self, variables: Json, query: str) -> Json:
        state = self._state
        version = state.version(variables.get("artifactID"))
        if version.state == "PENDING" and version.distributed_id is not None:
            version.manifest = _merge_patches(version.patches)  # what has arrived, no more
        if version.state == "PENDING":
            manifest_obj = version.manifest_object
            if version.distributed_id is None and manifest_obj is None:
                raise GraphQLError(f"commitArtifact: artifact {version.id} has no manifest")
            if version.manifest is None:
                raise GraphQLError(f"commitArtifact: artifact {version.id} has no manifest")
            entity = version.collection.entity
            for name, entry in version.manifest_entries().items():
                if entry.get("ref"):
                    continue
                digest = entry.get("digest")
                obj = version.files.get(name)
                if obj is None or obj.md5 != digest:
                    obj = state.blobs.get((entity, str(digest)))
                if obj is None or not obj.uploaded:
                    raise GraphQLError(f"commitArtifact: file {name!r} was never uploaded")
                version.files[name] = obj
            version.state = "COMMITTED"
            version.updated_at = _now()
            holder = version.collection.holder("latest")
            if holder is not None and holder.index > version.index:
                version.pending_aliases.discard("latest")  # a newer version committed first
            for alias in sorted(version.pending_aliases):
                state.set_alias(version, alias)
            version.pending_aliases.clear()
        return {"commitArtifact": {"artifact": {"id": version.id, "digest": version.digest}}}

    def _op_client_id_mapping(self, variables: Json, query: str) -> Json:
        server_id = self._state.client_ids.get(variables.get("clientID") or "")
        return {"clientIDMapping": {"serverID": server_id} if server_id else None}

    def _op_use_artifact(self, variables: Json, query: str) -> Json:
        inp = variables.get("input") or variables  # Python sends no input object
        state = self._state
        version = state.version(inp.get("artifactID"))
        project = state.project(inp.get("entityName"), inp.get("projectName"))
        run = state.runs.get((project.entity, project.name, inp.get("runName") or ""))
        if run is not None and version.id not in run.used:
            run.used.append(version.id)
        return {"useArtifact": {"artifact": _artifact_json(state, version)}}

    def _op_digest_algorithm(self, variables: Json, query: str) -> Json:
        collection = self._state.collection(
            variables.get("entityName"),
            variables.get("projectName"),
            variables.get("artifactCollectionName") or "",
        )
        node = (
            {"__typename": "ArtifactSequence", "digestAlgorithm": "MANIFEST_MD5"}
            if collection
            else None
        )
        return {"project": {"artifactType": {"artifactCollection": node}}}

    # Public API (Python-side) artifact queries.

    def _op_default_entity(self, variables: Json, query: str) -> Json:
        return {"viewer": {"id": _gql_id("User", 1), "entity": self.entity}}

    def _op_artifact_by_id(self, variables: Json, query: str) -> Json:
        version = self._state.versions_by_id.get(variables.get("id") or "")
        if version is None or version.state == "DELETED":
            return {"artifact": None}
        return {"artifact": _artifact_json(self._state, version)}

    def _op_membership_by_name(self, variables: Json, query: str) -> Json:
        state = self._state
        name, _, ref = str(variables.get("name") or "").partition(":")
        entity, project = variables.get("entity"), variables.get("project")
        portfolio = state.portfolios.get((entity or "", project or "", name))
        if portfolio is not None:  # a registry collection: a link, with its own index
            member = state.resolve_member(portfolio, ref or "latest")
            found = _link_membership_json(state, portfolio, member) if member else None
            return {"project": {"artifactCollectionMembership": found}}
        collection = state.collection(entity, project, name)
        version = state.resolve(collection, ref or "latest") if collection else None
        membership = _membership_json(state, version) if version else None
        return {"project": {"artifactCollectionMembership": membership}}

    def _op_fetch_org_info(self, variables: Json, query: str) -> Json:
        """The default entity is a personal entity in one organization; the organization's
        own entity is a team entity of that organization."""
        org = {"name": self.org, "orgEntity": {"name": self.org}}
        name = variables.get("entity")
        if name == self.entity:
            return {"entity": {"organization": None, "user": {"organizations": [org]}}}
        if name == self.org:
            return {"entity": {"organization": org, "user": None}}
        return {"entity": None}

    def _op_link_artifact(self, variables: Json, query: str) -> Json:
        inp: Json = variables.get("input") or {}
        state = self._state
        version = state.version(inp.get("artifactID"))
        if version.state != "COMMITTED":
            raise GraphQLError(f"artifact {version.id} is not committed")
        entity, registry = inp.get("entityName"), inp.get("projectName") or ""
        if entity != self.org:
            raise GraphQLError(f"entity {entity!r} is not an organization")
        name = inp.get("artifactPortfolioName") or ""
        aliases = []
        for alias in inp.get("aliases") or []:
            if alias.get("artifactCollectionName") not in (None, name):
                raise GraphQLError(f"alias {alias!r} names another collection than {name!r}")
            aliases.append(str(alias.get("alias") or ""))
        portfolio, member = state.link(version, entity, registry, name, aliases)
        result: Json = {"versionIndex": member.index}
        if "artifactMembership" in query:
            result["artifactMembership"] = _link_membership_json(state, portfolio, member)
        return {"result": result}

    def _typed_collection(self, variables: Json) -> _Collection | None:
        collection = self._state.collection(
            variables.get("entity"),
            variables.get("project"),
            variables.get("name") or variables.get("collection") or "",
        )
        if collection is None or collection.type != variables.get("type"):
            return None
        return collection

    def _type_json(self, variables: Json) -> Json | None:
        project = self._state.find_project(variables.get("entity"), variables.get("project"))
        if project is None:
            return None
        found = self._state.types.get((project.entity, project.name, variables.get("type") or ""))
        if found is None:
            return None
        return {
            "__typename": "ArtifactType",
            "id": found.id,
            "name": found.name,
            "description": None,
            "createdAt": project.created_at,
        }

    def _typed_portfolio(self, variables: Json) -> _Portfolio | None:
        name = variables.get("name") or variables.get("collection") or ""
        key = (variables.get("entity") or "", variables.get("project") or "", name)
        portfolio = self._state.portfolios.get(key)
        if portfolio is None or portfolio.type != variables.get("type"):
            return None
        return portfolio

    def _portfolio_json(self, portfolio: _Portfolio) -> Json:
        return {
            **_portfolio_info_json(self._state, portfolio),
            "description": None,
            "createdAt": portfolio.created_at,
            "updatedAt": portfolio.created_at,
            "type": {"name": portfolio.type},
            "defaultArtifactType": {"name": portfolio.type},
            "tags": {"edges": []},
            "state": "READY",
        }

    def _op_project_artifact_collection(self, variables: Json, query: str) -> Json:
        portfolio = self._typed_portfolio(variables)
        if portfolio is not None:  # a registry collection
            type_json = self._type_json(variables)
            assert type_json is not None
            type_json["artifactCollection"] = self._portfolio_json(portfolio)
            return {"project": {"artifactType": type_json}}
        collection = self._typed_collection(variables)
        type_json = self._type_json(variables)
        if type_json is not None:
            type_json["artifactCollection"] = (
                _collection_json(self._state, collection) if collection else None
            )
        return {"project": {"artifactType": type_json}}

    def _op_project_artifact_type(self, variables: Json, query: str) -> Json:
        return {"project": {"artifactType": self._type_json(variables)}}

    def _op_project_artifact_types(self, variables: Json, query: str) -> Json:
        state = self._state
        project = state.find_project(variables.get("entity"), variables.get("project"))
        if project is None:
            return {"project": None}
        names = [n for (e, p, n) in state.types if (e, p) == (project.entity, project.name)]
        nodes = [self._type_json({**variables, "type": n}) for n in names]
        chunk, info = _page(nodes, variables)
        return {
            "project": {"artifactTypes": {"edges": [{"node": n} for n in chunk], "pageInfo": info}}
        }

    def _op_project_artifact_collections(self, variables: Json, query: str) -> Json:
        state = self._state
        project = state.find_project(variables.get("entity"), variables.get("project"))
        if project is None:
            return {"project": None}
        wanted_type = variables.get("type")
        found = [
            c
            for c in state.collections.values()
            if (c.entity, c.project) == (project.entity, project.name)
            and (wanted_type is None or c.type == wanted_type)
        ]
        chunk, info = _page(found, variables)
        connection = {
            "totalCount": len(found),
            "pageInfo": info,
            "edges": [{"node": _collection_json(state, c)} for c in chunk],
        }
        if wanted_type is None:
            return {"project": {"artifactCollections": connection}}
        type_json = self._type_json(variables)
        if type_json is not None:
            type_json["artifactCollections"] = connection
        return {"project": {"artifactType": type_json}}

    def _portfolio_artifacts(self, portfolio: _Portfolio, variables: Json) -> Json:
        """A registry collection's versions: its own numbers, the linked artifacts."""
        members = [m for m in portfolio.members if m.version.state == "COMMITTED"]
        order = str(variables.get("order") or "-createdAt")
        members.sort(key=lambda m: m.index, reverse=not order.startswith("+"))
        chunk, info = _page(members, variables)
        edges = [
            {"version": f"v{m.index}", "node": _artifact_json(self._state, m.version)}
            for m in chunk
        ]
        type_json = self._type_json(variables)
        assert type_json is not None
        type_json["artifactCollection"] = {
            **self._portfolio_json(portfolio),
            "artifacts": {"totalCount": len(members), "pageInfo": info, "edges": edges},
        }
        return {"project": {"artifactType": type_json}}

    def _op_project_artifacts(self, variables: Json, query: str) -> Json:
        state = self._state
        portfolio = self._typed_portfolio(variables)
        if portfolio is not None:
            return self._portfolio_artifacts(portfolio, variables)
        collection = self._typed_collection(variables)
        type_json = self._type_json(variables)
        if type_json is None:
            return {"project": {"artifactType": None}}
        if collection is None:
            type_json["artifactCollection"] = None
            return {"project": {"artifactType": type_json}}
        filters = _parse_json_object(variables.get("filters"))
        versions = [
            v for v in collection.live() if "state" not in filters or v.state == filters["state"]
        ]
        order = str(variables.get("order") or "-createdAt")
        versions.sort(key=lambda v: v.index, reverse=not order.startswith("+"))
        chunk, info = _page(versions, variables)
        connection = {
            "totalCount": len(versions),
            "pageInfo": info,
            "edges": [{"version": v.version, "node": _artifact_json(state, v)} for v in chunk],
        }
        type_json["artifactCollection"] = {
            **_collection_json(state, collection),
            "artifacts": connection,
        }
        return {"project": {"artifactType": type_json}}

    def _op_collection_aliases(self, variables: Json, query: str) -> Json:
        state = self._state
        collection = next(
            (c for c in state.collections.values() if c.id == variables.get("id")), None
        )
        if collection is None:
            return {"artifactCollection": None}
        nodes = [
            {"__typename": "ArtifactAlias", "id": state.alias_id(collection, a), "alias": a}
            for v in collection.live()
            for a in sorted(v.aliases)
        ]
        chunk, info = _page(nodes, variables, default_per_page=1000)
        return {
            "artifactCollection": {
                "__typename": "ArtifactSequence",
                "aliases": {"pageInfo": info, "edges": [{"node": n} for n in chunk]},
            }
        }

    def _alias_targets(self, inp: Json) -> tuple[_Version, list[str]]:
        version = self._state.version(inp.get("artifactID"))
        collection = version.collection
        names = []
        for alias in inp.get("aliases") or []:
            where = (
                alias.get("entityName", collection.entity),
                alias.get("projectName", collection.project),
                alias.get("artifactCollectionName", collection.name),
            )
            if where != (collection.entity, collection.project, collection.name):
                raise GraphQLError(f"alias target {where!r} is not this artifact's collection")
            names.append(str(alias.get("alias") or ""))
        return version, names

    def _op_add_aliases(self, variables: Json, query: str) -> Json:
        version, names = self._alias_targets(variables.get("input") or {})
        for name in names:
            self._state.set_alias(version, name)
        result = {"success": True}
        return {"result": result, "addAliases": result}

    def _op_delete_aliases(self, variables: Json, query: str) -> Json:
        version, names = self._alias_targets(variables.get("input") or {})
        for name in names:
            version.aliases.discard(name)
        version.updated_at = _now()
        result = {"success": True}
        return {"result": result, "deleteAliases": result}

    def _op_update_artifact(self, variables: Json, query: str) -> Json:
        state = self._state
        inp: Json = variables.get("input") or variables  # the core variant has no input object
        version = state.version(inp.get("artifactID"))
        if "description" in inp:
            version.description = inp["description"]
        if inp.get("metadata") is not None:
            version.metadata = _parse_json_object(inp["metadata"])
        if inp.get("ttlDurationSeconds") is not None:
            version.ttl_duration_seconds = _ttl_from_input(inp["ttlDurationSeconds"])
        for tag in inp.get("tagsToAdd") or []:
            if tag.get("tagName") not in version.tags:
                version.tags.append(tag["tagName"])
        for tag in inp.get("tagsToDelete") or []:
            with contextlib.suppress(ValueError):
                version.tags.remove(tag.get("tagName"))
        if inp.get("aliases") is not None:
            wanted = {a["alias"] for a in inp["aliases"]}
            version.aliases.intersection_update(wanted)
            for alias in sorted(wanted):
                state.set_alias(version, alias)
        version.updated_at = _now()
        result = {"artifact": _artifact_json(state, version)}
        return {"result": result, "updateArtifact": result}

    def _op_delete_artifact(self, variables: Json, query: str) -> Json:
        inp: Json = variables.get("input") or {}
        version = self._state.version(inp.get("artifactID"))
        if version.aliases and not inp.get("deleteAliases"):
            raise GraphQLError(
                f"cannot delete artifact {version.collection.name}:{version.version}: it has "
                f"aliases {sorted(version.aliases)}; pass deleteAliases"
            )
        version.aliases.clear()
        version.state = "DELETED"
        version.updated_at = _now()
        result = {"artifact": {"id": version.id}}
        return {"result": result, "deleteArtifact": result}

    def _op_fetch_linked_artifacts(self, variables: Json, query: str) -> Json:
        version = self._state.versions_by_id.get(variables.get("artifactID") or "")
        if version is None or version.state == "DELETED":
            return {"artifact": None}
        nodes = [_membership_json(self._state, version)]
        for key in version.links:
            portfolio = self._state.portfolios[key]
            member = portfolio.member(version)
            assert member is not None
            nodes.append(_link_membership_json(self._state, portfolio, member))
        return {"artifact": {"artifactMemberships": {"edges": [{"node": n} for n in nodes]}}}

    # Manifests and file URLs.

    def _op_artifact_manifest(self, variables: Json, query: str) -> Json:
        artifact_id = variables.get("id") or variables.get("artifact_id")
        version = self._state.versions_by_id.get(artifact_id or "")
        if version is None or version.state == "DELETED":
            return {"artifact": None}
        obj = version.manifest_object
        current = {"file": {"directUrl": self._storage_url(obj)}} if obj else None
        return {"artifact": {"currentManifest": current}}

    def _file_nodes(self, version: _Version) -> list[Json]:
        nodes = []
        for index, (name, entry) in enumerate(sorted(version.manifest_entries().items())):
            obj = version.files.get(name)
            url = self._storage_url(obj) if obj else None
            if entry.get("ref"):
                # W&B lists a reference entry as a file too, with a non-null URL into its own
                # storage that holds no bytes (GET answers 404): the SDK's pydantic parsing
                # needs the string, and the SDK follows the reference instead.
                url = f"{self.url}/storage/reference-{version.id}-{index}"
            nodes.append(
                {
                    "__typename": "File",
                    "id": _gql_id("File", index + 1),
                    "name": name,
                    "displayName": name,
                    "url": url,
                    "directUrl": url,
                    "sizeBytes": int(entry.get("size") or 0),
                    "storagePath": f"wandb_artifacts/{version.id}/{quote(name)}",
                    "mimetype": None,
                    "updatedAt": version.updated_at,
                    "digest": entry.get("digest"),
                    "md5": entry.get("digest"),
                }
            )
        return nodes

    def _membership_files(self, variables: Json, names: list[str] | None) -> Json:
        state = self._state
        collection = state.collection(
            variables.get("entity"), variables.get("project"), variables.get("collection") or ""
        )
        version = state.resolve(collection, variables.get("alias") or "") if collection else None
        if collection is None or version is None:
            return {"project": {"artifactCollection": None}}
        nodes = [n for n in self._file_nodes(version) if names is None or n["name"] in names]
        chunk, info = _page(nodes, variables)
        files = {
            "totalCount": len(nodes),
            "pageInfo": info,
            "edges": [{"node": n} for n in chunk],
        }
        return {
            "project": {
                "artifactCollection": {
                    "__typename": "ArtifactSequence",
                    "artifactMembership": {"files": files},
                }
            }
        }

    def _op_membership_file_urls(self, variables: Json, query: str) -> Json:
        return self._membership_files(variables, None)

    def _op_membership_files(self, variables: Json, query: str) -> Json:
        return self._membership_files(variables, variables.get("fileNames"))

    def _op_files_by_manifest_entries(self, variables: Json, query: str) -> Json:
        version = self._state.versions_by_id.get(variables.get("id") or "")
        if version is None:
            return {"artifact": None}
        wanted = {e.get("name") for e in variables.get("entries") or []}
        nodes = [
            {"name": n["name"], "directUrl": n["directUrl"]}
            for n in self._file_nodes(version)
            if not wanted or n["name"] in wanted
        ]
        return {
            "artifact": {
                "filesByManifestEntries": {
                    "pageInfo": {"hasNextPage": False, "endCursor": None},
                    "edges": [{"node": n} for n in nodes],
                }
            }
        }

    # -- storage -----------------------------------------------------------------------------

    def _lookup_object(self, object_id: str) -> _StorageObject | None:
        with self._lock:
            return self._state.objects.get(object_id)

    def _finish_object(self, obj: _StorageObject, md5: str, size: int) -> None:
        """Record a completed upload (caller holds the lock)."""
        obj.md5 = md5
        obj.size = size
        if obj.kind == "artifact-file":
            self._state.blobs.setdefault((obj.entity, md5), obj)
        elif obj.kind == "manifest":
            try:
                manifest = json.loads(obj.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                manifest = None
            obj.manifest = manifest if isinstance(manifest, dict) else None
            for version in self._state.versions_by_id.values():
                if version.manifest_object is obj:
                    version.manifest = manifest if isinstance(manifest, dict) else None

    def _blob_by_hex(self, entity: str, hexhash: str) -> _StorageObject | None:
        try:
            md5 = base64.b64encode(bytes.fromhex(hexhash)).decode()
        except ValueError:
            return None
        with self._lock:
            return self._state.blobs.get((entity, md5))

    def _file_stream(self, entity: str, project: str, run_name: str, body: bytes) -> None:
        try:
            payload = json.loads(body or b"{}")
        except ValueError:
            payload = {}
        with self._lock:
            run = self._state.runs.get((entity, project, run_name))
            if run is not None:
                run.file_stream_posts += 1
                if isinstance(payload, dict) and payload.get("complete"):
                    run.complete = True


def _merge_patches(patches: list[_StorageObject]) -> dict[str, Any]:
    """A distributed version's manifest: the contents of every uploaded patch, in order (a
    later patch's entry for the same name wins). A patch whose upload never finished adds
    nothing: the version then lacks those files, as W&B would store it."""
    merged: dict[str, Any] = {}
    base: dict[str, Any] = {}
    for patch in patches:
        if patch.manifest is None:
            continue
        base = base or {k: v for k, v in patch.manifest.items() if k != "contents"}
        contents = patch.manifest.get("contents")
        if isinstance(contents, dict):
            merged.update(contents)
    return {**(base or {"version": 1}), "contents": merged}


def _discard_parts(obj: _StorageObject) -> None:
    for path, _etag in obj.parts.values():
        path.unlink(missing_ok=True)
    obj.parts.clear()
    obj.part_sizes.clear()


def _parse_json_object(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    if not value:
        return {}
    try:
        parsed = json.loads(value)
    except (TypeError, ValueError) as exc:
        raise GraphQLError(f"invalid JSONString: {value!r}") from exc
    return parsed if isinstance(parsed, dict) else {}


def _ttl_from_input(value: Any) -> int | None:
    """Map ``ttlDurationSeconds`` input to storage: -1 (inherit) is ``None``."""
    if value is None or int(value) == -1:
        return None
    return int(value)


_Operation = Callable[[FakeWandbServer, Json, str], Json]

_OPERATIONS: dict[str, _Operation] = {
    # Runs, viewer, server info.
    "Viewer": FakeWandbServer._op_viewer,
    "GetViewer": FakeWandbServer._op_viewer,
    "GetDefaultEntity": FakeWandbServer._op_default_entity,
    "ServerFeaturesQuery": FakeWandbServer._op_server_features,
    "OrganizationCoreWeaveOrganizationID": FakeWandbServer._op_empty_entity,
    "XXHashDigestsEnabled": FakeWandbServer._op_empty_entity,
    "UpsertBucket": FakeWandbServer._op_upsert_bucket,
    "RunResumeStatus": FakeWandbServer._op_run_resume_status,
    "Run": FakeWandbServer._op_run,
    "Runs": FakeWandbServer._op_runs,
    "CreateRunFiles": FakeWandbServer._op_create_run_files,
    "MarkRunFilesUploaded": FakeWandbServer._op_mark_run_files_uploaded,
    # Logging artifacts.
    "ArtifactType": FakeWandbServer._op_artifact_type,
    "CreateArtifact": FakeWandbServer._op_create_artifact,
    "CreateArtifactManifest": FakeWandbServer._op_create_artifact_manifest,
    "UpdateArtifactManifest": FakeWandbServer._op_update_artifact_manifest,
    "CreateArtifactFiles": FakeWandbServer._op_create_artifact_files,
    "CompleteMultipartUploadArtifact": FakeWandbServer._op_complete_multipart,
    "CommitArtifact": FakeWandbServer._op_commit_artifact,
    "ClientIDMapping": FakeWandbServer._op_client_id_mapping,
    "UseArtifact": FakeWandbServer._op_use_artifact,
    "FetchArtifactDigestAlgorithm": FakeWandbServer._op_digest_algorithm,
    # Public API.
    "ArtifactByID": FakeWandbServer._op_artifact_by_id,
    "ArtifactMembershipByName": FakeWandbServer._op_membership_by_name,
    "ProjectArtifactCollection": FakeWandbServer._op_project_artifact_collection,
    "ProjectArtifactCollections": FakeWandbServer._op_project_artifact_collections,
    "ArtifactTypeArtifactCollections": FakeWandbServer._op_project_artifact_collections,
    "ProjectArtifactType": FakeWandbServer._op_project_artifact_type,
    "ProjectArtifactTypes": FakeWandbServer._op_project_artifact_types,
    "ProjectArtifacts": FakeWandbServer._op_project_artifacts,
    "ArtifactCollectionAliases": FakeWandbServer._op_collection_aliases,
    "AddAliases": FakeWandbServer._op_add_aliases,
    "DeleteAliases": FakeWandbServer._op_delete_aliases,
    "UpdateArtifact": FakeWandbServer._op_update_artifact,
    "DeleteArtifact": FakeWandbServer._op_delete_artifact,
    "FetchLinkedArtifacts": FakeWandbServer._op_fetch_linked_artifacts,
    "FetchOrgInfoFromEntity": FakeWandbServer._op_fetch_org_info,
    "LinkArtifact": FakeWandbServer._op_link_artifact,
    # Manifests and downloads.
    "FetchArtifactManifest": FakeWandbServer._op_artifact_manifest,
    "ArtifactManifest": FakeWandbServer._op_artifact_manifest,
    "GetArtifactMembershipFileUrls": FakeWandbServer._op_membership_file_urls,
    "ArtifactMembershipFiles": FakeWandbServer._op_membership_files,
    "ArtifactFileURLsByManifestEntries": FakeWandbServer._op_files_by_manifest_entries,
}


def operation_names() -> list[str]:
    """The GraphQL operations the fake implements, sorted."""
    return sorted(_OPERATIONS)


# --------------------------------------------------------------------------------------------
# HTTP layer.


class _HTTPServer(ThreadingHTTPServer):
    """One named daemon thread per connection, all tracked so :meth:`close_connections` can
    end them (keep-alive connections would otherwise outlive :meth:`FakeWandbServer.stop`)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        fake: FakeWandbServer,
    ) -> None:
        self.fake = fake
        self._connections: dict[threading.Thread, socket.socket] = {}
        self._connections_lock = threading.Lock()
        self._accepted = 0
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        self._accepted += 1
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name=f"fake-wandb-conn-{self._accepted}",
            daemon=True,
        )
        with self._connections_lock:
            self._connections[thread] = request
        thread.start()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._connections_lock:
                self._connections.pop(threading.current_thread(), None)

    def close_connections(self, timeout: float) -> None:
        """Shut every open connection down and join the threads serving them."""
        with self._connections_lock:
            connections = list(self._connections.items())
        for _thread, sock in connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for thread, _sock in connections:
            thread.join(max(0.0, deadline - time.monotonic()))


def _md5_beside(chunks: Iterator[bytes]) -> tuple[Any, int]:
    """The md5 and size of `chunks`, hashed on a second thread while this one reads on
    (hashlib releases the GIL), so that one upload streams at the pace of the slower of
    socket reads and md5 rather than of both in turn."""
    digest = hashlib.md5()
    todo: queue.Queue[bytes | None] = queue.Queue(maxsize=8)

    def hash_chunks() -> None:
        while (chunk := todo.get()) is not None:
            digest.update(chunk)

    hasher = threading.Thread(target=hash_chunks, name="fake-wandb-md5", daemon=True)
    hasher.start()
    size = 0
    try:
        for chunk in chunks:
            todo.put(chunk)
            size += len(chunk)
    finally:
        todo.put(None)
        hasher.join()
    return digest, size


class _Abort(Exception):
    """The handler already answered (or dropped) the request."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    # Quiet: the default writes every request to stderr.
    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("fake wandb: " + format, *args)

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    # -- dispatch ----------------------------------------------------------------------------

    @property
    def fake(self) -> FakeWandbServer:
        return self.server.fake

    def _dispatch(self) -> None:
        self._body_read = False
        self._after_fault: Fault | None = None
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        try:
            if self.command == "POST" and path == "/graphql":
                self._handle_graphql(path)
                return
            self.fake._record(self.command, path, None)
            self._arm_fault(path, None)
            self._route(path, query)
        except _Abort:
            return
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception:
            logger.exception("fake wandb: %s %s failed", self.command, self.path)
            with contextlib.suppress(OSError):
                self._send_json(500, {"error": "fake wandb server error"})

    def _route(self, path: str, query: dict[str, str]) -> None:
        segments = [s for s in path.split("/") if s]
        if segments[:1] == ["storage"] and len(segments) == 2:
            if self.command == "PUT":
                self._put_object(segments[1], query)
            elif self.command in ("GET", "HEAD"):
                self._get_object(self.fake._lookup_object(segments[1]))
            else:
                self._send_status(405)
            return
        if not self.fake._authorized(self.headers.get("Authorization")):
            self._drain()
            self._send_json(401, {"error": "invalid API key"})
            return
        if (
            self.command == "POST"
            and len(segments) == 5
            and segments[0] == "files"
            and segments[4] == "file_stream"
        ):
            body = self._read_body()
            self.fake._file_stream(segments[1], segments[2], segments[3], body)
            self._send_json(200, {"exitcode": None, "limits": {}})
            return
        if self.command in ("GET", "HEAD") and segments[:1] in (["artifacts"], ["artifactsV2"]):
            # Fallback download URLs: .../<entity>/<hexhash> and
            # artifactsV2/<region>/<entity>/<project>/<collection>/[<id>/]<birth>/<hex>/<name>.
            entity = segments[1] if segments[0] == "artifacts" else segments[2]
            hexhash = segments[-1] if segments[0] == "artifacts" else segments[-2]
            self._get_object(self.fake._blob_by_hex(entity, hexhash))
            return
        self._drain()
        self._send_json(404, {"error": f"no route for {self.command} {path}"})

    def _handle_graphql(self, path: str) -> None:
        body = self._read_body(limit=_MAX_GRAPHQL_BODY)
        try:
            request = json.loads(body)
        except ValueError:
            request = None
        if not isinstance(request, dict):
            self.fake._record(self.command, path, None)
            self._send_json(400, {"errors": [{"message": "body is not a GraphQL JSON object"}]})
            return
        query = str(request.get("query") or "")
        operation = request.get("operationName") or None
        if not operation and (match := _OP_NAME_RE.search(query)):
            operation = match.group(2)
        operation = operation or "<anonymous>"
        self.fake._record(self.command, path, operation)
        self._arm_fault(path, operation)
        if not self.fake._authorized(self.headers.get("Authorization")):
            self._send_json(401, {"errors": [{"message": "invalid API key"}]})
            return
        variables = request.get("variables") or {}
        self._send_json(200, self.fake._graphql(operation, query, variables))

    def _arm_fault(self, path: str, operation: str | None) -> None:
        """Apply a matching fault now, or keep it for the response if it is an ``after`` one."""
        fault = self.fake._take_fault(path, operation)
        if fault is not None and fault.after:
            self._after_fault = fault
        elif fault is not None:
            self._apply_fault(fault)

    def _apply_fault(self, fault: Fault) -> None:
        """Stall, then drop the connection or answer the fault's status (raising ``_Abort``)."""
        if fault.delay:
            self.fake._stopping.wait(fault.delay)
        if fault.reset:
            self._reset()
            raise _Abort
        if fault.status is not None:
            self._drain()
            headers = {}
            if fault.retry_after is not None:
                headers["Retry-After"] = f"{fault.retry_after:g}"
            body = {"errors": [{"message": f"injected HTTP {fault.status}"}]}
            self._send_json(fault.status, body, headers)
            raise _Abort

    def _reset(self) -> None:
        """Close the connection with a TCP RST and no response."""
        self.close_connection = True
        linger = struct.pack("ii", 1, 0)
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        # The socket's fd is only released once its file objects are closed too; swap in inert
        # ones so BaseHTTPRequestHandler's final flush has something to flush.
        self.rfile.close()
        self.wfile.close()
        self.connection.close()
        self.rfile, self.wfile = io.BytesIO(), io.BytesIO()

    # -- bodies ------------------------------------------------------------------------------

    def _iter_body(self) -> Iterator[bytes]:
        """Yield the request body in chunks (Content-Length or chunked), exactly once."""
        if self._body_read:
            return
        self._body_read = True
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size_line = self.rfile.readline(1024)
                if not size_line:
                    raise ConnectionError("truncated chunked body")
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    return
                remaining = size
                while remaining:
                    chunk = self.rfile.read(min(remaining, _CHUNK))
                    if not chunk:
                        raise ConnectionError("truncated chunked body")
                    remaining -= len(chunk)
                    yield chunk
                self.rfile.readline(1024)
            return
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, _CHUNK))
            if not chunk:
                raise ConnectionError("truncated body")
            remaining -= len(chunk)
            yield chunk

    def _read_body(self, limit: int = _MAX_GRAPHQL_BODY) -> bytes:
        data = bytearray()
        for chunk in self._iter_body():
            data += chunk
            if len(data) > limit:
                raise ConnectionError("request body too large")
        if self.headers.get("Content-Encoding", "").lower() == "gzip":
            return gzip.decompress(bytes(data))
        return bytes(data)

    def _drain(self) -> None:
        for _chunk in self._iter_body():
            pass

    # -- storage -----------------------------------------------------------------------------

    def _put_object(self, object_id: str, query: dict[str, str]) -> None:
        fake = self.fake
        obj = fake._lookup_object(object_id)
        if obj is None:
            self._drain()
            self._send_json(404, {"error": "no such upload URL"})
            return
        part = query.get("partNumber")
        if part is not None and (obj.upload_id is None or query.get("uploadId") != obj.upload_id):
            self._drain()
            self._send_json(404, {"error": "no such multipart upload"})
            return
        target = obj.path.with_name(f"{obj.id}.part{int(part)}") if part else obj.path
        temp = target.with_name(f"{target.name}.{uuid.uuid4().hex}.tmp")
        discard = fake.discard_uploads and obj.kind == "artifact-file"
        claimed = self.headers.get("Content-MD5")
        trusted = (claimed or ("" if part else obj.expected_md5) or "").strip()
        if discard and not fake.verify_uploads and trusted:
            size = sum(len(chunk) for chunk in self._iter_body())
            md5 = trusted
        else:
            digest = hashlib.md5()
            size = 0
            if discard:
                digest, size = _md5_beside(self._iter_body())
            else:
                with temp.open("wb") as out:
                    for chunk in self._iter_body():
                        digest.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
            md5 = base64.b64encode(digest.digest()).decode()
        if claimed is not None and claimed.strip() != md5:
            temp.unlink(missing_ok=True)
            self._send_json(400, {"error": f"Content-MD5 {claimed} does not match body {md5}"})
            return
        if not discard:
            temp.replace(target)
        etag = base64.b64decode(md5).hex()
        with fake._lock:
            obj.discarded = discard
            if part:
                obj.parts[int(part)] = (target, etag)
                obj.part_sizes[int(part)] = size
            else:
                fake._finish_object(obj, md5, size)
        self._send_status(200, {"ETag": f'"{etag}"'})

    def _get_object(self, obj: _StorageObject | None) -> None:
        self._drain()
        if obj is None or not obj.uploaded:
            self._send_json(404, {"error": "no such object"})
            return
        if obj.discarded:
            self._send_json(410, {"error": "the bytes were discarded (discard_uploads)"})
            return
        size = obj.path.stat().st_size
        start, end = 0, size - 1
        status = 200
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        if match := re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip()):
            first, last = match.groups()
            if first:
                start = int(first)
                end = min(int(last), size - 1) if last else size - 1
            elif last:
                start = max(size - int(last), 0)
            if start > end or start >= size:
                self._send_status(416, {"Content-Range": f"bytes */{size}"})
                return
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = end - start + 1 if size else 0
        headers["Content-Length"] = str(length)
        headers["ETag"] = f'"{base64.b64decode(obj.md5 or "").hex()}"'
        self._start_response(status, headers)
        if self.command == "HEAD":
            return
        with obj.path.open("rb") as handle:
            handle.seek(start)
            remaining = length
            while remaining > 0 and (chunk := handle.read(min(remaining, _CHUNK))):
                self.wfile.write(chunk)
                remaining -= len(chunk)

    # -- responses ---------------------------------------------------------------------------

    def _send_json(
        self, status: int, payload: Any, headers: Mapping[str, str] | None = None
    ) -> None:
        body = json.dumps(payload).encode()
        all_headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
        self._start_response(status, {**all_headers, **(headers or {})})
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_status(self, status: int, headers: Mapping[str, str] | None = None) -> None:
        self._start_response(status, {"Content-Length": "0", **(headers or {})})

    def _start_response(self, status: int, headers: Mapping[str, str]) -> None:
        """Send the status line and headers, unless an ``after`` fault takes the answer over."""
        fault, self._after_fault = self._after_fault, None
        if fault is not None:
            self._apply_fault(fault)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
