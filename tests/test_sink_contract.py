"""The sink contract (`ckptd.sinks.Sink`), run against every sink.

Each sink is driven through the same calls and must give the same answers: the W&B sink with
the real SDK against the loopback W&B server, online (and offline where it can: publishing
and `recorded`), and the in-memory sink that the coordinator's tests publish to; and the W&B
sink handed references (`SinkFile.ref`) to files on a shared filesystem and to objects in
loopback S3. A new sink adds a `Harness` here. What a sink cannot do it must say in
`capabilities`, and then refuse with a permanent PublishError.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from ckptd.config import load_config
from ckptd.errors import PublishError, VersionLinked
from ckptd.sinks import Pending, PublishedVersion, PublishRequest, Sink, SinkFile, VersionFacts
from ckptd.sinks.memory import MemorySink
from ckptd.sinks.wandb import WandbSink
from tests.support.fake_wandb import FakeWandbServer
from tests.support.s3 import LoopbackS3

PROJECT = "contract"
_names = itertools.count()


@dataclass
class Harness:
    """A sink under test and the means to break or inspect its destination."""

    name: str
    sink: Sink
    fail_deletes: Callable[[], None]  # the next delete fails permanently (403)
    link: Callable[[str, str], None]  # (collection, version): link it into a registry
    stored: Callable[[str], int]  # how many versions the destination created in a collection
    refs: str | None = None  # the URI prefix the sink is handed references under, if it is


def _wandb_config(root: Path, server: FakeWandbServer, mode: str) -> Path:
    path = root / f"{mode}.yaml"
    path.write_text(
        f"state_dir: {root / f'state-{mode}'}\n"
        f'wandb: {{mode: {mode}, project: {PROJECT}, base_url: "{server.url}"}}\n'
        f"watch: [{{path: {root / 'ck'}}}]\n"
    )
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeWandbServer]:
    with FakeWandbServer() as fake:
        yield fake


@pytest.fixture
def wandb_online(
    server: FakeWandbServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Harness]:
    root = tmp_path_factory.mktemp("wandb-online")
    with pytest.MonkeyPatch.context() as patch:
        for key, value in server.env(root).items():
            patch.setenv(key, value)
        config = load_config(_wandb_config(root, server, "online"))
        sink = WandbSink(config, server.api_key)

        def fail_deletes() -> None:
            server.inject("DeleteArtifact", status=403)

        def link(collection: str, version: str) -> None:
            server.link(collection, version, project=PROJECT)

        def stored(collection: str) -> int:
            return len(server.versions(collection, PROJECT, include_deleted=True))

        yield Harness("wandb-online", sink, fail_deletes, link, stored)
        sink.close()


@pytest.fixture
def memory() -> Harness:
    sink = MemorySink()

    def fail_deletes() -> None:
        sink.fail("delete_version", PublishError("403 forbidden", transient=False))

    def link(collection: str, version: str) -> None:
        sink.link(collection, version, "wandb-registry-model/demo")

    def stored(collection: str) -> int:
        return len(sink.collections.get(collection, []))

    return Harness("memory", sink, fail_deletes, link, stored)


class Referencing:
    """A sink handed references instead of files, as a watch entry with `reference` hands
    them (`SinkFile.ref`): `refer` first puts each file's bytes where its reference points
    (the object a mount would have uploaded; on a shared filesystem, the file itself)."""

    def __init__(self, sink: Sink, refer: Callable[[SinkFile], SinkFile]) -> None:
        self._sink = sink
        self._refer = refer
        self.capabilities = sink.capabilities

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sink, name)

    def submit(self, request: PublishRequest) -> Pending:
        return self._sink.submit(self._referring(request))

    def publish(self, request: PublishRequest) -> PublishedVersion:
        return self._sink.publish(self._referring(request))

    def _referring(self, request: PublishRequest) -> PublishRequest:
        return replace(request, files=tuple(self._refer(f) for f in request.files))


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackS3]:
    with LoopbackS3(tmp_path_factory.mktemp("aws")) as store:
        store.client().create_bucket(Bucket="contract")
        yield store


@pytest.fixture
def wandb_file_refs(wandb_online: Harness) -> Harness:
    """W&B holding file:// references (`reference: file`)."""

    def refer(file: SinkFile) -> SinkFile:
        return replace(file, ref=file.path.as_uri())

    sink = Referencing(wandb_online.sink, refer)
    return replace(wandb_online, name="wandb-file-refs", sink=sink, refs="file://")


