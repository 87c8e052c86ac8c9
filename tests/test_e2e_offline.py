"""End to end in W&B offline mode: the real daemon, real files, the .wandb file read back."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from ckptd import sidecar
from tests.conftest import Daemon, wait_until
from tests.support.checkpoints import renamed_in
from tests.support.fake_wandb import FakeWandbServer
from tests.support.wandb_offline import OfflineArtifact, artifacts

CONFIG = """\
state_dir: state
wandb: {{mode: offline, project: offline-e2e}}
metrics: {{listen: null}}
watch:
  - path: ck
    artifact: demo-model
    settle: {settle}
    sidecar: {{wait: {wait}}}
    aliases:
      templates: ["step-{{step}}"]
      best: [{{metric: val_loss, mode: min, alias: best}}]
"""


def write_checkpoint(root: Path, name: str, payload: bytes) -> Path:
    """Write a zip checkpoint under a temp name and rename it into place, as torch users do."""
    return renamed_in(root, name, payload)


def md5_b64(path: Path) -> str:
    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


def published(tmp_path: Path) -> list[OfflineArtifact]:
    wandb_dir = tmp_path / "state" / "wandb"
    return artifacts(wandb_dir) if wandb_dir.exists() else []


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "ckptd.yaml"
    path.write_text(CONFIG.format(settle="1s", wait="10s"))
    (tmp_path / "ck").mkdir()
    return path


def test_three_checkpoints_land_in_the_offline_run(
    tmp_path: Path, config: Path, wandb_env: dict[str, str], start_daemon: Callable[..., Daemon]
) -> None:
    """Checkpoints renamed into place with sidecars become offline versions with the right
    aliases, metadata and digests; the files themselves are untouched."""
    daemon = start_daemon("--config", str(config), env=wandb_env)
    daemon.wait_for_log("ckptd started")
    losses = {1: 0.5, 2: 0.3, 3: 0.4}
    paths = {}
    for step, loss in losses.items():
        name = f"ckpt_{step}.pt"
        sidecar.write(tmp_path / "ck" / name, step=step * 100, metrics={"val_loss": loss},
                      metadata={"lr": 0.1 * step})  # fmt: skip
        paths[step] = write_checkpoint(tmp_path / "ck", name, os.urandom(5000))
    daemon.wait_for_log("ckpt_3.pt as demo-model")
    assert daemon.stop() == 0
    found = published(tmp_path)
    assert [a.metadata["step"] for a in found] == [100, 200, 300]
    assert [set(a.aliases) for a in found] == [
        {"latest", "step-100", "best"},
        {"latest", "step-200", "best"},
        {"latest", "step-300"},
    ]
    for art, step in zip(found, (1, 2, 3), strict=True):
        assert art.name == "demo-model" and art.type == "model"
        (entry,) = art.entries.items()
        assert entry[0] == f"ckpt_{step}.pt"
        assert entry[1][0] == md5_b64(paths[step])  # ckptd's md5 is the file's md5
        assert art.metadata["metrics"] == {"val_loss": losses[step]}
        assert art.metadata["lr"] == pytest.approx(0.1 * step)
        assert art.metadata["source_path"] == str(paths[step])
    # No staging or cache copies were made, and the snapshots were released.
    assert list((tmp_path / "state" / "staging").iterdir()) == []
    assert not (Path(wandb_env["WANDB_DATA_DIR"]) / "artifacts" / "staging").exists() or not any(
        (Path(wandb_env["WANDB_DATA_DIR"]) / "artifacts" / "staging").iterdir()
    )


def test_restart_neither_repeats_nor_forgets(
    tmp_path: Path, config: Path, wandb_env: dict[str, str], start_daemon: Callable[..., Daemon]
) -> None:
    """After a restart, published checkpoints are not published again and new ones are."""
    write_checkpoint(tmp_path / "ck", "ckpt_1.pt", b"a" * 3000)
    sidecar.write(tmp_path / "ck" / "ckpt_1.pt", step=1, metrics={"val_loss": 1.0})
    first = start_daemon("--config", str(config), "--once", env=wandb_env)
    assert first.proc.wait(120) == 0, first.log()
    assert len(published(tmp_path)) == 1
    write_checkpoint(tmp_path / "ck", "ckpt_2.pt", b"b" * 3000)
    sidecar.write(tmp_path / "ck" / "ckpt_2.pt", step=2, metrics={"val_loss": 2.0})
    second = start_daemon("--config", str(config), "--once", env=wandb_env)
    assert second.proc.wait(120) == 0, second.log()
    steps = [a.metadata["step"] for a in published(tmp_path)]
    assert steps == [1, 2]
    # best stays on step 1 across the restart: the journal remembers its value.
    assert "best" not in published(tmp_path)[1].aliases


def test_malformed_sidecar_still_publishes_as_latest(
    tmp_path: Path, config: Path, wandb_env: dict[str, str], start_daemon: Callable[..., Daemon]
) -> None:
    """A sidecar that is not JSON is named in one log line; the checkpoint is still published
    with latest and its step alias, without metric aliases."""
    (tmp_path / "ck" / "ckpt_7.pt.metrics.json").write_text("{oops")
    write_checkpoint(tmp_path / "ck", "ckpt_7.pt", b"c" * 3000)
    daemon = start_daemon("--config", str(config), "--once", env=wandb_env)
    assert daemon.proc.wait(120) == 0, daemon.log()
    (art,) = published(tmp_path)
    assert set(art.aliases) == {"latest", "step-7"}
    lines = [line for line in daemon.log().splitlines() if "ckpt_7.pt.metrics.json" in line]
    assert len(lines) == 1 and "not valid JSON" in lines[0]


def test_in_place_rewrite_with_same_bytes_is_not_a_new_version(
    tmp_path: Path, config: Path, wandb_env: dict[str, str], start_daemon: Callable[..., Daemon]
) -> None:
    """Rewriting a published file in place with identical bytes publishes nothing new."""
    sidecar.write(tmp_path / "ck" / "ckpt_3.pt", step=3, metrics={"val_loss": 0.1})
    path = write_checkpoint(tmp_path / "ck", "ckpt_3.pt", b"d" * 3000)
    daemon = start_daemon("--config", str(config), env=wandb_env)
    daemon.wait_for_log("ckpt_3.pt as demo-model")
    data = path.read_bytes()
    with path.open("r+b") as f:  # in place: same inode, new mtime
        f.write(data)
    wait_until(lambda: "same content as" in daemon.log(), 30, "the rewrite to be recognised")
    assert daemon.stop() == 0
    assert len(published(tmp_path)) == 1


def test_wandb_sync_uploads_offline_versions_after_the_checkpoints_are_gone(
    tmp_path: Path, config: Path, wandb_env: dict[str, str], start_daemon: Callable[..., Daemon]
) -> None:
    """The README's offline path to W&B: publish offline, let the framework rotate the
    checkpoints away, `wandb sync` to the (loopback) server: every version commits with its
    bytes, read from the offline run's own directory. `wandb clean` then drops them."""
    sent = {}
    for step in (1, 2):
        sidecar.write(tmp_path / "ck" / f"ckpt_{step}.pt", step=step, metrics={"val_loss": 1.0})
        path = write_checkpoint(tmp_path / "ck", f"ckpt_{step}.pt", os.urandom(30_000))
        sent[path.name] = path.read_bytes()
    daemon = start_daemon("--config", str(config), "--once", env=wandb_env)
    assert daemon.proc.wait(120) == 0, daemon.log()
    for name in sent:
        (tmp_path / "ck" / name).unlink()  # rotated away, as save_total_limit would

    state = tmp_path / "state"
    (run,) = (state / "wandb").glob("offline-run-*")
    with FakeWandbServer(storage_dir=tmp_path / "server") as server:
        env = {**wandb_env, **server.env(tmp_path / "sync-env")}
        sync = subprocess.run(
            [str(Path(sys.executable).parent / "wandb"), "sync", str(run)],
            env=env, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert sync.returncode == 0, sync.stdout + sync.stderr
        versions = server.versions("demo-model", "offline-e2e")
        assert [v.state for v in versions] == ["COMMITTED", "COMMITTED"]
        assert {name: v.read_bytes(name) for v in versions for name in v.files} == sent

    clean = subprocess.run(
        [str(Path(sys.executable).parent / "wandb"), "clean", "--min-hours", "0", "--force"],
        env={**wandb_env, "WANDB_DIR": str(state)}, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert not run.exists()  # the synced run went, and the files kept for it with it
