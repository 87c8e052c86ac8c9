"""W&B offline mode survives kill -9: of ckptd, of its wandb-core, or both, at any moment.

wandb-core buffers an offline run's `.wandb` file until the run finishes, so a killed ckptd
leaves records that never reached the disk. These tests read every `.wandb` file under the
state dir back and count the artifact records: exactly one per checkpoint, after a restart.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Daemon, ckptd_status
from tests.support.checkpoints import renamed_in
from tests.support.fake_wandb import FakeWandbServer
from tests.support.wandb_offline import artifacts, find_run_files

CONFIG = """\
state_dir: state
wandb: {mode: offline, project: durable}
metrics: {listen: null}
upload: {retry: {initial_delay: 200ms, max_delay: 1s}}
watch:
  - path: ck
    artifact: demo-model
    settle: 500ms
    sidecar: {wait: 5s}
    aliases:
      templates: ["step-{step}"]
      best: [{metric: val_loss, mode: min, alias: best}]
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "ckptd.yaml"
    path.write_text(CONFIG)
    (tmp_path / "ck").mkdir()
    return path


def write(tmp_path: Path, step: int, loss: float) -> None:
    renamed_in(tmp_path / "ck", f"ckpt_{step}.pt", 4000, step=step, metrics={"val_loss": loss})


def records_by_step(tmp_path: Path) -> Counter[int]:
    """How many artifact records each step has across every .wandb file under the state dir."""
    wandb_dir = tmp_path / "state" / "wandb"
    if not wandb_dir.exists():
        return Counter()
    return Counter(a.metadata["step"] for a in artifacts(wandb_dir))


def wandb_core_of(daemon: Daemon) -> int:
    """The pid of the wandb-core process that `daemon` started (its child, found in /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm, fields = stat[stat.index("(") + 1 : stat.rindex(")")], stat.rsplit(")", 1)[1].split()
        if comm.startswith("wandb-core") and int(fields[1]) == daemon.proc.pid:
            return int(entry.name)
    raise AssertionError(f"no wandb-core child of ckptd {daemon.proc.pid}")


@pytest.mark.parametrize("killed", ["ckptd", "ckptd and wandb-core"])
def test_kill_9_then_restart_leaves_one_record_per_checkpoint(
    tmp_path: Path,
    config: Path,
    wandb_env: dict[str, str],
    start_daemon: Callable[..., Daemon],
    killed: str,
) -> None:
    """Three checkpoints logged "published" offline, then kill -9 (of ckptd, or of its
    wandb-core and ckptd): after a restart and a SIGTERM, every .wandb file under the state
    dir together holds exactly one artifact record per checkpoint, with its aliases."""
    daemon = start_daemon("--config", str(config), env=wandb_env)
    daemon.wait_for_log("ckptd started")
    for step, loss in ((1, 0.5), (2, 0.3), (3, 0.4)):
        write(tmp_path, step, loss)
    daemon.wait_for_log("ckpt_3.pt as demo-model")
    if killed != "ckptd":
        os.kill(wandb_core_of(daemon), signal.SIGKILL)
    daemon.kill()
    assert sum(records_by_step(tmp_path).values()) < 3  # the kill lost what was buffered

    again = start_daemon("--config", str(config), env=wandb_env)
    again.wait_for_log("ckptd started")
    assert again.stop() == 0, again.log()
    assert records_by_step(tmp_path) == {1: 1, 2: 1, 3: 1}
    aliases = {a.metadata["step"]: set(a.aliases) for a in artifacts(tmp_path / "state" / "wandb")}
    assert aliases == {
        1: {"latest", "step-1", "best"},
        2: {"latest", "step-2", "best"},
        3: {"latest", "step-3"},
    }
    assert "nothing is left to publish" in again.log().splitlines()[-1]
    assert "3 published, 0 pending" in ckptd_status(config, wandb_env)
    # No run directory is left without records: `wandb sync` of one fails and, given
    # several, then uploads none of the others.
    runs = find_run_files(tmp_path / "state" / "wandb")
    assert runs and all(artifacts(run) for run in runs), runs
    assert sync_all(tmp_path, wandb_env) == [1, 2, 3]


def sync_all(tmp_path: Path, wandb_env: dict[str, str]) -> list[int]:
    """`wandb sync state/wandb/offline-run-*` (the README's one command) to a loopback server;
    the steps of the versions it committed."""
    runs = sorted(str(p) for p in (tmp_path / "state" / "wandb").glob("offline-run-*"))
    with FakeWandbServer(storage_dir=tmp_path / "server") as server:
        env = {**wandb_env, **server.env(tmp_path / "sync-env")}
        sync = subprocess.run(
            [str(Path(sys.executable).parent / "wandb"), "sync", *runs],
            env=env, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert sync.returncode == 0, sync.stdout + sync.stderr
        versions = server.versions("demo-model", "durable")
    assert all(v.state == "COMMITTED" for v in versions)
    return sorted(v.metadata["step"] for v in versions)


def test_wandb_core_killed_under_a_live_ckptd_is_replaced(
    tmp_path: Path, config: Path, wandb_env: dict[str, str], start_daemon: Callable[..., Daemon]
) -> None:
    """kill -9 of wandb-core alone: ckptd notices at its next publish, starts a new one,
    logs again what the dead run had not written, and a SIGTERM leaves one record each."""
    daemon = start_daemon("--config", str(config), env=wandb_env)
    daemon.wait_for_log("ckptd started")
    write(tmp_path, 1, 0.5)
    write(tmp_path, 2, 0.4)
    daemon.wait_for_log("ckpt_2.pt as demo-model")
    os.kill(wandb_core_of(daemon), signal.SIGKILL)
    write(tmp_path, 3, 0.3)
    daemon.wait_for_log("ckpt_3.pt as demo-model")
    assert "wandb-core process is gone" in daemon.log()
    assert daemon.stop() == 0, daemon.log()
    assert records_by_step(tmp_path) == {1: 1, 2: 1, 3: 1}


def test_restarts_resume_one_offline_run_per_collection(
    tmp_path: Path, config: Path, wandb_env: dict[str, str], start_daemon: Callable[..., Daemon]
) -> None:
    """Four starts of ckptd, each publishing a checkpoint, log into one offline run (one run
    id) for the collection rather than four, each version is recorded once, and one
    `wandb sync` command uploads all four."""
    for step in range(1, 5):
        write(tmp_path, step, 1.0 / step)
        daemon = start_daemon("--config", str(config), "--once", env=wandb_env)
        assert daemon.proc.wait(120) == 0, daemon.log()
    run_ids = {path.name for path in find_run_files(tmp_path / "state" / "wandb")}
    assert len(run_ids) == 1, run_ids
    assert records_by_step(tmp_path) == {1: 1, 2: 1, 3: 1, 4: 1}
    assert sync_all(tmp_path, wandb_env) == [1, 2, 3, 4]  # one command uploads them all
