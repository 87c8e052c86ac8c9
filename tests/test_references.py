"""Reference artifacts (`watch[].reference`): versions that point at the checkpoint files
where they already live, end to end with the real daemon, the real wandb SDK, the loopback
W&B server and a real S3-compatible endpoint on loopback (moto's server)."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import socket
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ckptd import references
from ckptd.checkpoint import stat_files
from ckptd.config import ObjectStoreReference, load_config
from ckptd.errors import ConfigError, PublishError
from ckptd.restore import RestoreError, refuse_references
from ckptd.sinks import SinkFile, StoredFile
from ckptd.sinks.wandb import _add_reference as add_reference
from ckptd.sinks.wandb import _reference_md5 as reference_md5
from tests.conftest import CKPTD, Daemon
from tests.support.fake_wandb import FakeWandbServer, VersionInfo
from tests.support.s3 import LoopbackS3
from tests.support.wandb_offline import _artifact_records as artifact_records
from tests.support.wandb_offline import find_run_files, read_records

S3_CONFIG = """\
state_dir: state
wandb: {{mode: online, project: refs, base_url: "{url}"}}
metrics: {{listen: null}}
upload: {{retry: {{initial_delay: 200ms, max_delay: 1s}}}}
watch:
  - path: mnt/run-7
    artifact: model-checkpoint
    settle: 1s
    sidecar: {{expect: never}}
    reference: {{uri: "s3://{bucket}/jobs", local: mnt}}
    retention: {{remote: {{keep_last: 2}}}}
"""

FILE_CONFIG = """\
state_dir: state
wandb: {{mode: online, project: refs, base_url: "{url}"}}
metrics: {{listen: null}}
watch:
  - path: shared
    artifact: model-checkpoint
    settle: 1s
    sidecar: {{expect: never}}
    reference: file
"""


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[LoopbackS3]:
    """moto's S3 server on loopback, for this test only."""
    with LoopbackS3(tmp_path / "aws") as server:
        yield server


def md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def zip_bytes(payload: bytes) -> bytes:
    """A small zip checkpoint (what torch.save writes) holding `payload`."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("data.pkl", payload)
    return buffer.getvalue()


def land(root: Path, name: str, data: bytes) -> Path:
    """Write `root/name` by rename, as a trainer does: finished the moment it appears."""
    tmp = root / f".{name}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, root / name)
    return root / name


def restore(config: Path, env: dict[str, str], dest: Path, *args: str) -> str:
    """`ckptd restore model-checkpoint --to DEST ARGS... --config CONFIG`; must exit 0."""
    result = subprocess.run(
        [*CKPTD, "restore", "model-checkpoint", "--to", str(dest), *args, "--config", str(config)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def file_uploads(server: FakeWandbServer) -> list[str]:
    """The GraphQL calls that ask the W&B server for somewhere to put artifact files."""
    return [op for op in server.operations() if op == "CreateArtifactFiles"]


def entry(version: VersionInfo, name: str) -> dict[str, object]:
    """The manifest entry of `name` in `version`, without the SDK's own bookkeeping."""
    assert version.manifest is not None
    found: dict[str, object] = dict(version.manifest["contents"][name])
    found.pop("skip_cache", None)
    return found


