"""Logging setup: text for terminals, one JSON object per line for collectors.

Every record passes a redaction filter that masks the W&B API key wherever it might appear
(an exception message from the SDK, a URL), so that it never reaches a log.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

__all__ = ["setup_logging", "worth_logging"]

_TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def worth_logging(attempt: int) -> bool:
    """Whether failure number `attempt` (from 1) earns a log line: 1, 2, 4, 8, ... so that a
    fault that lasts hours leaves a dozen lines with their count, not thousands."""
    return attempt >= 1 and attempt & (attempt - 1) == 0


class _Redact(logging.Filter):
    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        for secret in self.secrets:
            message = message.replace(secret, "<api-key>")
            if record.exc_text:
                record.exc_text = record.exc_text.replace(secret, "<api-key>")
        record.msg, record.args = message, None
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key in ("collection", "checkpoint", "version", "error"):
            if key in record.__dict__:
                entry[key] = record.__dict__[key]
        if record.exc_info or record.exc_text:
            entry["exception"] = record.exc_text or self.formatException(record.exc_info)  # type: ignore[arg-type]
        return json.dumps(entry, default=str)


def setup_logging(fmt: str, level: str, secrets: list[str]) -> None:
    """Send ckptd's (and the libraries') log records to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT_FORMAT))
    handler.addFilter(_Redact(secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # The libraries speak at their own level: chatty at debug, quiet otherwise.
    for name in ("watchdog", "wandb", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