@pytest.fixture
def wandb_s3_refs(
    wandb_online: Harness, s3: LoopbackS3, monkeypatch: pytest.MonkeyPatch
) -> Harness:
    """W&B holding references to objects in loopback S3 (`reference: {uri: s3://...}`)."""
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    client = s3.client()

    def refer(file: SinkFile) -> SinkFile:
        key = f"mnt/{file.path.parent.name}/{file.name}"
        client.put_object(Bucket="contract", Key=key, Body=file.path.read_bytes())
        return replace(file, ref=f"s3://contract/{key}")

    sink = Referencing(wandb_online.sink, refer)
    return replace(wandb_online, name="wandb-s3-refs", sink=sink, refs="s3://contract/")


_HARNESSES = {
    "memory": "memory",
    "wandb-online": "wandb_online",
    "wandb-file-refs": "wandb_file_refs",
    "wandb-s3-refs": "wandb_s3_refs",
}


@pytest.fixture(params=list(_HARNESSES))
def harness(request: pytest.FixtureRequest) -> Harness:
    harness = request.getfixturevalue(_HARNESSES[request.param])
    assert isinstance(harness, Harness)
    return harness


def collection_name() -> str:
    """A collection of its own for each test (the W&B server is shared by the module)."""
    return f"contract-{next(_names)}"


def publish_request(
    tmp_path: Path,
    collection: str,
    step: int,
    *,
    aliases: tuple[str, ...] = (),
    content: bytes | None = None,
    metrics: dict[str, float] | None = None,
) -> PublishRequest:
    body = content if content is not None else f"checkpoint {collection} {step}".encode()
    path = tmp_path / f"{collection}-{step}-{hashlib.md5(body).hexdigest()[:8]}" / "model.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body)
    md5 = base64.b64encode(hashlib.md5(body).digest()).decode()
    return PublishRequest(
        collection=collection,
        type="model",
        files=(SinkFile("model.pt", path, md5, len(body)),),
        aliases=aliases,
        facts=VersionFacts(step=step, metrics=metrics or {}, files={"model.pt": len(body)}),
        key=f"{collection}:{step}:{md5}",
    )


def test_a_published_version_is_listed_with_its_step_metrics_and_aliases(
    harness: Harness, tmp_path: Path
) -> None:
    """publish -> versions: the facts ckptd wrote come back decoded; `latest` is on the
    newest; an unknown collection lists as []."""
    sink, collection = harness.sink, collection_name()
    assert sink.versions(collection, "model") == []
    first = sink.publish(publish_request(tmp_path, collection, 10, aliases=("step-10",)))
    second = sink.publish(
        publish_request(
            tmp_path, collection, 20, aliases=("step-20", "best"), metrics={"loss": 0.5}
        )
    )
    assert (first.version, second.version, first.committed) == ("v0", "v1", True)
    listed = sink.versions(collection, "model")
    assert [(v.version, v.index, v.step) for v in listed] == [("v0", 0, 10), ("v1", 1, 20)]
    assert set(listed[1].aliases) == {"latest", "step-20", "best"}
    assert set(listed[0].aliases) == {"step-10"}
    assert listed[1].metrics == {"loss": 0.5}
    assert listed[0].size == len(f"checkpoint {collection} 10".encode())


def test_the_same_content_or_key_publishes_no_second_version(
    harness: Harness, tmp_path: Path
) -> None:
    """Publishing is idempotent: the same bytes again return the version that holds them."""
    sink, collection = harness.sink, collection_name()
    request = publish_request(tmp_path, collection, 1)
    assert sink.publish(request).version == "v0"
    assert sink.publish(request).version == "v0"
    assert harness.stored(collection) == 1


def test_an_alias_lives_on_one_version_and_can_be_moved_back(
    harness: Harness, tmp_path: Path
) -> None:
    """A best alias moves to the version that wins it; `move_alias` puts `latest` back on
    an older version (what the publisher does after a late older step)."""
    sink, collection = harness.sink, collection_name()
    sink.publish(publish_request(tmp_path, collection, 1, aliases=("best",)))
    sink.publish(publish_request(tmp_path, collection, 2, aliases=("best",)))
    holders = {v.version: set(v.aliases) for v in sink.versions(collection, "model")}
    assert holders == {"v0": set(), "v1": {"best", "latest"}}
    assert sink.capabilities.moves_aliases
    sink.move_alias(collection, "model", "latest", "v0")
    holders = {v.version: set(v.aliases) for v in sink.versions(collection, "model")}
    assert holders == {"v0": {"latest"}, "v1": {"best"}}


def test_versions_are_committed_in_the_order_they_were_submitted(
    harness: Harness, tmp_path: Path
) -> None:
    """`submit` hands version N+1 over before N is committed; results come in that order."""
    sink, collection = harness.sink, collection_name()
    pending = [sink.submit(publish_request(tmp_path, collection, step)) for step in (1, 2, 3)]
    assert [p.result().version for p in pending] == ["v0", "v1", "v2"]
    listed = sink.versions(collection, "model")
    assert [v.step for v in listed] == [1, 2, 3]
    assert "latest" in listed[-1].aliases


