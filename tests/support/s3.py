"""A real S3-compatible endpoint on loopback: moto's standalone server, in this process.

The daemon and `ckptd restore` run as subprocesses with `env()`, so the boto3 inside the wandb
SDK talks to this server and to nothing else; the test reads and writes the bucket with
`client()`. Objects written here are real HTTP PUTs, and their ETags are the server's.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any, Self

__all__ = ["LoopbackS3"]


class LoopbackS3:
    """moto's server on 127.0.0.1 and a free port; a context manager."""

    def __init__(self, home: Path) -> None:
        self._home = home
        self._server: Any = None
        self.url = ""

    def __enter__(self) -> Self:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        # Named, so that a module-scoped server is not taken for a thread a test leaked.
        self._server._thread.name = "loopback-s3"
        host, port = self._server.get_host_and_port()
        self.url = f"http://{host}:{port}"
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.stop()

    def env(self) -> dict[str, str]:
        """Environment for a process whose boto3 must reach this server only: fixed test
        credentials, a region, no config files of the host, no instance metadata lookups."""
        self._home.mkdir(parents=True, exist_ok=True)
        empty = self._home / "aws-empty"
        empty.touch()
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_SESSION_TOKEN": "testing",
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": str(empty),
            "AWS_SHARED_CREDENTIALS_FILE": str(empty),
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self) -> Any:
        """A boto3 S3 client of this server."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
