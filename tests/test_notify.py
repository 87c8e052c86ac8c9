"""sd_notify: the messages ckptd sends to systemd, received on a real AF_UNIX datagram socket."""

from __future__ import annotations

import os
import signal
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ckptd.notify import SystemdNotifier
from tests.conftest import Daemon


class NotifySocket:
    """The receiving end of `$NOTIFY_SOCKET`, as systemd holds it."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.received: list[str] = []

    def next(self, timeout: float = 5.0) -> str:
        """The next datagram, or fail after `timeout` seconds."""
        self.sock.settimeout(timeout)
        try:
            message = self.sock.recv(4096).decode()
        except TimeoutError:
            raise AssertionError(f"no datagram in {timeout}s; so far: {self.received}") from None
        self.received.append(message)
        return message

    def wait_for(self, line: str, timeout: float) -> list[str]:
        """Receive until a datagram holds `line`; every datagram until then, in order."""
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{line!r} not received in {timeout}s; got {seen}")
            message = self.next(remaining)
            seen.append(message)
            if line in message.split("\n"):
                return seen

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    """A bound datagram socket on a short path (sun_path holds at most 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="ckptd-sd-", dir="/tmp") as short:
        receiver = NotifySocket(str(Path(short) / "notify"))
        yield receiver
        receiver.close()


def test_ready_status_watchdog_and_stopping_reach_the_socket(notify_socket: NotifySocket) -> None:
    """Each method sends its own datagram in systemd's `KEY=value` form."""
    notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": notify_socket.address})
    try:
        assert notifier.ready()
        assert notify_socket.next() == "READY=1"
        assert notifier.status("2 pending")
        assert notify_socket.next() == "STATUS=2 pending"
        assert notifier.watchdog()
        assert notify_socket.next() == "WATCHDOG=1"
        assert notifier.stopping()
        assert notify_socket.next() == "STOPPING=1"
    finally:
        notifier.close()


def test_ready_with_status_is_one_datagram(notify_socket: NotifySocket) -> None:
    """`ready(status)` sends READY and STATUS together, and a newline cannot start a field."""
    notifier = SystemdNotifier(notify_socket.address)
    try:
        notifier.ready("started\nREADY=0")
        assert notify_socket.next() == "READY=1\nSTATUS=started READY=0"
    finally:
        notifier.close()


def test_abstract_socket_address() -> None:
    """`@name` in NOTIFY_SOCKET is an abstract socket (a leading NUL on the wire)."""
    receiver = NotifySocket(f"@ckptd-test-{uuid.uuid4().hex}")
    notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": receiver.address})
    try:
        assert notifier.ready()
        assert receiver.next() == "READY=1"
    finally:
        notifier.close()
        receiver.close()


def test_tick_pings_at_half_the_interval_and_sends_status_on_change(
    notify_socket: NotifySocket,
) -> None:
    """With WATCHDOG_USEC=10s, tick() pings at once, then only after 5s have passed; STATUS is
    sent only when its text changed. (A tick that must send nothing is followed by one that
    sends a known datagram: datagrams arrive in order, so an extra one would show.)"""
    notifier = SystemdNotifier.from_env(
        {"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "10000000"}
    )
    try:
        assert notifier.watchdog_interval == 10.0
        notifier.tick(100.0, "idle")
        assert notify_socket.next() == "WATCHDOG=1\nSTATUS=idle"
        notifier.tick(104.9, "idle")
        notifier.tick(104.9, "1 pending")
        assert notify_socket.next() == "STATUS=1 pending"
        notifier.tick(105.0, "1 pending")
        assert notify_socket.next() == "WATCHDOG=1"
        notifier.tick(109.9, "1 pending")
        notifier.tick(109.9, "2 pending")
        assert notify_socket.next() == "STATUS=2 pending"
        notifier.tick(110.0, "2 pending")
        assert notify_socket.next() == "WATCHDOG=1"
    finally:
        notifier.close()


def test_watchdog_for_another_pid_is_off(notify_socket: NotifySocket) -> None:
    """WATCHDOG_PID naming another process (ckptd is its child) turns the pings off; zero or
    garbage WATCHDOG_USEC does too."""
    for env in (
        {"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid() + 1)},
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "soon"},
    ):
        notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": notify_socket.address, **env})
        assert notifier.watchdog_interval is None, env
    mine = SystemdNotifier.from_env(
        {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}
    )
    assert mine.watchdog_interval == 4.0


def test_without_notify_socket_everything_is_a_no_op() -> None:
    """Outside systemd nothing is sent and no socket is opened."""
    notifier = SystemdNotifier.from_env({})
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.status("x")
    assert not notifier.watchdog()
    assert not notifier.stopping()
    notifier.tick(0.0, "idle")
    assert notifier._socket is None


def test_unreachable_socket_is_logged_once_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A NOTIFY_SOCKET nobody listens on makes sends return False with one warning in all."""
    notifier = SystemdNotifier(str(tmp_path / "nobody"))
    try:
        assert not notifier.ready()
        assert not notifier.watchdog()
        assert not notifier.stopping()
    finally:
        notifier.close()
    warnings = [r for r in caplog.records if "cannot notify systemd" in r.getMessage()]
    assert len(warnings) == 1


def test_daemon_notifies_ready_watchdog_and_stopping(
    tmp_path: Path,
    wandb_env: dict[str, str],
    start_daemon: Callable[..., Daemon],
    notify_socket: NotifySocket,
) -> None:
    """The real daemon under a NOTIFY_SOCKET sends READY=1 after start-up, pings the watchdog
    (WATCHDOG_USEC=2s) while idle, and sends STOPPING=1 on SIGTERM before it exits 0."""
    config = tmp_path / "ckptd.yaml"
    config.write_text(
        "state_dir: state\nmetrics: {listen: null}\nwandb: {mode: offline}\nwatch: [{path: ck}]\n"
    )
    env = {**wandb_env, "NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "2000000"}
    daemon = start_daemon("--config", str(config), env=env)
    daemon.wait_for_log("ckptd started")
    try:
        notify_socket.wait_for("READY=1", timeout=10)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nckptd log:\n{daemon.log()}") from None
    notify_socket.wait_for("WATCHDOG=1", timeout=5)
    notify_socket.wait_for("WATCHDOG=1", timeout=5)  # and again: pings go on while idle
    daemon.proc.send_signal(signal.SIGTERM)
    notify_socket.wait_for("STOPPING=1", timeout=10)
    assert daemon.proc.wait(timeout=30) == 0, daemon.log()