def test_s3_mount_versions_reference_the_objects_and_restore_fetches_them(
    tmp_path: Path,
    wandb_server: FakeWandbServer,
    online_env: dict[str, str],
    s3: LoopbackS3,
    start_daemon: Callable[..., Daemon],
) -> None:
    """A watch over a mount of s3://bucket/jobs/: three checkpoints become three versions whose
    manifests reference the objects with the ETags the store reports (a multipart ETag for
    the third) and no uploaded byte; a file whose object is not there yet is retried until
    the mount uploads it; retention deletes v0 on W&B and leaves its object; `ckptd restore`
    writes files equal to the objects, from a single-part and from a multipart object."""
    bucket = "ckptd-refs"
    client = s3.client()
    client.create_bucket(Bucket=bucket)
    mount = tmp_path / "mnt"
    (mount / "run-7").mkdir(parents=True)
    config = tmp_path / "ckptd.yaml"
    config.write_text(S3_CONFIG.format(url=wandb_server.url, bucket=bucket))
    env = {**online_env, **s3.env()}
    payloads = {
        "ckpt_1.pt": zip_bytes(os.urandom(40_000)),
        "ckpt_2.pt": zip_bytes(os.urandom(50_000)),
        "ckpt_3.pt": zip_bytes(os.urandom(11 * 2**20)),  # over 5 MiB: two parts
    }
    keys = {name: f"jobs/run-7/{name}" for name in payloads}

    daemon = start_daemon("--config", str(config), env=env)
    daemon.wait_for_log("ckptd started")
    # ckpt_1: the object is in the bucket when the file appears in the mount.
    client.put_object(Bucket=bucket, Key=keys["ckpt_1.pt"], Body=payloads["ckpt_1.pt"])
    land(mount / "run-7", "ckpt_1.pt", payloads["ckpt_1.pt"])
    daemon.wait_for_log("as model-checkpoint:v0")
    # ckpt_2: the mount uploads the object late; the daemon retries until it is there.
    land(mount / "run-7", "ckpt_2.pt", payloads["ckpt_2.pt"])
    daemon.wait_for_log(f"s3://{bucket}/{keys['ckpt_2.pt']} is not in the object store")
    client.put_object(Bucket=bucket, Key=keys["ckpt_2.pt"], Body=payloads["ckpt_2.pt"])
    daemon.wait_for_log("as model-checkpoint:v1")
    # ckpt_3: uploaded in parts, as a mount writes a large file.
    upload = client.create_multipart_upload(Bucket=bucket, Key=keys["ckpt_3.pt"])
    data, part = payloads["ckpt_3.pt"], 6 * 2**20
    parts = [
        {"PartNumber": n + 1, "ETag": client.upload_part(
            Bucket=bucket, Key=keys["ckpt_3.pt"], UploadId=upload["UploadId"],
            PartNumber=n + 1, Body=data[offset : offset + part])["ETag"]}
        for n, offset in enumerate(range(0, len(data), part))
    ]  # fmt: skip
    client.complete_multipart_upload(
        Bucket=bucket, Key=keys["ckpt_3.pt"], UploadId=upload["UploadId"],
        MultipartUpload={"Parts": parts},
    )  # fmt: skip
    land(mount / "run-7", "ckpt_3.pt", data)
    daemon.wait_for_log("as model-checkpoint:v2")
    daemon.wait_for_log("retention deleted model-checkpoint:v0")
    assert daemon.stop() == 0

    versions = wandb_server.versions("model-checkpoint", include_deleted=True)
    assert [(v.version, v.state) for v in versions] == [
        ("v0", "DELETED"), ("v1", "COMMITTED"), ("v2", "COMMITTED"),
    ]  # fmt: skip
    for version, name in zip(versions, payloads, strict=True):
        etag = client.head_object(Bucket=bucket, Key=keys[name])["ETag"].strip('"')
        assert entry(version, name) == {
            "digest": etag,
            "ref": f"s3://{bucket}/{keys[name]}",
            "size": len(payloads[name]),
            "extra": {"etag": etag, "ckptd_md5": md5_b64(payloads[name])},
        }
        assert version.files == {}  # nothing stored on W&B
    assert "-" in entry(versions[2], "ckpt_3.pt")["digest"]  # type: ignore[operator]
    assert file_uploads(wandb_server) == []
    assert "is not in the object store" in daemon.log()
    # Deleting v0 on W&B left the object it referenced.
    kept = client.get_object(Bucket=bucket, Key=keys["ckpt_1.pt"])["Body"].read()
    assert kept == payloads["ckpt_1.pt"]

    dest = tmp_path / "restored"
    out = restore(config, env, dest, "--version", "v1")
    assert "restored" in out and "model-checkpoint:v1" in out
    assert (dest / "ckpt_2.pt").read_bytes() == payloads["ckpt_2.pt"]
    restore(config, env, dest, "--alias", "latest")
    assert (dest / "ckpt_3.pt").read_bytes() == payloads["ckpt_3.pt"]
    assert sorted(p.name for p in dest.iterdir()) == ["ckpt_2.pt", "ckpt_3.pt"]


