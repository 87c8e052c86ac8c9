"""Disk faults: a full or read-only state_dir and an unreadable checkpoint are reported
clearly, retried, and lose nothing; the daemon keeps running through them."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import CKPTD, Daemon, wait_until
from tests.support.checkpoints import renamed_in
from tests.support.mounts import tmpfs

CONFIG = """\
state_dir: {state}
wandb: {{mode: offline, project: disk}}
metrics: {{listen: null}}
watch: [{{path: {root}, settle: 500ms, sidecar: {{wait: 0s}}}}]
"""


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs the test can fill up and turn read-only (root is needed to mount)."""
    with tmpfs(tmp_path / "state-fs", "4m") as mount:
        yield mount


def checkpoint(root: Path, step: int) -> Path:
    return renamed_in(root, f"ckpt_{step}.pt", 100_000, step=step, metrics={"val_loss": 1.0})


def fill(mount: Path) -> Path:
    """Write until the filesystem is full; return the filler file."""
    filler = mount / "filler"
    with filler.open("wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)
    return filler


def start(tmp_path: Path, state: Path, env: dict[str, str], run: Callable[..., Daemon]) -> Daemon:
    (tmp_path / "ck").mkdir(exist_ok=True)
    config = tmp_path / "ckptd.yaml"
    config.write_text(CONFIG.format(state=state, root=tmp_path / "ck"))
    daemon = run("--config", str(config), env=env)
    daemon.wait_for_log("ckptd started")
    return daemon


def test_full_state_dir_is_reported_and_retried(
    tmp_path: Path, small_fs: Path, wandb_env: dict[str, str], start_daemon: Callable[..., Daemon]
) -> None:
    """With state_dir full, a finished checkpoint cannot be snapshotted: the error names the
    cause, is not repeated every second, and once space is back the checkpoint lands."""
    daemon = start(tmp_path, small_fs / "state", wandb_env, start_daemon)
    filler = fill(small_fs)
    checkpoint(tmp_path / "ck", 1)
    daemon.wait_for_log("No space left on device")
    wait_until(lambda: "(attempt 4)" in daemon.log(), 30, "a few retries")
    errors = [line for line in daemon.log().splitlines() if "cannot snapshot" in line]
    assert 3 <= len(errors) <= 4, errors  # attempts 1, 2, 4 (maybe 8): not one per second
    assert "state_dir full or read-only" in errors[0]
    assert daemon.proc.poll() is None
    filler.unlink()
    daemon.wait_for_log("ckpt_1.pt as model-checkpoint")
    assert daemon.stop() == 0


def test_read_only_state_dir_is_reported_and_retried(
    tmp_path: Path, wandb_env: dict[str, str], start_daemon: Callable[..., Daemon]
) -> None:
    """A state_dir whose staging area turns read-only is named in the error; once writable
    again, the queued checkpoint lands."""
    daemon = start(tmp_path, tmp_path / "state", wandb_env, start_daemon)
    staging = tmp_path / "state" / "staging"
    subprocess.run(["mount", "--bind", str(staging), str(staging)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(staging)], check=True)
        checkpoint(tmp_path / "ck", 2)
        daemon.wait_for_log("Read-only file system")
        assert "state_dir full or read-only" in daemon.log()
        assert daemon.proc.poll() is None
    finally:
        subprocess.run(["umount", str(staging)], check=True)
    daemon.wait_for_log("ckpt_2.pt as model-checkpoint")
    assert daemon.stop() == 0


# Root reads every file; without these two capabilities it obeys permission bits like
# any user, which is how a checkpoint becomes unreadable to it.
NO_DAC = [
    "setpriv",
    "--bounding-set=-dac_override,-dac_read_search",
    "--inh-caps=-dac_override,-dac_read_search",
]


def test_unreadable_checkpoint_is_reported_with_its_path_and_retried(
    tmp_path: Path, wandb_env: dict[str, str]
) -> None:
    """A checkpoint ckptd may not read is named in one warning; ckptd keeps running and
    publishes it once its permissions are fixed."""
    root = tmp_path / "ck"
    root.mkdir()
    config = tmp_path / "ckptd.yaml"
    config.write_text(CONFIG.format(state=tmp_path / "state", root=root))
    path = checkpoint(root, 3)
    path.chmod(0o000)
    log = tmp_path / "ckptd.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*NO_DAC, *CKPTD, "--config", str(config)], env=wandb_env, stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_until(lambda: "Permission denied" in log.read_text(), 60, "the permission error")
        text = log.read_text()
        assert str(path) in text and "will retry" in text
        assert proc.poll() is None
        path.chmod(0o644)
        wait_until(lambda: "ckpt_3.pt as model-checkpoint" in log.read_text(), 60, "publish")
        proc.terminate()
        assert proc.wait(60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = [line for line in log.read_text().splitlines() if "Permission denied" in line]
    assert len(lines) == 1, lines
