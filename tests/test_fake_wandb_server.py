"""Drive the real wandb 0.31 SDK against the loopback fake W&B server.

Each SDK scenario runs in a fresh Python subprocess (the SDK keeps process-wide singletons and a
``wandb-core`` helper per process) with the environment from ``FakeWandbServer.env``, applied
through ``monkeypatch`` so the child inherits it. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.fake_wandb import API_KEY, DEFAULT_ENTITY, FakeWandbServer

PROJECT = "ckpt-tests"
SDK_TIMEOUT = 60.0

# Shared by every driver script: bounded retries so a broken protocol fails instead of hanging.
PRELUDE = f"""
import json, os, pathlib, sys
import wandb

ROOT = pathlib.Path(sys.argv[1])
ENTITY, PROJECT = {DEFAULT_ENTITY!r}, {PROJECT!r}

def start_run():
    settings = wandb.Settings(x_graphql_retry_max=4, x_file_transfer_retry_max=4)
    return wandb.init(
        project=PROJECT, entity=ENTITY, mode="online", reinit="create_new", settings=settings
    )

def publish(run, path, aliases=(), name="ckpt", metadata=None, ttl_days=None):
    artifact = wandb.Artifact(name, type="model", metadata=metadata or {{}})
    artifact.add_file(str(path), name="model.bin")
    if ttl_days is not None:
        import datetime
        artifact.ttl = datetime.timedelta(days=ttl_days)
    run.log_artifact(artifact, aliases=list(aliases))
    artifact.wait(timeout=45)
    return artifact

def emit(**result):
    print("RESULT " + json.dumps(result), flush=True)
