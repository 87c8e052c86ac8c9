"""systemd's notification protocol (sd_notify), without libsystemd.

Under `Type=notify` systemd hands the service a datagram socket in `$NOTIFY_SOCKET` (a path,
or an abstract socket written `@name`) and, with `WatchdogSec=`, the interval in
`$WATCHDOG_USEC`. The service sends newline-separated `KEY=value` datagrams: `READY=1` once
it works, `STATUS=...` for `systemctl status`, `WATCHDOG=1` at least once per interval and
`STOPPING=1` when it begins to shut down. Outside systemd every method is a no-op.

Only the coordinator thread (and, at shutdown, the thread that called `shutdown()`) use a
notifier; a lock keeps the two from interleaving anyway.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping

__all__ = ["SystemdNotifier"]

log = logging.getLogger(__name__)


class SystemdNotifier:
    """Sends state changes to systemd. Cheap to construct: the socket opens on first send.

    `address` is the `$NOTIFY_SOCKET` value (None: not under systemd, every call is a
    no-op); `watchdog_interval` is seconds between the pings systemd requires (None: no
    watchdog). Sends never raise: a failure is logged once and the daemon carries on,
    because a broken notification socket must not stop checkpoints from being published.
    """

    def __init__(self, address: str | None, watchdog_interval: float | None = None) -> None:
        self.address = address
        self.watchdog_interval = watchdog_interval
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()
        self._last_ping: float | None = None
        self._last_status: str | None = None
        self._failed = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SystemdNotifier:
        """A notifier for `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and `$WATCHDOG_PID`.

        The watchdog is on only when `WATCHDOG_USEC` is a positive number and `WATCHDOG_PID`
        is unset or this process's id (systemd sets it so that children do not ping).
        """
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        interval: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            interval = int(usec) / 1_000_000
        return cls(address, interval)

    @property
    def enabled(self) -> bool:
        """True under systemd (a notification socket was given)."""
        return self.address is not None

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd that start-up finished (`READY=1`), optionally with a status line."""
        lines = ["READY=1"]
        if status is not None:
            lines.append(f"STATUS={_one_line(status)}")
            self._last_status = status
        return self._send(lines)

    def status(self, text: str) -> bool:
        """Set the free-form line `systemctl status` shows."""
        self._last_status = text
        return self._send([f"STATUS={_one_line(text)}"])

    def watchdog(self) -> bool:
        """Ping the watchdog (`WATCHDOG=1`)."""
        return self._send(["WATCHDOG=1"])

    def stopping(self, status: str | None = None) -> bool:
        """Tell systemd that shutdown began (`STOPPING=1`): it then waits `TimeoutStopSec`."""
        lines = ["STOPPING=1"]
        if status is not None:
            lines.append(f"STATUS={_one_line(status)}")
        return self._send(lines)

    def tick(self, now: float, status: str) -> None:
        """Call on every loop iteration: pings the watchdog once half its interval passed
        since the last ping (`now` in seconds, any monotonic-enough clock) and sends
        `status` when it differs from the last one sent."""
        if not self.enabled:
            return
        lines = []
        interval = self.watchdog_interval
        if interval is not None and (
            self._last_ping is None or now - self._last_ping >= interval / 2
        ):
            lines.append("WATCHDOG=1")
            self._last_ping = now
        if status != self._last_status:
            lines.append(f"STATUS={_one_line(status)}")
            self._last_status = status
        if lines:
            self._send(lines)

    def close(self) -> None:
        """Release the socket; later calls open it again."""
        with self._lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None

    def _send(self, lines: list[str]) -> bool:
        if self.address is None:
            return False
        address = self.address
        if address.startswith("@"):  # an abstract socket: a leading NUL byte on the wire
            address = "\0" + address[1:]
        payload = "\n".join(lines).encode()
        with self._lock:
            try:
                if self._socket is None:
                    self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    self._socket.setblocking(False)  # never hold up the coordinator
                self._socket.sendto(payload, address)
            except OSError as exc:
                if not self._failed:
                    self._failed = True
                    log.warning(
                        "cannot notify systemd on %s: %s (further failures are not logged)",
                        self.address,
                        exc.strerror or exc,
                    )
                return False
        return True


def _one_line(text: str) -> str:
    """A status is one line of the datagram: newlines would start a new `KEY=` field."""
    return " ".join(text.split())
