"""Version metadata: ckptd's facts about a checkpoint, as stored with each version.

The one place that writes the metadata ckptd keeps in a version and reads it back. A version
whose metadata has no `ckptd` key was not published by ckptd: retention never deletes it, and
nothing is learnt from it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ckptd.sinks import PublishRequest

__all__ = ["Decoded", "decode", "encode", "key_of", "unpublishable"]


@dataclass(frozen=True)
class Decoded:
    """What ckptd reads back from a version it published."""

    step: int | None
    metrics: Mapping[str, Any] = field(default_factory=dict)
    key: str | None = None


def encode(request: PublishRequest) -> dict[str, Any]:
    """The metadata of `request`'s version: the sidecar's own metadata, then ckptd's facts
    (which win a clash: `step` must stay the step)."""
    facts = request.facts
    return {
        **facts.extra,
        "step": facts.step,
        "epoch": facts.epoch,
        "metrics": dict(facts.metrics),
        "format": facts.format,
        "source_path": facts.source_path,
        "host": facts.host,
        "files": dict(facts.files),
        "size_bytes": request.size,
        "ckptd": {"sidecar": facts.sidecar, "detected_at": facts.detected_at, "key": request.key},
    }


def decode(metadata: Mapping[str, Any] | None) -> Decoded | None:
    """ckptd's facts from a version's metadata; None if ckptd did not publish it."""
    if not isinstance(metadata, Mapping) or not isinstance(metadata.get("ckptd"), Mapping):
        return None
    step = metadata.get("step")
    metrics = metadata.get("metrics")
    return Decoded(
        step=step if isinstance(step, int) and not isinstance(step, bool) else None,
        metrics=metrics if isinstance(metrics, Mapping) else {},
        key=key_of(metadata),
    )


def key_of(metadata: Mapping[str, Any] | None) -> str | None:
    """The `PublishRequest.key` recorded in a version's metadata, if any."""
    ours = metadata.get("ckptd") if isinstance(metadata, Mapping) else None
    key = ours.get("key") if isinstance(ours, Mapping) else None
    return key if isinstance(key, str) else None


def unpublishable(request: PublishRequest) -> str | None:
    """Why `request` carries values no destination can store (NaN or infinite numbers,
    objects that are not JSON, text that is not Unicode), else None. Such a checkpoint fails
    at once: sent, it would fail as if transiently and block its collection until
    give_up_after."""
    try:
        json.dumps(encode(request), allow_nan=False)
        for text in (request.description or "", request.run_path or "", *request.aliases):
            text.encode("utf-8")
        for f in request.files:
            f.name.encode("utf-8")
    except (ValueError, TypeError, RecursionError) as exc:  # UnicodeEncodeError is a ValueError
        return f"its metadata cannot be published: {type(exc).__name__}: {exc}"
    return None