"""


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeWandbServer]:
    """A started fake server with the SDK environment pointed at it."""
    with FakeWandbServer(storage_dir=tmp_path / "server-storage") as fake:
        for key, value in fake.env(tmp_path / "sdk").items():
            monkeypatch.setenv(key, value)
        yield fake
        assert fake.unknown_operations == [], "the SDK used operations the fake lacks"


def run_sdk(tmp_path: Path, body: str, **env: str) -> dict[str, Any]:
    """Run ``PRELUDE + body`` in a subprocess; return the dict it passed to ``emit``."""
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    script = PRELUDE + textwrap.dedent(body)
    proc = subprocess.run(
        [sys.executable, "-c", script, str(work)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=SDK_TIMEOUT,
        check=False,
    )
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and results, (
        f"driver failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return dict(json.loads(results[-1].removeprefix("RESULT ")))


def md5_hex(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def graphql(
    server: FakeWandbServer, query: str, variables: dict[str, Any] | None = None, key: str = API_KEY
) -> tuple[int, dict[str, Any]]:
    """POST one GraphQL document the way wandb-core does; return (status, JSON body)."""
    body = json.dumps({"query": query, "variables": variables or {}, "operationName": ""})
    status, raw = request(server, "POST", "/graphql", body.encode(), auth=key)
    return status, json.loads(raw)


def request(
    server: FakeWandbServer,
    method: str,
    path: str,
    data: bytes | None = None,
    *,
    auth: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    """Send one HTTP request to the fake; return (status, body)."""
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    if auth is not None:
        all_headers["Authorization"] = "Basic " + base64.b64encode(f"api:{auth}".encode()).decode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request(method, path, data, all_headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def b64_md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


# ---------------------------------------------------------------------------------------------
# The real SDK against the fake.


def test_log_artifact_numbers_versions_and_moves_latest(
    server: FakeWandbServer, tmp_path: Path
) -> None:
    """Two log_artifact+wait calls make v0 and v1, latest on v1, and store the exact bytes."""
    sources = []
    for step in range(2):
        path = tmp_path / f"model-{step}.bin"
        path.write_bytes(os.urandom(4096 + step))
        sources.append(path)
    result = run_sdk(
        tmp_path,
        f"""
        run = start_run()
        a0 = publish(run, {str(sources[0])!r}, aliases=["step-0"], metadata={{"step": 0}})
        a1 = publish(run, {str(sources[1])!r}, aliases=["step-1"], metadata={{"step": 1}},
                     ttl_days=3)
        run.finish()
        emit(versions=[a0.version, a1.version], aliases=sorted(a1.aliases))
        """,
    )
    assert result == {"versions": ["v0", "v1"], "aliases": ["latest", "step-1"]}

    versions = server.versions("ckpt", PROJECT)
    assert [(v.version, v.state) for v in versions] == [("v0", "COMMITTED"), ("v1", "COMMITTED")]
    assert [set(v.aliases) for v in versions] == [{"step-0"}, {"latest", "step-1"}]
    assert server.alias_holder("ckpt", "latest") == "v1"
    assert [v.metadata for v in versions] == [{"step": 0}, {"step": 1}]
    for version, source in zip(versions, sources, strict=True):
        assert version.file_md5("model.bin") == md5_hex(source)
        assert version.manifest is not None and "model.bin" in version.manifest["contents"]
    assert versions[1].ttl_duration_seconds == 3 * 86400
    assert server.created_versions == 2
    assert [r.complete for r in server.runs()] == [True]


def test_same_content_logged_again_creates_no_version(
    server: FakeWandbServer, tmp_path: Path
) -> None:
    """Logging a digest equal to a committed version returns that version and uploads nothing."""
    source = tmp_path / "model.bin"
    source.write_bytes(os.urandom(2048))
    result = run_sdk(
        tmp_path,
        f"""
        run = start_run()
        first = publish(run, {str(source)!r}, aliases=["best"])
        again = publish(run, {str(source)!r}, aliases=["again"])
        run.finish()
        emit(first=first.version, again=again.version)
        """,
    )
    assert result == {"first": "v0", "again": "v0"}
    assert server.created_versions == 1
    (version,) = server.versions("ckpt")
    assert version.aliases == {"best", "again", "latest"}
    assert server.operations().count("CommitArtifact") == 1
    assert server.operations().count("CreateArtifact") == 2


def test_public_api_aliases_stay_unique_and_delete_needs_delete_aliases(
    server: FakeWandbServer, tmp_path: Path
) -> None:
    """Api alias edits keep each alias on one version, and deleting needs delete_aliases."""
    sources = []
    for step in range(2):
        path = tmp_path / f"m{step}.bin"
        path.write_bytes(os.urandom(1024 + step))
        sources.append(path)
    result = run_sdk(
        tmp_path,
        f"""
        run = start_run()
        publish(run, {str(sources[0])!r}, aliases=["best"])
        publish(run, {str(sources[1])!r})
        run.finish()

        api = wandb.Api()
        path = f"{{ENTITY}}/{{PROJECT}}/ckpt"
        v1 = api.artifact(path + ":v1")
        v1.aliases.append("best")            # taken from v0 by the server
        v1.save()
        best_after_add = api.artifact(path + ":best").version
        v0_aliases = api.artifact(path + ":v0").aliases

        v1 = api.artifact(path + ":latest")
        v1.aliases.remove("best")
        v1.save()
        best_exists = True
        try:
            api.artifact(path + ":best")
        except Exception:
            best_exists = False

        refused = False
        try:
            api.artifact(path + ":v1").delete()
        except Exception:
            refused = True
        api.artifact(path + ":v1").delete(delete_aliases=True)
        listed = [a.version for a in api.artifact_collection("model", path).artifacts()]
        emit(best_after_add=best_after_add, v0_aliases=v0_aliases, best_exists=best_exists,
             refused=refused, listed=listed)
        """,
    )
    assert result == {
        "best_after_add": "v1",
        "v0_aliases": [],
        "best_exists": False,
        "refused": True,
        "listed": ["v0"],
    }
    assert server.alias_holder("ckpt", "best") is None
    assert [(v.version, v.state) for v in server.versions("ckpt", include_deleted=True)] == [
        ("v0", "COMMITTED"),
        ("v1", "DELETED"),
    ]
    assert {"AddAliases", "DeleteAliases", "UpdateArtifact", "DeleteArtifact"} <= set(
        server.operations()
    )


def test_download_returns_identical_bytes(server: FakeWandbServer, tmp_path: Path) -> None:
    """artifact.download() from a fresh cache fetches the stored bytes over GET and matches."""
    source = tmp_path / "model.bin"
    source.write_bytes(os.urandom(300_000))
    run_sdk(
        tmp_path,
        f"""
        run = start_run()
        publish(run, {str(source)!r}, metadata={{"loss": 0.5}})
        run.finish()
        emit()
        """,
    )
    target = tmp_path / "download"
    result = run_sdk(
        tmp_path,
        f"""
        api = wandb.Api()
        artifact = api.artifact(f"{{ENTITY}}/{{PROJECT}}/ckpt:latest")
        root = artifact.download({str(target)!r})
        emit(root=root, metadata=artifact.metadata, files=sorted(os.listdir(root)))
        """,
        WANDB_CACHE_DIR=str(tmp_path / "consumer-cache"),  # a consumer with an empty cache
    )
    assert result["metadata"] == {"loss": 0.5}
    assert result["files"] == ["model.bin"]
    assert (target / "model.bin").read_bytes() == source.read_bytes()
    (version,) = server.versions("ckpt")
    stored_object = version.files["model.bin"].name
    assert ("GET", f"/storage/{stored_object}", None) in server.requests


def test_injected_500_on_create_artifact_is_retried(
    server: FakeWandbServer, tmp_path: Path
) -> None:
    """One HTTP 500 on CreateArtifact is retried by wandb-core and the version still commits."""
    fault = server.inject("CreateArtifact", status=500)
    source = tmp_path / "model.bin"
    source.write_bytes(os.urandom(1024))
    result = run_sdk(
        tmp_path,
        f"""
        run = start_run()
        artifact = publish(run, {str(source)!r})
        run.finish()
        emit(version=artifact.version, state=artifact.state)
        """,
    )
    assert result == {"version": "v0", "state": "COMMITTED"}
    assert (fault.hits, fault.remaining) == (1, 0)
    assert server.operations().count("CreateArtifact") == 2
    assert [v.state for v in server.versions("ckpt")] == ["COMMITTED"]


def test_lost_create_artifact_answer_does_not_duplicate_the_version(
    server: FakeWandbServer, tmp_path: Path
) -> None:
    """A CreateArtifact that took effect but whose answer was reset is retried idempotently."""
    server.inject("CreateArtifact", reset=True, after=True)
    source = tmp_path / "model.bin"
    source.write_bytes(os.urandom(1024))
    result = run_sdk(
        tmp_path,
        f"""
        run = start_run()
        artifact = publish(run, {str(source)!r})
        run.finish()
        emit(version=artifact.version)
        """,
    )
    assert result == {"version": "v0"}
    assert server.operations().count("CreateArtifact") == 2
    assert server.created_versions == 1
    assert [v.state for v in server.versions("ckpt", include_deleted=True)] == ["COMMITTED"]


def test_bad_api_key_fails_wandb_init(server: FakeWandbServer, tmp_path: Path) -> None:
    """With auth failing, wandb.init raises at once instead of retrying the 401."""
    server.set_auth_failure(True)
    result = run_sdk(
        tmp_path,
        """
        try:
            start_run()
            emit(error=None)
        except Exception as exc:
            emit(error=type(exc).__name__)
        """,
    )
    assert result == {"error": "CommError"}


def test_run_query_and_public_log_artifact_record_lineage_without_moving_aliases(
    server: FakeWandbServer, tmp_path: Path
) -> None:
    """`Api().run(path)` reads runs made by `create_run` or `wandb.init` and raises for a
    missing one; `Run.log_artifact` on an older version makes that run an output of it without
    a new version and without touching any alias (`latest` stays on the newest)."""
    server.create_run(DEFAULT_ENTITY, PROJECT, "train-1", display_name="pretrain")
    sources = []
    for step in range(2):
        path = tmp_path / f"m{step}.bin"
        path.write_bytes(os.urandom(1024 + step))
        sources.append(path)
    result = run_sdk(
        tmp_path,
        f"""
        upload = start_run()
        publish(upload, {str(sources[0])!r}, aliases=["best"])
        publish(upload, {str(sources[1])!r})
        upload.finish()
        trainer = wandb.init(project=PROJECT, entity=ENTITY, job_type="train",
                             reinit="create_new")
        trainer.finish()

        api = wandb.Api()
        path = f"{{ENTITY}}/{{PROJECT}}/ckpt"
        helper_run = api.run(f"{{ENTITY}}/{{PROJECT}}/train-1")
        logged = helper_run.log_artifact(api.artifact(path + ":v0"))
        sdk_run = api.run(f"{{ENTITY}}/{{PROJECT}}/{{trainer.id}}")
        sdk_run.log_artifact(api.artifact(path + ":v1"))
        try:
            api.run(f"{{ENTITY}}/{{PROJECT}}/no-such-run")
            missing = None
        except Exception as exc:
            missing = f"{{type(exc).__name__}}: {{exc}}"
        emit(upload=upload.id, trainer=trainer.id, logged=logged.version,
             helper=[helper_run.id, helper_run.name, helper_run.state, helper_run.job_type],
             sdk=[sdk_run.id, sdk_run.job_type], missing=missing)
        """,
    )
    upload, trainer = result["upload"], result["trainer"]
    assert result["helper"] == ["train-1", "pretrain", "finished", "train"]
    assert result["sdk"] == [trainer, "train"]
    assert result["missing"].startswith("CommError: Could not find run")  # RunNotFoundError
    assert result["logged"] == "v0"
    assert server.created_versions == 2
    v0, v1 = server.versions("ckpt")
    assert v0.output_runs == {upload, "train-1"} and v0.run == upload
    assert v1.output_runs == {upload, trainer}
    assert server.output_runs("ckpt", "v1") == {upload, trainer}
    assert (v0.aliases, v1.aliases) == ({"best"}, {"latest"})
    by_name = {r.name: r for r in server.runs()}
    assert by_name["train-1"].logged_artifacts == (v0.id,)
    assert by_name[upload].logged_artifacts == (v0.id, v1.id)
    assert server.operations().count("Run") == 3


# ---------------------------------------------------------------------------------------------
# Protocol edges, straight over HTTP.


def test_unknown_operation_yields_graphql_error() -> None:
    """An operation the fake does not implement is a GraphQL error naming it, never ``{}``."""
    with FakeWandbServer() as server:  # not the fixture: that one forbids unknown operations
        status, body = graphql(server, "query SomethingNew($x: ID!) { somethingNew(id: $x) }")
        assert status == 200
        assert body["errors"] == [{"message": "unknown operation SomethingNew"}]
        assert ("POST", "/graphql", "SomethingNew") in server.requests
        assert server.unknown_operations == ["SomethingNew"]


def test_wrong_key_gets_401(server: FakeWandbServer) -> None:
    """GraphQL with a key other than the configured one is refused with HTTP 401."""
    assert graphql(server, "query Viewer { viewer { id } }", key="x" * 40)[0] == 401
    status, body = graphql(server, "query Viewer { viewer { id } }")
    assert status == 200 and body["data"]["viewer"]["entity"] == DEFAULT_ENTITY


def _create_pending_artifact(server: FakeWandbServer, aliases: tuple[str, ...] = ()) -> str:
    """CreateArtifact as wandb-core sends it; returns the new artifact's id."""
    _status, body = graphql(
        server,
        "mutation CreateArtifact($input: CreateArtifactInput!) { createArtifact { x } }",
        {
            "input": {
                "entityName": DEFAULT_ENTITY,
                "projectName": PROJECT,
                "artifactTypeName": "model",
                "artifactCollectionName": "raw",
                "digest": os.urandom(8).hex(),
                "aliases": [{"alias": a, "artifactCollectionName": "raw"} for a in aliases],
            }
        },
    )
    return str(body["data"]["createArtifact"]["artifact"]["id"])


