"""Reference artifacts (`watch[].reference`): versions that point at the checkpoint files
where they already live, end to end with the real daemon, the real wandb SDK, the loopback
W&B server and a real S3-compatible endpoint on loopback (moto's server)."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import subprocess
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import CKPTD, Daemon
from tests.support.fake_wandb import FakeWandbServer, VersionInfo
from tests.support.s3 import LoopbackS3

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
            "extra": {"etag": etag},
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
