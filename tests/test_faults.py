"""Error classes against the loopback W&B server: transient errors are retried until the
version lands; permanent ones park the collection, keep its queue, and show in status."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Daemon, ckptd_status, wait_until
from tests.support.checkpoints import renamed_in
from tests.support.fake_wandb import FakeWandbServer

CONFIG = """\
state_dir: state
wandb: {{mode: online, project: faults, base_url: "{url}"}}
metrics: {{listen: null}}
upload: {{retry: {{initial_delay: 200ms, max_delay: 1s, give_up_after: {give_up}}}}}
watch:
{watches}
"""
WATCH = """\
  - path: {path}
    artifact: {artifact}
    settle: 1s
    sidecar: {{wait: 0s}}
"""


def setup(tmp_path: Path, server: FakeWandbServer, *artifacts: str, give_up: str = "1h") -> Path:
    watches = ""
    for artifact in artifacts or ("model",):
        (tmp_path / artifact).mkdir()
        watches += WATCH.format(path=artifact, artifact=artifact)
    config = tmp_path / "ckptd.yaml"
    config.write_text(CONFIG.format(url=server.url, watches=watches, give_up=give_up))
    return config


def checkpoint(root: Path, step: int) -> Path:
    return renamed_in(root, f"ckpt_{step}.pt", step=step, metrics={"val_loss": 1.0 / step})


def committed(server: FakeWandbServer, artifact: str = "model") -> list[str]:
    return [v.version for v in server.versions(artifact, "faults") if v.state == "COMMITTED"]


@pytest.mark.parametrize(
    ("match", "fault"),
    [
        ("CreateArtifact", {"status": 500}),
        ("CreateArtifact", {"status": 503}),
        ("CreateArtifact", {"status": 429, "retry_after": 1}),
        ("/storage/", {"reset": True}),
        ("CommitArtifact", {"reset": True}),
        ("CreateArtifactFiles", {"status": 502}),
    ],
    ids=["500", "503", "429-retry-after", "reset-upload", "reset-commit", "502-files"],
)
def test_transient_errors_are_retried_until_committed(
    tmp_path: Path,
    wandb_server: FakeWandbServer,
    online_env: dict[str, str],
    start_daemon: Callable[..., Daemon],
    match: str,
    fault: dict[str, object],
) -> None:
    """Repeated 5xx, 429 with Retry-After and connection resets outlast the SDK's own
    retries; ckptd retries from its journal and the checkpoint ends as one version."""
    config = setup(tmp_path, wandb_server)
    armed = wandb_server.inject(match, times=3, **fault)  # type: ignore[arg-type]
    daemon = start_daemon("--config", str(config), env=online_env)
    daemon.wait_for_log("ckptd started")
    path = checkpoint(tmp_path / "model", 1)
    daemon.wait_for_log("ckpt_1.pt as model:v", timeout=120)
    assert armed.hits >= 1
    assert daemon.stop() == 0
    # A failed attempt may leave a PENDING version behind; exactly one is committed.
    assert len(committed(wandb_server)) == 1
    (version,) = [v for v in wandb_server.versions("model", "faults") if v.state == "COMMITTED"]
    assert "latest" in version.aliases
    assert version.read_bytes(path.name) == path.read_bytes()


def test_stalled_response_is_survived(
    tmp_path: Path,
    wandb_server: FakeWandbServer,
    online_env: dict[str, str],
    start_daemon: Callable[..., Daemon],
) -> None:
    """A response that stalls for seconds delays the version but does not lose or double it."""
    config = setup(tmp_path, wandb_server)
    wandb_server.inject("CommitArtifact", delay=4)
    daemon = start_daemon("--config", str(config), env=online_env)
    daemon.wait_for_log("ckptd started")
    checkpoint(tmp_path / "model", 1)
    checkpoint(tmp_path / "model", 2)
    daemon.wait_for_log("ckpt_2.pt as model:v1", timeout=120)
    assert daemon.stop() == 0
    assert committed(wandb_server) == ["v0", "v1"]


def test_bad_key_parks_and_shows_in_status(
    tmp_path: Path,
    wandb_server: FakeWandbServer,
    online_env: dict[str, str],
    start_daemon: Callable[..., Daemon],
) -> None:
    """A rejected API key parks the collection with a loud error; the queue is kept and
    `ckptd status` shows it; after the key works again a restart publishes everything."""
    config = setup(tmp_path, wandb_server)
    wandb_server.set_auth_failure(True)
    daemon = start_daemon("--config", str(config), env=online_env)
    daemon.wait_for_log("ckptd started")
    checkpoint(tmp_path / "model", 1)
    daemon.wait_for_log("model is parked", timeout=60)
    # One snapshot, asserted whole: the park lasts only `max_delay` before a retry.
    snapshots: list[str] = []

    def parked() -> bool:
        snapshots.append(ckptd_status(config, online_env))
        return "PARKED" in snapshots[-1]

    wait_until(parked, 30, "status to show the park")
    shown = snapshots[-1]
    assert "1 pending" in shown and "PARKED" in shown
    assert online_env["WANDB_API_KEY"] not in shown + daemon.log()
    assert daemon.stop() == 0
    assert committed(wandb_server) == []
    wandb_server.set_auth_failure(False)
    again = start_daemon("--config", str(config), "--once", env=online_env)
    assert again.proc.wait(120) == 0, again.log()
    assert committed(wandb_server) == ["v0"]


def test_permanent_error_in_one_collection_does_not_stop_another(
    tmp_path: Path,
    wandb_server: FakeWandbServer,
    online_env: dict[str, str],
    start_daemon: Callable[..., Daemon],
) -> None:
    """A 403 on one collection parks it alone; the other collection keeps publishing."""
    config = setup(tmp_path, wandb_server, "blocked", "open")
    wandb_server.inject("CreateArtifact", status=403, times=20)
    daemon = start_daemon("--config", str(config), env=online_env)
    daemon.wait_for_log("ckptd started")
    checkpoint(tmp_path / "blocked", 1)
    daemon.wait_for_log("blocked is parked", timeout=60)
    wandb_server.clear_faults()
    checkpoint(tmp_path / "open", 1)
    daemon.wait_for_log("ckpt_1.pt as open:v0", timeout=60)
    assert "PARKED" in ckptd_status(config, online_env)
    assert daemon.stop() == 0
    assert committed(wandb_server, "open") == ["v0"]
    assert committed(wandb_server, "blocked") == []


def test_give_up_after_marks_failed_and_keeps_files(
    tmp_path: Path,
    wandb_server: FakeWandbServer,
    online_env: dict[str, str],
    start_daemon: Callable[..., Daemon],
) -> None:
    """Past give_up_after a checkpoint is marked failed with its reason; its file is kept
    and `--once` exits 1 naming it."""
    config = setup(tmp_path, wandb_server, give_up="3s")
    wandb_server.inject("CreateArtifact", status=500, times=200)
    path = checkpoint(tmp_path / "model", 1)
    daemon = start_daemon("--config", str(config), "--once", env=online_env)
    assert daemon.proc.wait(180) == 1, daemon.log()
    assert "gave up on" in daemon.log() and "not published:" in daemon.log()
    assert path.exists()
    assert "1 failed" in ckptd_status(config, online_env)
