"""A good neighbour: ckptd and its wandb-core run at low CPU and I/O priority, and hashing
reads no faster than `upload.max_read_rate`."""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from ckptd.config import load_config
from ckptd.errors import ConfigError
from ckptd.hashing import md5_b64
from ckptd.priority import ReadRate, io_priority
from tests.conftest import Daemon, wait_until
from tests.support.checkpoints import renamed_in

BEST_EFFORT, IDLE = 2, 3


def threads(pid: int) -> list[int]:
    return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]


def nice(tid: int) -> int:
    """A thread's niceness, field 19 of /proc/<tid>/stat (after the command in brackets)."""
    fields = Path(f"/proc/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[16])


def children(pid: int) -> list[int]:
    found = []
    for tid in threads(pid):
        text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
        found += [int(child) for child in text.split()]
    return found


def start(
    tmp_path: Path, env: dict[str, str], run: Callable[..., Daemon], priority: str | None
) -> Daemon:
    config = tmp_path / "ckptd.yaml"
    upload = f"upload: {{priority: {priority}}}\n" if priority else ""
    config.write_text(f"state_dir: state\nmetrics: null\n{upload}watch: [{{path: ck}}]\n")
    (tmp_path / "ck").mkdir()
    daemon = run("--config", str(config), env=env)
    daemon.wait_for_log("ckptd started")
    return daemon


def test_by_default_ckptd_and_its_wandb_core_run_at_low_priority(
    tmp_path: Path, wandb_env: dict[str, str], start_daemon: Callable[..., Daemon]
) -> None:
    """Every thread of the daemon and of the wandb-core it starts runs at nice 10 and I/O
    best-effort 7, and the start-up log says so."""
    daemon = start(tmp_path, wandb_env, start_daemon, None)
    renamed_in(tmp_path / "ck", "ckpt_1.pt")
    daemon.wait_for_log("published")
    pid = daemon.proc.pid
    wait_until(lambda: children(pid), 30, "wandb-core to start")
    tids = threads(pid) + [t for child in children(pid) for t in threads(child)]
    assert len(tids) > 3
    assert {nice(t) for t in tids} == {10}
    assert {io_priority(t) for t in tids} == {(BEST_EFFORT, 7)}
    assert "running at nice 10, I/O best-effort 7 (upload.priority: low)" in daemon.log()
    assert daemon.stop() == 0


@pytest.mark.parametrize(("priority", "expected"), [("idle", (19, IDLE)), ("normal", (0, 0))])
def test_priority_is_configurable(
    tmp_path: Path,
    wandb_env: dict[str, str],
    start_daemon: Callable[..., Daemon],
    priority: str,
    expected: tuple[int, int],
) -> None:
    """`idle` runs at nice 19 in the idle I/O class; `normal` changes nothing."""
    daemon = start(tmp_path, wandb_env, start_daemon, priority)
    pid = daemon.proc.pid
    assert nice(pid) == expected[0]
    io = io_priority(pid)
    assert io is not None and io[0] == expected[1]
    assert daemon.stop() == 0


def test_the_read_rate_is_shared_and_bounds_the_average() -> None:
    """Reading 3 s worth of bytes in 3 takes (1 s of burst allowed) waits 2 s in all."""
    now = [0.0]
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds

    rate = ReadRate(1000.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(3):
        rate.take(1000)
    assert waits == pytest.approx([1.0, 1.0])


def test_hashing_honours_the_read_rate(tmp_path: Path) -> None:
    """md5 with a rate reads the whole file, gives the same digest, and waits as it reads."""
    path = tmp_path / "ckpt.bin"
    data = os.urandom(3 << 20)
    path.write_bytes(data)
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    digest = md5_b64(path, ReadRate(1 << 20, clock=lambda: now[0], sleep=sleep))
    assert digest == base64.b64encode(hashlib.md5(data).digest()).decode()
    assert sum(slept) == pytest.approx(2.0)


def test_a_read_rate_is_bytes_per_second(tmp_path: Path) -> None:
    """`max_read_rate: 10%` makes no sense for a rate: refused, naming the key."""
    config = tmp_path / "ckptd.yaml"
    config.write_text("upload: {max_read_rate: 10%}\nwatch: [{path: x}]\n")
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert info.value.problems == [
        "upload.max_read_rate: expected bytes per second such as 200MB, got '10%'"
    ]
    config.write_text("upload: {max_read_rate: 200MB}\nwatch: [{path: x}]\n")
    rate = load_config(config).upload.max_read_rate
    assert rate is not None and rate.bytes == 200_000_000