def test_file_reference_records_md5_and_uploads_nothing(
    tmp_path: Path,
    wandb_server: FakeWandbServer,
    online_env: dict[str, str],
    start_daemon: Callable[..., Daemon],
) -> None:
    """`reference: file`: the version holds a file:// reference to the checkpoint on the shared
    filesystem with ckptd's md5 and nothing is uploaded; `ckptd restore --config` follows
    references under that watch path (and no other) and writes the same bytes."""
    shared = tmp_path / "shared"
    shared.mkdir()
    config = tmp_path / "ckptd.yaml"
    config.write_text(FILE_CONFIG.format(url=wandb_server.url))
    data = zip_bytes(os.urandom(30_000))
    path = land(shared, "ckpt_5.pt", data)
    result = subprocess.run(
        [*CKPTD, "--config", str(config), "--once"], env=online_env, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr

    (version,) = wandb_server.versions("model-checkpoint")
    md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
    assert entry(version, "ckpt_5.pt") == {"digest": md5, "ref": path.as_uri(), "size": len(data)}
    assert version.files == {}
    assert file_uploads(wandb_server) == []

    dest = tmp_path / "restored"
    restore(config, online_env, dest)
    assert (dest / "ckpt_5.pt").read_bytes() == data


# -- unit: config, mapping, restore's checks, the sink's ETag check --------------------------


def problems(tmp_path: Path, watch: str) -> list[str]:
    """The problems `ckptd check` would print for a config with this one watch entry."""
    path = tmp_path / "c.yaml"
    path.write_text(f"watch:\n  - {watch}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


def test_reference_config_errors_name_the_key(tmp_path: Path) -> None:
    """A reference that is neither `file` nor a mapping, an unknown scheme, a missing key, a
    mount that does not hold the watched path, and local retention over referenced files are
    each one line naming the key and the value."""
    mount = tmp_path / "mnt"
    assert problems(tmp_path, "{path: ck, reference: s3}") == [
        "watch[0].reference: expected 'file' (a shared filesystem) or {uri: "
        "s3://bucket/prefix/, local: /mount/of/it} (an object store mount), got 's3'"
    ]
    ftp = f"{{path: {mount}, reference: {{uri: 'ftp://b/p', local: {mount}}}}}"
    assert problems(tmp_path, ftp) == [
        "watch[0].reference.uri: expected an object store prefix such as s3://bucket/prefix/ "
        "(s3:// or gs://), got 'ftp://b/p'"
    ]  # fmt: skip
    assert problems(tmp_path, "{path: ck, reference: {uri: 's3://b/p'}}") == [
        "watch[0].reference.local: required key is missing"
    ]
    (line,) = problems(tmp_path, f"{{path: ck, reference: {{uri: 's3://b/p', local: {mount}}}}}")
    assert line == (
        f"watch[0]: reference.local must be the watched path ({tmp_path / 'ck'}) or contain it "
        f"(the files must be inside the mount of s3://b/p/), got {mount}"
    )
    (line,) = problems(tmp_path, "{path: ck, reference: file, retention: {local: {min_free: 1GB}}}")
    assert line.startswith("watch[0]: retention.local cannot delete the files that reference")
    assert line.endswith("got min_free with reference")


def test_reference_config_accepted_and_normalised(tmp_path: Path) -> None:
    """`file` and a mount holding the watched path load; the prefix gains its final '/' and
    `local` resolves against the config file's directory like every path."""
    path = tmp_path / "c.yaml"
    path.write_text(
        "watch:\n  - {path: mnt/job, reference: {uri: 's3://b/runs', local: mnt}}\n"
        "  - {path: shared, artifact: other, reference: file}\n"
    )
    first, second = load_config(path).watch
    assert first.reference == ObjectStoreReference(uri="s3://b/runs/", local=tmp_path / "mnt")
    assert second.reference == "file"


def test_missing_store_library_names_the_key_and_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without boto3 (or google-cloud-storage for gs://) the config is refused at the key,
    saying what to install, rather than failing at the first publish."""
    monkeypatch.setitem(sys.modules, "boto3", None)
    monkeypatch.setitem(sys.modules, "google.cloud.storage", None)
    for uri, extra, library in (("s3://b/p", "s3", "boto3"), ("gs://b/p", "gcs", "google")):
        (line,) = problems(tmp_path, f"{{path: ck, reference: {{uri: '{uri}', local: ck}}}}")
        assert line == (
            f"watch[0].reference.uri: {uri[:2]}:// references need the {library} library, "
            f"which is not installed: pip install 'ckptd[{extra}]', got '{uri}'"
        )


def test_files_map_to_their_objects_and_file_uris(tmp_path: Path) -> None:
    """A file under the mount is the object at its relative key; `file` is its own URI; a name
    that a URI cannot carry, or a file outside the mount, is refused."""
    mount = ObjectStoreReference(uri="s3://b/runs/", local=tmp_path)
    assert references.reference_of(mount, tmp_path / "job/checkpoint-5/model.safetensors") == (
        "s3://b/runs/job/checkpoint-5/model.safetensors"
    )
    assert references.reference_of("file", tmp_path / "a b.pt") == (tmp_path / "a b.pt").as_uri()
    assert references.reference_of(None, tmp_path / "x.pt") is None
    with pytest.raises(ValueError, match="'\\?' or '#'"):
        references.reference_of(mount, tmp_path / "what?.pt")
    with pytest.raises(ValueError):
        references.reference_of(mount, tmp_path.parent / "x.pt")


def test_checkpoint_base_for_files_and_directories(tmp_path: Path) -> None:
    """File names are relative to a directory checkpoint, or to a single file's parent; a
    checkpoint that is gone is told apart by its names."""
    directory = tmp_path / "checkpoint-5"
    directory.mkdir()
    single = land(tmp_path, "ckpt_5.pt", b"x")
    assert references.checkpoint_base(directory, ["model.safetensors"]) == directory
    assert references.checkpoint_base(single, ["ckpt_5.pt"]) == tmp_path
    gone = tmp_path / "checkpoint-6"
    assert references.checkpoint_base(gone, ["a.bin", "b.bin"]) == gone
    assert references.checkpoint_base(tmp_path / "ckpt_6.pt", ["ckpt_6.pt"]) == tmp_path


def test_source_changed_tells_gone_from_replaced(tmp_path: Path) -> None:
    """A file reference records a path: the file still being the one hashed is None; removed
    is `unreferenceable`; replaced by rename (a new inode) is `changed`."""
    path = land(tmp_path, "ckpt_1.pt", b"one")
    files = stat_files(path)
    assert references.source_changed(tmp_path, files) is None
    land(tmp_path, "ckpt_1.pt", b"two")
    assert references.source_changed(tmp_path, files) == (
        "changed", "ckpt_1.pt was replaced or rewritten before it was referenced"
    )  # fmt: skip
    path.unlink()
    assert references.source_changed(tmp_path, files) == (
        "unreferenceable", "ckpt_1.pt was removed before it was referenced"
    )  # fmt: skip


def test_restore_follows_object_references_only_under_allowed_prefixes() -> None:
    """s3:// and gs:// references are followed under an allowed prefix only; a prefix is a
    directory (s3://b/jobs/ does not allow s3://b/jobs-other/)."""
    files = [StoredFile("a.pt", 1, None, "s3://b/jobs/run/a.pt")]
    refuse_references(files, "m:v0", (), ("s3://b/jobs/",))
    with pytest.raises(RestoreError, match=r"outside the prefixes allowed .* \(none\)"):
        refuse_references(files, "m:v0", ())
    other = [StoredFile("a.pt", 1, None, "s3://b/jobs-other/a.pt")]
    with pytest.raises(RestoreError, match=re.escape("s3://b/jobs-other/a.pt")):
        refuse_references(other, "m:v0", (), ("s3://b/jobs/",))
    with pytest.raises(RestoreError, match="only http"):
        refuse_references([StoredFile("a", 1, None, "ftp://h/a")], "m:v0", (), ("s3://b/",))


def test_a_reference_is_restored_against_the_md5_ckptd_recorded() -> None:
    """What restore checks a fetched reference against: the md5 ckptd recorded beside the
    object's ETag, or a file:// reference's digest (an md5); an ETag alone is not trusted
    as an md5 (multipart uploads, SSE-KMS), so such a file is checked by size only."""
    from wandb.sdk.artifacts.artifact_manifest_entry import ArtifactManifestEntry

    md5 = base64.b64encode(hashlib.md5(b"x").digest()).decode()
    etag = hashlib.md5(b"x").hexdigest()
    recorded = ArtifactManifestEntry(
        path="a", ref="s3://b/a", digest=etag, size=1, extra={"etag": etag, "ckptd_md5": md5}
    )
    foreign = ArtifactManifestEntry(path="a", ref="s3://b/a", digest=etag, size=1)
    shared = ArtifactManifestEntry(path="a", ref="file:///s/a", digest=md5, size=1)
    assert [reference_md5(e) for e in (recorded, foreign, shared)] == [md5, None, md5]


def test_sink_refuses_an_object_that_is_not_the_finished_file(
    tmp_path: Path, s3: LoopbackS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the SDK's own add_reference against loopback S3: an object with other bytes
    (its ETag is another md5), another size, or none at all is a transient PublishError (the
    mount has not uploaded it yet); the object holding the file's bytes is recorded with its
    ETag and ckptd's md5; an SSE-KMS object (whose ETag S3 does not make an md5) passes on
    its size, with ckptd's md5 recorded for restore."""
    import wandb

    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    client = s3.client()
    client.create_bucket(Bucket="ckptd-sink")
    data = b"finished checkpoint"
    md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
    file = SinkFile("a.pt", tmp_path / "a.pt", md5, len(data), ref="s3://ckptd-sink/p/a.pt")

    def add() -> object:
        artifact = wandb.Artifact("m", type="model")
        add_reference(artifact, file, "s3://ckptd-sink/p/a.pt")
        return artifact.manifest.entries["a.pt"]

    for body, said in ((None, "not in the object store"), (data + b"!", "holds 20 bytes"),
                       (data.upper(), "has ETag")):  # fmt: skip
        if body is not None:
            client.put_object(Bucket="ckptd-sink", Key="p/a.pt", Body=body)
        with pytest.raises(PublishError, match=said) as info:
            add()
        assert info.value.transient
    client.put_object(Bucket="ckptd-sink", Key="p/a.pt", Body=data)
    recorded: Any = add()
    assert recorded.digest == hashlib.md5(data).hexdigest()
    assert recorded.extra == {"etag": recorded.digest, "ckptd_md5": md5}
    # SSE-KMS: S3's ETag is no md5 of the bytes (moto's still is), so the size must do.
    client.put_object(
        Bucket="ckptd-sink", Key="p/a.pt", Body=data.upper(), ServerSideEncryption="aws:kms"
    )
    recorded = add()
    assert recorded.digest == hashlib.md5(data.upper()).hexdigest()
    assert recorded.extra["ckptd_md5"] == md5  # what restore will check the bytes against


def test_readme_reference_example_is_a_valid_config(tmp_path: Path) -> None:
    """The README's reference example loads as a config, as `ckptd check` reads it."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Reference artifacts", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```yaml\n(.*?)```", section, flags=re.DOTALL)
    path = tmp_path / "ckptd.yaml"
    path.write_text(block)
    first, second = load_config(path).watch
    assert first.reference == ObjectStoreReference(
        uri="s3://ckpt-bucket/", local=Path("/mnt/ckpt-bucket")
    )
    assert second.reference == "file"


def test_offline_run_records_the_reference_and_keeps_no_copy(
    tmp_path: Path, wandb_env: dict[str, str]
) -> None:
    """Offline, the run file that `wandb sync` uploads later holds the file:// reference with
    ckptd's md5, and no copy of the checkpoint is kept beside the run for that sync."""
    shared = tmp_path / "shared"
    shared.mkdir()
    config = tmp_path / "ckptd.yaml"
    config.write_text(
        FILE_CONFIG.replace("mode: online", "mode: offline").format(url="http://127.0.0.1:9")
    )
    data = zip_bytes(os.urandom(20_000))
    path = land(shared, "ckpt_2.pt", data)
    result = subprocess.run(
        [*CKPTD, "--config", str(config), "--once"], env=wandb_env, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr

    recorded = [
        (e.path, e.ref, e.digest, e.size)
        for run in find_run_files(tmp_path / "state")
        for artifact in artifact_records(read_records(run))
        for e in artifact.manifest.contents
    ]
    md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
    assert recorded == [("ckpt_2.pt", path.as_uri(), md5, len(data))]
    assert not [p for p in (tmp_path / "state").rglob("*") if p.is_file() and p.name == "ckpt_2.pt"]


def test_file_reference_to_a_removed_or_replaced_checkpoint_is_not_published(
    tmp_path: Path,
    wandb_server: FakeWandbServer,
    online_env: dict[str, str],
    start_daemon: Callable[..., Daemon],
) -> None:
    """A file reference records the path: two checkpoints queued while W&B is unreachable,
    then one removed and one replaced by new bytes, are not published from what ckptd held.
    The removed one is dropped as `unreferenceable` (the batch run names it and exits 1), the
    replaced one is superseded by its new content, which is published with its own md5."""
    shared = tmp_path / "shared"
    shared.mkdir()
    config = tmp_path / "ckptd.yaml"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        nobody = probe.getsockname()[1]
    config.write_text(FILE_CONFIG.format(url=f"http://127.0.0.1:{nobody}"))
    land(shared, "ckpt_1.pt", zip_bytes(b"one" * 1000))
    land(shared, "ckpt_2.pt", zip_bytes(b"two" * 1000))
    first = start_daemon("--config", str(config), "--once", "--deadline", "2s", env=online_env)
    assert first.proc.wait(60) == 1, first.log()
    assert first.log().count("not published: ") == 2, first.log()

    (shared / "ckpt_1.pt").unlink()
    replaced = zip_bytes(b"new two" * 1000)
    land(shared, "ckpt_2.pt", replaced)
    config.write_text(FILE_CONFIG.format(url=wandb_server.url))
    second = start_daemon("--config", str(config), "--once", env=online_env)
    assert second.proc.wait(120) == 1, second.log()
    lines = [x for x in second.log().splitlines() if "not published:" in x]
    assert lines and all(str(shared / "ckpt_1.pt") in x for x in lines), second.log()
    assert "ckpt_1.pt (model-checkpoint): dropped, reference: its file was removed" in lines[-1]
    assert "ckpt_2.pt was replaced or rewritten before it was referenced" in second.log()
    (version,) = wandb_server.versions("model-checkpoint")
    md5 = base64.b64encode(hashlib.md5(replaced).digest()).decode()
    assert entry(version, "ckpt_2.pt")["digest"] == md5
