"""The systemd unit's setup: ckptd runs as its own user (DynamicUser), the training job as
another. The daemon must read the sidecars that `ckptd.sidecar.write` produced."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.checkpoints import renamed_in
from tests.support.wandb_offline import artifacts

NOBODY = 65534
REPO = Path(__file__).resolve().parents[1]
CONFIG = """\
state_dir: state
wandb: {mode: offline, project: other-user}
metrics: {listen: null}
watch:
  - path: ck
    artifact: model
    settle: 500ms
    sidecar: {wait: 5s}
    aliases:
      best: [{metric: val_loss, mode: min, alias: best}]
"""


def interpreter_for(uid: int) -> str | None:
    """A Python of this version that another user can run (every directory on its path
    searchable by others): this venv's own may live under a private home."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (os.path.realpath(sys.executable), shutil.which(version, path="/usr/bin")):
        if candidate is None:
            continue
        path = Path(candidate)
        if all(p.stat().st_mode & stat.S_IXOTH for p in (path, *path.parents)):
            return candidate
    return None


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory both root and the daemon's user can reach (pytest's tmp is root-only)."""
    root = Path(tempfile.mkdtemp(prefix="ckptd-other-user-", dir="/tmp"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="starting a process as another user needs root")
def test_daemon_as_another_user_reads_sidecars_written_under_umask_022(shared_dir: Path) -> None:
    """Checkpoints and sidecars written by root under umask 022 via ckptd.sidecar.write are
    published by a ckptd running as nobody with their metrics, and `best` goes to the lower
    val_loss."""
    python = interpreter_for(NOBODY)
    if python is None:
        pytest.skip("no Python interpreter here that another user may run")
    (shared_dir / "ck").mkdir(mode=0o755)
    previous = os.umask(0o022)
    try:
        renamed_in(shared_dir / "ck", "ckpt_1.pt", 3000, step=1, metrics={"val_loss": 0.2})
        renamed_in(shared_dir / "ck", "ckpt_2.pt", 3000, step=2, metrics={"val_loss": 0.7})
    finally:
        os.umask(previous)
    sidecar = shared_dir / "ck" / "ckpt_1.pt.metrics.json"
    assert stat.S_IMODE(sidecar.stat().st_mode) == 0o644 and sidecar.stat().st_uid == 0
    (shared_dir / "ckptd.yaml").write_text(CONFIG)
    home = shared_dir / "home"
    for path in (shared_dir / "state", home):
        path.mkdir()
        os.chown(path, NOBODY, NOBODY)
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(home),
        "PYTHONPATH": f"{REPO}:{':'.join(p for p in sys.path if p.endswith('site-packages'))}",
        "WANDB_DIR": str(home),
        "WANDB_CACHE_DIR": str(home / "cache"),
        "WANDB_DATA_DIR": str(home / "data"),
        "WANDB_CONFIG_DIR": str(home / "config"),
        "WANDB_ERROR_REPORTING": "false",
        "WANDB_SILENT": "true",
        "WANDB_BASE_URL": "http://127.0.0.1:9",
    }
    done = subprocess.run(
        [python, "-m", "ckptd", "--config", str(shared_dir / "ckptd.yaml"), "--once"],
        env=env, cwd=shared_dir, user=NOBODY, group=NOBODY, extra_groups=[],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Permission denied" not in done.stdout + done.stderr
    found = {a.metadata["step"]: a for a in artifacts(shared_dir / "state" / "wandb")}
    assert {step: a.metadata["metrics"] for step, a in found.items()} == {
        1: {"val_loss": 0.2},
        2: {"val_loss": 0.7},
    }
    assert "best" in found[1].aliases and "best" not in found[2].aliases
