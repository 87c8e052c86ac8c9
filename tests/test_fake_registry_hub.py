"""The loopback servers' promotion semantics, pinned on the wire: W&B's registry links
(raw GraphQL as the SDK sends it) and the Hub's commit API (the real `huggingface_hub`);
and the Hub target reading from the in-memory sink."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ckptd.config import load_config
from ckptd.errors import PromotionRefused, PublishError
from ckptd.hashing import md5_b64
from ckptd.sinks import PublishRequest, SinkFile, VersionFacts
from ckptd.sinks.hub import HubTarget
from ckptd.sinks.memory import MemorySink
from ckptd.sinks.promotion import Promotion
from tests.support.fake_hub import TOKEN, FakeHubServer, git_blob_sha1
from tests.support.fake_wandb import DEFAULT_ENTITY, DEFAULT_ORG, FakeWandbServer
from tests.test_fake_wandb_server import _commit, _create_pending_artifact, graphql

LINK = "mutation LinkArtifact($input: LinkArtifactInput!) { result: linkArtifact { x } }"
LINK_WITH_MEMBERSHIP = "mutation LinkArtifact { result { versionIndex artifactMembership { x } } }"


def committed(server: FakeWandbServer) -> str:
    artifact_id = _create_pending_artifact(server)
    _commit(server, artifact_id, {})
    return artifact_id


def link(
    server: FakeWandbServer, artifact_id: str, aliases: list[str], entity: str = DEFAULT_ORG
) -> dict[str, Any]:
    _status, body = graphql(server, LINK, {"input": {
        "artifactID": artifact_id, "artifactPortfolioName": "demo", "entityName": entity,
        "projectName": "wandb-registry-model",
        "aliases": [{"artifactCollectionName": "demo", "alias": a} for a in aliases],
    }})  # fmt: skip
    return body


def test_registry_links_are_one_per_version_with_aliases_unique_in_the_collection() -> None:
    """Linking a version twice keeps one membership; an alias moves to the version linked
    with it; `latest` is on the newest link; FetchLinkedArtifacts and a lookup by name in
    the registry see the same; a personal entity is no organization."""
    with FakeWandbServer() as server:
        first, second = committed(server), committed(server)
        assert link(server, first, ["candidate"])["data"]["result"] == {"versionIndex": 0}
        assert link(server, first, ["candidate"])["data"]["result"] == {"versionIndex": 0}
        assert link(server, second, ["candidate"])["data"]["result"] == {"versionIndex": 1}
        members = server.registry("wandb-registry-model/demo")
        assert [(m.version, m.source, set(m.aliases)) for m in members] == [
            ("v0", "raw:v0", set()), ("v1", "raw:v1", {"candidate", "latest"}),
        ]  # fmt: skip
        _status, linked = graphql(
            server, "query FetchLinkedArtifacts { x }", {"artifactID": second}
        )
        nodes = [e["node"] for e in linked["data"]["artifact"]["artifactMemberships"]["edges"]]
        assert [n["artifactCollection"]["__typename"] for n in nodes] == [
            "ArtifactSequence", "ArtifactPortfolio",
        ]  # fmt: skip
        assert {a["alias"] for a in nodes[1]["aliases"]} == {"candidate", "latest"}
        _status, found = graphql(server, "query ArtifactMembershipByName { x }", {
            "entity": DEFAULT_ORG, "project": "wandb-registry-model", "name": "demo:candidate",
        })  # fmt: skip
        membership = found["data"]["project"]["artifactCollectionMembership"]
        assert (membership["versionIndex"], membership["artifact"]["id"]) == (1, second)
        _status, answer = graphql(server, LINK_WITH_MEMBERSHIP, {"input": {
            "artifactID": first, "artifactPortfolioName": "demo", "entityName": DEFAULT_ORG,
            "projectName": "wandb-registry-model", "aliases": [],
        }})  # fmt: skip
        assert answer["data"]["result"]["artifactMembership"]["versionIndex"] == 0
        refused = link(server, first, [], entity=DEFAULT_ENTITY)
        assert "is not an organization" in refused["errors"][0]["message"]


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHubServer]:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    with FakeHubServer() as server:
        yield server


# huggingface_hub passes a file to httpx's `data=` for LFS uploads; httpx deprecates that.
# The library's own call, not ours: the upload still sends the file's bytes, checked below.
@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
def test_hub_commits_keep_bytes_skip_unchanged_files_and_refuse_what_the_hub_refuses(
    hub: FakeHubServer, tmp_path: Path
) -> None:
    """A commit's LFS and regular files arrive byte for byte; the same files again make no
    commit; a second tag of one name is a 409; no token is a 401; an LFS file never
    uploaded cannot be committed (422)."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    weights, config = tmp_path / "model.safetensors", tmp_path / "config.json"
    weights.write_bytes(bytes(range(256)) * 40)
    config.write_text('{"model_type": "gpt2"}')
    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.create_repo("org/m", private=True)

    def commit() -> str:
        ops = [CommitOperationAdd("model.safetensors", str(weights)),
               CommitOperationAdd("config.json", str(config))]  # fmt: skip
        return str(api.create_commit("org/m", ops, commit_message="add").oid)

    oid = commit()
    assert commit() == oid
    repo = hub.repo("org/m")
    assert repo is not None and repo.private and len(repo.commits) == 1
    assert repo.commits[0].files == {
        "model.safetensors": weights.read_bytes(), "config.json": config.read_bytes(),
    }  # fmt: skip
    api.create_tag("org/m", tag="step-1", revision=oid)
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_tag("org/m", tag="step-1", revision=oid)
    assert conflict.value.response.status_code == 409
    with pytest.raises(HfHubHTTPError) as unauthorized:
        HfApi(endpoint=hub.url, token="hf_wrong").list_repo_refs("org/m")
    assert unauthorized.value.response.status_code == 401

    body = b"\n".join(json.dumps(line).encode() for line in [
        {"key": "header", "value": {"summary": "sneaky"}},
        {"key": "lfsFile", "value": {"path": "x.bin", "algo": "sha256", "oid": "0" * 64,
                                     "size": 3}},
    ])  # fmt: skip
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/x-ndjson"}
    url = f"{hub.url}/api/models/org/m/commit/main"  # loopback http only
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)  # noqa: S310
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)  # noqa: S310 - loopback
    assert refused.value.code == 422
    assert git_blob_sha1(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"  # git's own


def _memory_version(sink: MemorySink, tmp_path: Path, files: dict[str, bytes], step: int) -> None:
    """Publish `files` as the next version of model-checkpoint in the memory sink."""
    root = tmp_path / f"ckpt-{step}"
    root.mkdir()
    parts = []
    for name, data in files.items():
        (root / name).write_bytes(data)
        parts.append(SinkFile(name, root / name, md5_b64(root / name), len(data)))
    facts = VersionFacts(step=step, metrics={"val_loss": 0.5})
    sink.publish(PublishRequest("model-checkpoint", "model", tuple(parts), (), facts))


# As above: huggingface_hub hands httpx a file for LFS uploads.
@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
def test_the_hub_target_releases_from_any_sink_and_refuses_what_is_no_model(
    hub: FakeHubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From the in-memory sink: a PEFT adapter is released (adapter files and card only); a
    version with no config is refused alone (PromotionRefused) with nothing committed; a
    download whose bytes do not match the sink's md5 is a transient error."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    config_path = tmp_path / "ckptd.yaml"
    config_path.write_text(
        f'state_dir: {tmp_path / "state"}\nhuggingface: {{endpoint: "{hub.url}"}}\n'
        "watch: [{path: ck}]\n"
    )
    config = load_config(config_path)
    sink = MemorySink()
    adapter = {"adapter_config.json": b'{"base_model_name_or_path": "gpt2", "r": 2}',
               "adapter_model.safetensors": b"\0" * 300, "optimizer.pt": b"state"}  # fmt: skip
    _memory_version(sink, tmp_path, adapter, 10)
    _memory_version(sink, tmp_path, {"model.pt": b"weights"}, 20)
    target = HubTarget(config, "org/adapter", sink)

    result = target.promote(Promotion("model-checkpoint", "model", "v0", 10))
    assert result.startswith("released model-checkpoint:v0 on org/adapter (committed")
    repo = hub.repo("org/adapter")
    assert repo is not None and repo.tags == {"step-10": repo.commits[0].oid}
    files = repo.commits[0].files
    assert set(files) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    assert files["adapter_model.safetensors"] == adapter["adapter_model.safetensors"]
    assert b"base_model: gpt2" in files["README.md"]

    with pytest.raises(PromotionRefused, match="not an HF-loadable layout"):
        target.promote(Promotion("model-checkpoint", "model", "v1", 20))
    assert len(repo.commits) == 1

    _memory_version(sink, tmp_path, {"config.json": b"{}", "model.safetensors": b"1" * 9}, 30)
    stored = sink.collections["model-checkpoint"][-1]
    stored.files["model.safetensors"] = (b"2" * 9, stored.files["model.safetensors"][1])
    with pytest.raises(PublishError, match="downloaded corrupt") as corrupt:
        target.promote(Promotion("model-checkpoint", "model", "v2", 30))
    assert corrupt.value.transient
    assert list((tmp_path / "state" / "promote").iterdir()) == []  # nothing left behind
    target.close()