def _create_files(server: FakeWandbServer, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """CreateArtifactFiles for ``specs``; returns the file nodes (upload URLs)."""
    _status, body = graphql(
        server,
        "mutation CreateArtifactFiles($input: CreateArtifactFilesInput!) { x }",
        {"input": {"artifactFiles": specs, "storageLayout": "V2"}},
    )
    return [edge["node"] for edge in body["data"]["createArtifactFiles"]["files"]["edges"]]


def _put(server: FakeWandbServer, url: str, data: bytes) -> tuple[int, bytes]:
    """PUT ``data`` to an upload URL with the right Content-MD5, as wandb-core does."""
    headers = {"Content-MD5": b64_md5(data)}
    return request(server, "PUT", url.removeprefix(server.url), data, headers=headers)


def _commit(server: FakeWandbServer, artifact_id: str, contents: dict[str, bytes]) -> None:
    """Upload a manifest listing ``contents`` and commit; fails the test on any error."""
    manifest = {
        "version": 1,
        "contents": {n: {"digest": b64_md5(d), "size": len(d)} for n, d in contents.items()},
    }
    _status, created = graphql(
        server,
        "mutation CreateArtifactManifest { x }",
        {"artifactID": artifact_id, "digest": "m", "includeUpload": True},
    )
    manifest_file = created["data"]["createArtifactManifest"]["artifactManifest"]["file"]
    assert _put(server, manifest_file["uploadUrl"], json.dumps(manifest).encode())[0] == 200
    _status, committed = graphql(
        server, "mutation CommitArtifact { x }", {"artifactID": artifact_id}
    )
    assert "errors" not in committed, committed


def test_upload_with_wrong_content_md5_is_rejected(server: FakeWandbServer) -> None:
    """A PUT whose body does not match its Content-MD5 gets 400 and stores nothing."""
    artifact_id = _create_pending_artifact(server)
    (node,) = _create_files(
        server, [{"artifactID": artifact_id, "name": "a.bin", "md5": b64_md5(b"right")}]
    )
    path = node["uploadUrl"].removeprefix(server.url)
    bad = request(server, "PUT", path, b"wrong", headers={"Content-MD5": b64_md5(b"right")})
    assert bad[0] == 400
    assert request(server, "GET", path)[0] == 404
    assert _put(server, node["uploadUrl"], b"right")[0] == 200
    assert request(server, "GET", path) == (200, b"right")


def test_multipart_upload_is_assembled_and_committed(server: FakeWandbServer) -> None:
    """Parts PUT to multipart URLs are checked, joined on completion and commit the version."""
    artifact_id = _create_pending_artifact(server)
    parts = [os.urandom(1000), os.urandom(500)]
    whole = b"".join(parts)
    (node,) = _create_files(
        server,
        [
            {
                "artifactID": artifact_id,
                "name": "big.bin",
                "md5": b64_md5(whole),
                "uploadPartsInput": [
                    {"partNumber": n + 1, "hexMD5": hashlib.md5(p).hexdigest()}
                    for n, p in enumerate(parts)
                ],
            }
        ],
    )
    assert node["uploadUrl"] is not None  # a null here makes wandb-core skip the file
    multipart = node["uploadMultipartUrls"]
    etags = []
    for part, url_part in zip(parts, multipart["uploadUrlParts"], strict=True):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        path = url_part["uploadUrl"].removeprefix(server.url)
        conn.request("PUT", path, part, {"Content-MD5": b64_md5(part)})
        response = conn.getresponse()
        response.read()
        conn.close()
        assert response.status == 200
        etags.append(str(response.getheader("ETag")).strip('"'))
    assert etags == [hashlib.md5(p).hexdigest() for p in parts]
    _status, done = graphql(
        server,
        "mutation CompleteMultipartUploadArtifact { x }",
        {
            "completeMultipartAction": "Complete",
            "completedParts": [{"partNumber": n + 1, "hexMD5": e} for n, e in enumerate(etags)],
            "artifactID": artifact_id,
            "storagePath": node["storagePath"],
            "uploadID": multipart["uploadID"],
        },
    )
    assert done["data"]["completeMultipartUploadArtifact"]["digest"] == b64_md5(whole)
    _commit(server, artifact_id, {"big.bin": whole})
    (version,) = server.versions("raw")
    assert version.state == "COMMITTED"
    assert version.read_bytes("big.bin") == whole


def test_commit_refuses_a_manifest_file_that_was_never_uploaded(server: FakeWandbServer) -> None:
    """CommitArtifact fails when a manifest entry has no stored bytes with its digest."""
    artifact_id = _create_pending_artifact(server)
    _create_files(server, [{"artifactID": artifact_id, "name": "a.bin", "md5": b64_md5(b"a")}])
    with pytest.raises(AssertionError, match="never uploaded"):
        _commit(server, artifact_id, {"a.bin": b"a"})
    assert [v.state for v in server.versions("raw")] == ["PENDING"]


def test_aliases_on_commit_keeps_aliases_off_pending_versions(tmp_path: Path) -> None:
    """With aliases_on_commit, a version takes its aliases (and latest) only when committed."""
    with FakeWandbServer(aliases_on_commit=True, storage_dir=tmp_path / "store") as server:
        first = _create_pending_artifact(server, aliases=("best",))
        stuck = _create_pending_artifact(server, aliases=("best",))
        assert server.alias_holder("raw", "best") is None
        assert server.alias_holder("raw", "latest") is None
        (node,) = _create_files(server, [{"artifactID": first, "name": "a", "md5": b64_md5(b"a")}])
        assert _put(server, node["uploadUrl"], b"a")[0] == 200
        _commit(server, first, {"a": b"a"})
        assert server.alias_holder("raw", "best") == "v0"
        assert server.alias_holder("raw", "latest") == "v0"
        pending = server.versions("raw")[1]
        assert (pending.id, pending.state, pending.aliases) == (stuck, "PENDING", frozenset())


def test_status_fault_sends_retry_after_then_clears(server: FakeWandbServer) -> None:
    """A status fault answers its status with Retry-After for `times` requests, then stops."""
    fault = server.inject("Viewer", status=429, retry_after=2, times=2)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    body = json.dumps({"query": "query Viewer { viewer { id } }"})
    auth = "Basic " + base64.b64encode(f"api:{API_KEY}".encode()).decode()
    statuses = []
    for _ in range(3):
        conn.request("POST", "/graphql", body, {"Authorization": auth})
        response = conn.getresponse()
        response.read()
        statuses.append((response.status, response.getheader("Retry-After")))
    conn.close()
    assert statuses == [(429, "2"), (429, "2"), (200, None)]
    assert (fault.hits, fault.remaining) == (2, 0)


def test_delay_fault_stalls_then_answers(server: FakeWandbServer) -> None:
    """A delay fault holds the request for the given time and then handles it normally."""
    server.inject("/graphql", delay=0.3)
    started = time.monotonic()
    status, _body = graphql(server, "query Viewer { viewer { id } }")
    assert status == 200
    assert time.monotonic() - started >= 0.3


def test_reset_fault_closes_the_connection_without_answer(server: FakeWandbServer) -> None:
    """reset=True drops the connection with no HTTP response, for the next request only."""
    fault = server.inject("/graphql", reset=True)
    with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
        graphql(server, "query Viewer { viewer { id } }")
    assert fault.hits == 1
    assert graphql(server, "query Viewer { viewer { id } }")[0] == 200
