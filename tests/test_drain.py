"""Drain means publish: SIGTERM stops detection, and what the journal holds is still hashed
and published (in step order) before ckptd exits, within upload.shutdown_timeout."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import Daemon
from tests.support.checkpoints import sparse_renamed_in
from tests.support.fake_wandb import FakeWandbServer
from tests.support.wandb_offline import artifacts

SIZE = 300 * 1024 * 1024
SHUTDOWN_TIMEOUT = 60.0
CONFIG = """\
state_dir: state
wandb: {{mode: {mode}, project: drain{base_url}}}
metrics: {{listen: null}}
upload: {{shutdown_timeout: {timeout}s}}
watch:
  - {{path: ck, artifact: big, format: file, patterns: ['*.bin'], sidecar: {{wait: 0s}}}}
"""


@contextmanager
def destination(mode: str, tmp_path: Path, env: dict[str, str]) -> Iterator[FakeWandbServer | None]:
    """Offline: nothing. Online: a loopback server that hashes and drops the uploaded bytes
    (storing 900 MB would cost disk for nothing); `env` is pointed at it."""
    if mode == "offline":
        yield None
        return
    with FakeWandbServer(storage_dir=tmp_path / "server", discard_uploads=True) as server:
        env.update(server.env(tmp_path / "wandb-online"))
        yield server


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_sigterm_publishes_three_queued_300mb_checkpoints_before_exiting(
    tmp_path: Path, wandb_env: dict[str, str], start_daemon: Callable[..., Daemon], mode: str
) -> None:
    """Three 300 MB checkpoints are queued (not yet hashed) when SIGTERM arrives: all three
    are published, in step order, and ckptd exits 0 inside shutdown_timeout, its last log
    line saying nothing is left."""
    root = tmp_path / "ck"
    root.mkdir()
    env = dict(wandb_env)
    with destination(mode, tmp_path, env) as server:
        base_url = "" if server is None else f', base_url: "{server.url}"'
        config = tmp_path / "ckptd.yaml"
        config.write_text(CONFIG.format(mode=mode, base_url=base_url, timeout=SHUTDOWN_TIMEOUT))
        daemon = start_daemon("--config", str(config), env=env)
        daemon.wait_for_log("ckptd started")
        aside = tmp_path / "aside"  # written (and hashed here) first, then renamed in at once
        aside.mkdir()
        md5s = {f"big_{n}.bin": sparse_renamed_in(aside, f"big_{n}.bin", SIZE) for n in (1, 2, 3)}
        for name in md5s:
            (aside / name).rename(root / name)
        daemon.wait_for_log("big_3.bin (step 3) queued")
        daemon.proc.terminate()
        began = time.monotonic()
        assert "big_3.bin as big" not in daemon.log()  # the drain has work to do
        assert daemon.proc.wait(SHUTDOWN_TIMEOUT + 30) == 0, daemon.log()  # one signal only
        took = time.monotonic() - began
        assert took < SHUTDOWN_TIMEOUT, f"took {took:.1f}s"
        log = daemon.log()
        order = [log.index(f"big_{n}.bin as big") for n in (1, 2, 3)]
        assert order == sorted(order), log
        assert "nothing is left to publish" in log.splitlines()[-1]
        if server is None:
            found = artifacts(tmp_path / "state" / "wandb")
            digests = {name: e[0] for a in found for name, e in a.entries.items()}
        else:
            found = server.versions("big", "drain")
            assert [v.state for v in found] == ["COMMITTED"] * 3
            digests = {n: e["digest"] for v in found for n, e in v.manifest["contents"].items()}
        assert digests == md5s


def test_what_cannot_finish_in_time_is_named_in_the_last_line(
    tmp_path: Path, online_env: dict[str, str], start_daemon: Callable[..., Daemon]
) -> None:
    """W&B unreachable, shutdown_timeout 3s: SIGTERM ends ckptd soon after 3s, exit 0, and
    its last log line names the checkpoint left for the next start."""
    (tmp_path / "ck").mkdir()
    with socket.socket() as s:  # a loopback port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "ckptd.yaml"
    config.write_text(
        CONFIG.format(mode="online", base_url=f', base_url: "http://127.0.0.1:{port}"', timeout=3)
    )
    daemon = start_daemon("--config", str(config), env=online_env)
    daemon.wait_for_log("ckptd started")
    sparse_renamed_in(tmp_path / "ck", "big_7.bin", 1 << 20)
    daemon.wait_for_log("big_7.bin (step 7) queued")
    began = time.monotonic()
    daemon.proc.terminate()
    assert daemon.proc.wait(30) == 0, daemon.log()
    assert time.monotonic() - began < 3 + 10
    last = daemon.log().splitlines()[-1]
    assert "1 checkpoint(s) left for the next start" in last
    assert "big_7.bin (step 7): not published yet" in last
