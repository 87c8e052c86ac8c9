"""Shared fixtures: isolated W&B environments and a ckptd process runner."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.fake_wandb import FakeWandbServer

CKPTD = [sys.executable, "-m", "ckptd"]


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail any test that leaves a thread of ours running (watchdog's lesson)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5
    while True:
        leaked = [
            t for t in set(threading.enumerate()) - before
            if t.is_alive() and t.name.startswith(("ckptd", "Thread-"))
            and "wandb" not in repr(t).lower()
        ]  # fmt: skip
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not leaked, f"threads left running: {leaked}"


@pytest.fixture
def wandb_env(tmp_path: Path) -> dict[str, str]:
    """An environment in which the wandb SDK cannot reach anything but what a test starts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    root = tmp_path / "wandb-home"
    for name in ("DIR", "CACHE_DIR", "DATA_DIR", "CONFIG_DIR"):
        (root / name.lower()).mkdir(parents=True, exist_ok=True)
        env[f"WANDB_{name}"] = str(root / name.lower())
    env.update(
        WANDB_ERROR_REPORTING="false",
        WANDB_DISABLE_GIT="true",
        WANDB_DISABLE_CODE="true",
        WANDB_SILENT="true",
        HOME=str(root),
        # Any attempt to reach W&B's cloud fails at once instead of leaving the machine.
        WANDB_BASE_URL="http://127.0.0.1:9",
    )
    return env


class Daemon:
    """A `ckptd` process started by a test, with its combined log captured to a file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log_path = log
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            [*CKPTD, *args], env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 60) -> None:
        wait_until(lambda: text in self.log() or self.proc.poll() is not None, timeout, text)
        if text not in self.log():
            raise AssertionError(
                f"ckptd exited ({self.proc.returncode}) before {text!r}:\n{self.log()}"
            )

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


def ckptd_status(config: Path, env: dict[str, str]) -> str:
    """What `ckptd status --config CONFIG` prints (it must succeed)."""
    result = subprocess.run(
        [*CKPTD, "status", "--config", str(config)], env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def wait_until(condition: Callable[[], object], timeout: float, what: str = "condition") -> None:
    """Poll `condition` until it is truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start `ckptd ARGS...`; every daemon still running at the end is killed."""
    daemons: list[Daemon] = []

    def start(*args: str, env: dict[str, str]) -> Daemon:
        daemon = Daemon(list(args), env, tmp_path / f"ckptd-{len(daemons)}.log")
        daemons.append(daemon)
        return daemon

    yield start
    for daemon in daemons:
        daemon.kill()


@pytest.fixture
def wandb_server(tmp_path: Path) -> Iterator[FakeWandbServer]:
    """A loopback W&B server for this test only."""
    with FakeWandbServer(storage_dir=tmp_path / "server-storage") as server:
        yield server


@pytest.fixture
def online_env(
    wandb_env: dict[str, str], wandb_server: FakeWandbServer, tmp_path: Path
) -> dict[str, str]:
    """wandb_env pointed at the test's loopback server, with its key."""
    env = dict(wandb_env)
    env.update(wandb_server.env(tmp_path / "wandb-online"))
    return env
