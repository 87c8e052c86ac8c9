"""Snapshots that must be copied (state_dir on another filesystem) do not stall the daemon."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon
from tests.support.checkpoints import sparse_renamed_in
from tests.support.mounts import tmpfs
from tests.support.wandb_offline import artifacts

CONFIG = """\
state_dir: {state}
wandb: {{mode: offline, project: staging}}
metrics: {{listen: null}}
watch:
  - {{path: {slow}, artifact: copied, format: file, patterns: ["*.bin"], sidecar: {{wait: 0s}}}}
  - {{path: {fast}, artifact: linked, format: file, patterns: ["*.bin"], sidecar: {{wait: 0s}}}}
"""
GIB = 1 << 30


@pytest.fixture
def other_fs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs: another filesystem than tmp_path's, so nothing links across (root mounts)."""
    with tmpfs(tmp_path / "other-fs", "2g") as mount:
        yield mount


def test_a_long_copy_does_not_hold_up_a_checkpoint_that_links(
    tmp_path: Path, other_fs: Path, wandb_env: dict[str, str], start_daemon: Callable[..., Daemon]
) -> None:
    """state_dir is on a tmpfs. A 1 GiB checkpoint on tmp_path's filesystem has to be copied
    there; one renamed into a directory on the tmpfs right after it is hard-linked, and is
    queued while the copy runs. The copied one follows with its bytes intact."""
    slow, fast, state = tmp_path / "slow", other_fs / "fast", other_fs / "state"
    slow.mkdir()
    fast.mkdir()
    config = tmp_path / "ckptd.yaml"
    config.write_text(CONFIG.format(state=state, slow=slow, fast=fast))
    daemon = start_daemon("--config", str(config), env=wandb_env)
    daemon.wait_for_log("ckptd started")

    big = sparse_renamed_in(slow, "big.bin", GIB)
    small = sparse_renamed_in(fast, "small.bin", 64 << 10)
    daemon.wait_for_log("as copied:", timeout=180)
    daemon.wait_for_log("as linked:", timeout=60)
    log = daemon.log()
    assert log.index(f"{fast / 'small.bin'} (step") < log.index(f"{slow / 'big.bin'} (step"), log
    assert "copying checkpoints instead" in log
    # The detector's hold says which of the reasons a link is impossible here.
    assert f"cannot hard-link checkpoints from {slow}" in log
    assert "(state_dir is on another filesystem than the checkpoints)" in log
    assert daemon.stop() == 0, log

    published = {a.name: a for a in artifacts(state / "wandb")}
    assert published["copied"].entries["big.bin"][:2] == (big, GIB)
    assert published["linked"].entries["small.bin"][:2] == (small, 64 << 10)
    assert list((state / "staging").iterdir()) == []  # both snapshots released
