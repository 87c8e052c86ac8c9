"""Is the destination there at all? A cheap HTTP probe, cached, for /readyz and restore."""

from __future__ import annotations

import math
import threading
import urllib.error
import urllib.request

__all__ = ["Reachability"]


class Reachability:
    """Whether W&B answers HTTP at all (any status), probed at most every `interval` s."""

    def __init__(self, base_url: str, interval: float = 30.0, timeout: float = 3.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.interval = interval
        self.timeout = timeout
        self._checked_at = -math.inf
        self._problem: str | None = None
        self._lock = threading.Lock()

    def problem(self, now: float) -> str | None:
        """None when W&B answered the last probe, else why not."""
        with self._lock:
            if now - self._checked_at >= self.interval:
                self._problem = self._probe()
                self._checked_at = now
            return self._problem

    def _probe(self) -> str | None:
        try:
            with urllib.request.urlopen(f"{self.base_url}/healthz", timeout=self.timeout):  # noqa: S310 - base_url is the configured W&B server
                return None
        except urllib.error.HTTPError:
            return None  # it answered: reachable, whatever it thinks of the path
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            return f"cannot reach {self.base_url}: {reason}"
