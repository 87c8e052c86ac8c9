"""End to end online: the real daemon and the real wandb SDK against the loopback W&B server."""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from ckptd import sidecar
from tests.conftest import Daemon, wait_until
from tests.support.checkpoints import renamed_in, sparse_renamed_in
from tests.support.fake_wandb import FakeWandbServer

CONFIG = """\
state_dir: state
wandb: {{mode: online, project: spine, base_url: "{url}"}}
metrics: {{listen: null}}
upload: {{retry: {{initial_delay: 200ms, max_delay: 2s}}}}
watch:
  - path: ck
    artifact: model-checkpoint
    settle: 1s
    sidecar: {{wait: 10s}}
    aliases:
      templates: ["step-{{step}}"]
      best: [{{metric: val_loss, mode: min, alias: best}}]
"""


def write_by_rename(root: Path, name: str, payload: bytes) -> Path:
    return renamed_in(root, name, payload)


def start(
    tmp_path: Path,
    server: FakeWandbServer,
    env: dict[str, str],
    start_daemon: Callable[..., Daemon],
) -> Daemon:
    config = tmp_path / "ckptd.yaml"
    config.write_text(CONFIG.format(url=server.url))
    (tmp_path / "ck").mkdir(exist_ok=True)
    daemon = start_daemon("--config", str(config), env=env)
    daemon.wait_for_log("ckptd started")
    return daemon


def test_three_checkpoints_become_three_versions_with_aliases(
    tmp_path: Path,
    wandb_server: FakeWandbServer,
    online_env: dict[str, str],
    start_daemon: Callable[..., Daemon],
) -> None:
    """ckpt_1..3 written by rename with sidecars end as v0..v2: latest on step 3, best on the
    lowest val_loss, step-N on each, uploaded bytes equal to the files; rewriting ckpt_3.pt in
    place with the same bytes creates no new version."""
    daemon = start(tmp_path, wandb_server, online_env, start_daemon)
    losses = {1: 0.9, 2: 0.2, 3: 0.5}
    files = {}
    for step, loss in losses.items():
        sidecar.write(tmp_path / "ck" / f"ckpt_{step}.pt", step=step, metrics={"val_loss": loss})
        files[step] = write_by_rename(tmp_path / "ck", f"ckpt_{step}.pt", os.urandom(20_000))
    daemon.wait_for_log("ckpt_3.pt as model-checkpoint:v2")

    versions = wandb_server.versions("model-checkpoint", "spine")
    assert [v.version for v in versions] == ["v0", "v1", "v2"]
    assert all(v.state == "COMMITTED" for v in versions)
    assert wandb_server.alias_holder("model-checkpoint", "latest", "spine") == "v2"
    assert wandb_server.alias_holder("model-checkpoint", "best", "spine") == "v1"
    for step, version in zip((1, 2, 3), versions, strict=True):
        assert f"step-{step}" in version.aliases
        assert version.metadata["step"] == step
        assert version.metadata["metrics"] == {"val_loss": losses[step]}
        name = f"ckpt_{step}.pt"
        assert set(version.files) == {name}
        assert version.read_bytes(name) == files[step].read_bytes()
        assert version.file_md5(name) == hashlib.md5(files[step].read_bytes()).hexdigest()

    data = files[3].read_bytes()
    with files[3].open("r+b") as f:  # same bytes, in place: a new mtime, the same content
        f.write(data)
    wait_until(lambda: "same content as v2" in daemon.log(), 30, "the rewrite to be recognised")
    assert daemon.stop() == 0, daemon.log()
    assert wandb_server.created_versions == 3
    assert [v.version for v in wandb_server.versions("model-checkpoint", "spine")] == [
        "v0",
        "v1",
        "v2",
    ]


def test_api_key_never_reaches_logs_or_state(
    tmp_path: Path,
    wandb_server: FakeWandbServer,
    online_env: dict[str, str],
    start_daemon: Callable[..., Daemon],
) -> None:
    """The W&B API key appears in no log line and no file under state_dir."""
    daemon = start(tmp_path, wandb_server, online_env, start_daemon)
    sidecar.write(tmp_path / "ck" / "ckpt_1.pt", step=1, metrics={"val_loss": 1.0})
    write_by_rename(tmp_path / "ck", "ckpt_1.pt", b"x" * 5000)
    daemon.wait_for_log("ckpt_1.pt as model-checkpoint:v0")
    assert daemon.stop() == 0
    key = online_env["WANDB_API_KEY"].encode()
    assert key not in daemon.log_path.read_bytes()
    leaks = [p for p in (tmp_path / "state").rglob("*") if p.is_file() and key in p.read_bytes()]
    assert leaks == []


def test_a_checkpoint_over_2_gib_goes_up_in_parts_and_commits(
    tmp_path: Path, wandb_env: dict[str, str], start_daemon: Callable[..., Daemon]
) -> None:
    """wandb-core sends files over 2 GiB multipart (100 MiB parts, each with its Content-MD5
    checked by the server); ckptd's precomputed md5 must hold for the whole file and the
    version must commit. The file is sparse, so the test costs CPU, not disk."""
    size = (2 << 30) + (1 << 20) + 123
    part = 100 << 20
    root = tmp_path / "ck"
    root.mkdir()
    # Parts are hashed and dropped: storing them would need 2 GiB of disk for nothing.
    with FakeWandbServer(storage_dir=tmp_path / "server", discard_uploads=True) as server:
        config = tmp_path / "ckptd.yaml"
        config.write_text(
            "state_dir: state\n"
            f'wandb: {{mode: online, project: spine, base_url: "{server.url}"}}\n'
            "metrics: {listen: null}\n"
            "watch:\n"
            "  - {path: ck, artifact: big, format: file, patterns: ['*.bin'], "
            "sidecar: {wait: 0s}}\n"
        )
        env = {**wandb_env, **server.env(tmp_path / "wandb-online")}
        daemon = start_daemon("--config", str(config), env=env)
        daemon.wait_for_log("ckptd started")
        md5 = sparse_renamed_in(root, "big.bin", size)
        daemon.wait_for_log("big.bin as big:v0", timeout=300)

        (version,) = server.versions("big", "spine")
        assert version.state == "COMMITTED"
        entry = (version.manifest or {})["contents"]["big.bin"]
        assert entry["size"] == size
        assert entry["digest"] == md5
        puts = Counter(r.path for r in server.requests if r.method == "PUT")
        parts = puts.most_common(1)[0][1]  # the big file; the rest: manifest, run files
        assert parts == -(-size // part), puts
        assert daemon.stop() == 0, daemon.log()