def test_delete_is_idempotent_and_refuses_a_linked_version(
    harness: Harness, tmp_path: Path
) -> None:
    """A deleted version is gone with its aliases; deleting it again is no error; a version
    linked into a registry is never deleted (VersionLinked); a refused delete is permanent."""
    sink, collection = harness.sink, collection_name()
    for step in (1, 2, 3):
        sink.publish(publish_request(tmp_path, collection, step, aliases=(f"step-{step}",)))
    sink.delete_version(collection, "model", "v0")
    sink.delete_version(collection, "model", "v0")
    assert [v.version for v in sink.versions(collection, "model")] == ["v1", "v2"]
    harness.link(collection, "v1")
    assert sink.links(collection, "model", "v1")
    assert sink.links(collection, "model", "v2") == ()
    with pytest.raises(VersionLinked):
        sink.delete_version(collection, "model", "v1")
    harness.fail_deletes()
    with pytest.raises(PublishError) as refused:
        sink.delete_version(collection, "model", "v2")
    assert not refused.value.transient
    assert [v.version for v in sink.versions(collection, "model")] == ["v1", "v2"]


def test_resolve_and_download_give_back_the_published_bytes(
    harness: Harness, tmp_path: Path
) -> None:
    """`resolve` finds a version by alias or number with each file's size and md5 (None for
    a name that does not exist); `download` writes the bytes that were published."""
    sink, collection = harness.sink, collection_name()
    sink.publish(publish_request(tmp_path, collection, 1, content=b"first", aliases=("best",)))
    sink.publish(publish_request(tmp_path, collection, 2, content=b"second"))
    assert sink.resolve(collection, "production") is None
    best = sink.resolve(collection, "best")
    assert best is not None and best.version == "v0" and best.label.endswith(f"{collection}:v0")
    (file,) = best.files
    md5 = base64.b64encode(hashlib.md5(b"first").digest()).decode()
    assert (file.name, file.size, file.md5_b64) == ("model.pt", 5, md5)
    assert file.ref is None if harness.refs is None else file.ref.startswith(harness.refs)
    latest = sink.resolve(collection, "v1")
    assert latest is not None
    dest = tmp_path / f"restored-{harness.name}"
    dest.mkdir()
    sink.download(latest, dest)
    assert (dest / "model.pt").read_bytes() == b"second"


def test_a_reachable_destination_has_no_problem(harness: Harness) -> None:
    assert harness.sink.problem(0.0) is None
    assert harness.sink.recorded("any", ["a", "b"]) == {"a", "b"}


# -- what a sink cannot do it says, and refuses ------------------------------------------------


@pytest.fixture
def wandb_offline(
    server: FakeWandbServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[WandbSink]:
    for key, value in server.env(tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("WANDB_MODE", "offline")
    sink = WandbSink(load_config(_wandb_config(tmp_path, server, "offline")))
    yield sink
    sink.close()


def test_offline_w_and_b_says_what_it_cannot_do_and_confirms_later(
    wandb_offline: WandbSink, tmp_path: Path
) -> None:
    """W&B offline mode: versions are recorded for `wandb sync` (committed=False until the
    run file holds them); it cannot list, delete, move or read, and says so permanently."""
    sink = wandb_offline
    caps = sink.capabilities
    assert caps.confirms_later and not (caps.lists_versions or caps.moves_aliases or caps.reads)
    assert "offline" in caps.limits
    request = publish_request(tmp_path, "offline-contract", 1)
    published = sink.publish(request)
    assert (published.version, published.committed) == (None, False)
    for refused in (
        lambda: sink.versions("offline-contract", "model"),
        lambda: sink.move_alias("offline-contract", "model", "latest", "v0"),
        lambda: sink.resolve("offline-contract", "latest"),
    ):
        with pytest.raises(PublishError) as error:
            refused()
        assert not error.value.transient
    assert sink.problem(0.0) is None  # nothing to reach
    sink.close()  # finishing the run writes its records
    assert sink.recorded("offline-contract", [request.key or ""]) == {request.key}


def test_an_unreachable_server_is_a_problem_naming_it(tmp_path: Path) -> None:
    """`problem` names the host that does not answer (for /readyz)."""
    path = tmp_path / "c.yaml"
    path.write_text(
        'wandb: {mode: online, base_url: "http://127.0.0.1:9"}\n'
        f"state_dir: {tmp_path / 'state'}\nwatch: [{{path: {tmp_path}}}]\n"
    )
    problem = WandbSink(load_config(path), "k").problem(0.0)
    assert problem is not None and "cannot reach http://127.0.0.1:9" in problem
    memory = MemorySink()
    memory.unreachable = "cannot reach memory"
    assert memory.problem(0.0) == "cannot reach memory"
