"""Prometheus metrics and the health endpoints, served on `metrics.listen`.

`/metrics` is the Prometheus text format; `/healthz` answers 200 while the process and its
watcher threads live and the coordinator keeps stepping (503 naming the stall once one step
takes longer than `metrics.stall_after`); the server holds at most MAX_CONNECTIONS
connections, each cut off after READ_TIMEOUT seconds of silence; `/readyz` answers 200
once the journal is open and the configuration loaded, and the sink says its destination
answers. Each Service owns its own registry, so tests and several services in one process
never share counters.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["HealthServer", "Metrics"]

log = logging.getLogger(__name__)


class Metrics:
    """Every metric ckptd exports, labelled by collection."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.detected = Counter(
            "ckptd_checkpoints_detected", "Finished checkpoints queued", ["collection"], registry=r
        )
        self.published = Counter(
            "ckptd_checkpoints_published", "Checkpoints published", ["collection"], registry=r
        )
        self.failed = Counter(
            "ckptd_checkpoints_failed", "Checkpoints given up on", ["collection"], registry=r
        )
        self.superseded = Counter(
            "ckptd_checkpoints_superseded",
            "Checkpoints not published: replaced, deleted or identical to a version",
            ["collection"],
            registry=r,
        )
        self.dropped = Counter(
            "ckptd_checkpoints_dropped",
            "Checkpoints seen and not published, by reason (ckptd status lists them)",
            ["collection", "reason"],
            registry=r,
        )
        self.parked = Gauge(
            "ckptd_collection_parked", "1 while a collection is parked", ["collection"], registry=r
        )
        self.uploaded_bytes = Counter(
            "ckptd_uploaded_bytes", "Bytes of published checkpoints", ["collection"], registry=r
        )
        self.publish_seconds = Histogram(
            "ckptd_publish_seconds",
            "Time from queueing a checkpoint to its committed version",
            ["collection"],
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
            registry=r,
        )
        self.queue_depth = Gauge(
            "ckptd_queue_depth", "Checkpoints queued, not yet published", ["collection"], registry=r
        )
        self.retries = Counter(
            "ckptd_retries", "Failed publish attempts by class", ["collection", "kind"], registry=r
        )
        self.promotions = Counter(
            "ckptd_promotions",
            "Promotion attempts by target and outcome: done, retry, parked, failed",
            ["target", "outcome"],
            registry=r,
        )
        self.last_success = Gauge(
            "ckptd_last_success_timestamp_seconds",
            "Unix time of the last publish",
            ["collection"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


MAX_CONNECTIONS = 32  # concurrent connections to the metrics server; more are closed at once
READ_TIMEOUT = 5.0  # seconds a connection may stay silent


class _BoundedServer(ThreadingHTTPServer):
    """A thread per connection, up to `limit` at once: beyond that a connection is closed
    as soon as it is accepted, so that half-open connections cannot pile up threads."""

    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], limit: int
    ) -> None:
        self._limit = limit
        self._slots = threading.BoundedSemaphore(limit)
        super().__init__(address, handler)

    @property
    def open_connections(self) -> int:
        """Connections being served now."""
        return self._limit - self._slots._value

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.debug("metrics endpoint: %d connections open; closing one more", self._limit)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class HealthServer:
    """A small HTTP server for /metrics, /healthz and /readyz on its own thread."""

    def __init__(
        self,
        address: tuple[str, tuple[int, ...]],
        metrics: Metrics,
        unhealthy: Callable[[], str | None],
        ready: Callable[[], str | None],
        *,
        max_connections: int = MAX_CONNECTIONS,
        read_timeout: float = READ_TIMEOUT,
    ) -> None:
        self.address = address
        self.metrics = metrics
        self.unhealthy = unhealthy  # None when healthy, else why not
        self.max_connections = max_connections
        self.read_timeout = read_timeout
        self.ready = ready  # None when ready, else why not
        self._server: _BoundedServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    @property
    def open_connections(self) -> int:
        """Connections being served now (at most `max_connections`)."""
        return self._server.open_connections if self._server is not None else 0

    def start(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            timeout = owner.read_timeout  # a client that sends nothing is cut off

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._answer(200, owner.metrics.render(), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    why = owner.unhealthy()
                    self._answer(503 if why else 200, f"{why or 'ok'}\n".encode())
                elif path == "/readyz":
                    why = owner.ready()
                    self._answer(503 if why else 200, f"{why or 'ready'}\n".encode())
                else:
                    self._answer(404, b"not found: try /metrics, /healthz or /readyz\n")

            def _answer(self, code: int, body: bytes, kind: str = "text/plain") -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("metrics endpoint: " + format, *args)

        server = self._bind(Handler)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="ckptd-metrics", daemon=True
        )
        self._thread.start()
        log.info("metrics and health on http://%s/metrics", self.bound)

    @property
    def bound(self) -> str:
        """host:port the server listens on."""
        host = self.address[0]
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def _bind(self, handler: type[BaseHTTPRequestHandler]) -> _BoundedServer:
        """Listen on the first free port of `address`; a clash on every one is an error."""
        from ckptd.errors import CkptdError

        host, ports = self.address
        for port in ports[:-1]:
            try:
                return _BoundedServer((host, port), handler, self.max_connections)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise CkptdError(f"metrics.listen: cannot listen on {host}:{port}: "
                                     f"{exc.strerror or exc}") from None  # fmt: skip
        try:
            return _BoundedServer((host, ports[-1]), handler, self.max_connections)
        except OSError as exc:
            tried = f"{ports[0]}" if len(ports) == 1 else f"any port of {ports[0]}-{ports[-1]}"
            raise CkptdError(
                f"metrics.listen: cannot listen on {host}:{tried}: {exc.strerror or exc}"
            ) from None

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None
