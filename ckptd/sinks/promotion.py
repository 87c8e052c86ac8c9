"""Promotion targets: where a published version goes next. The contract every target keeps.

A target is called by `ckptd.promote` (the daemon's promotion step, and `ckptd promote`),
one promotion at a time per target. `promote` must be idempotent: the journal marks a
promotion done only after `promote` returned, so a crash in between calls it again for the
same version, and the target must then change nothing that is there already (a Registry
link is not made twice; a Hub release makes no second commit and no second tag).

Errors: `promote` raises `PublishError` with `transient=True` when retrying can help
(network, timeouts, 5xx, 429) and `transient=False` when it cannot (bad token, no
permission, a checkpoint the target cannot take); nothing else escapes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ckptd.config import Config, parse_target
from ckptd.sinks import Sink

__all__ = ["Promotion", "PromotionTarget", "open_target"]


@dataclass(frozen=True)
class Promotion:
    """One published version to promote. `qualified` is its full W&B name
    (`entity/project/collection:v3`); `aliases` apply where the target has aliases."""

    collection: str
    type: str
    version: str
    step: int
    aliases: tuple[str, ...] = ()
    metrics: Mapping[str, Any] = field(default_factory=dict)


class PromotionTarget(Protocol):
    """A destination for promoted versions."""

    name: str  # the target as configured: `registry:...` or `huggingface:...`

    def promote(self, promotion: Promotion) -> str:
        """Put `promotion`'s version at this target (idempotently, see the module) and
        return one line saying what is there now, for the log and `ckptd status`."""
        ...

    def close(self) -> None:
        """Release everything; no call is made after this."""
        ...


def open_target(config: Config, spec: str, api_key: str | None, source: Sink) -> PromotionTarget:
    """The target named `spec` (`registry:wandb-registry-model/demo`, `huggingface:org/demo`);
    `source` is the sink the versions were published to (a Hub release downloads from it;
    the target closes it). Cheap: nothing is contacted before the first `promote`."""
    kind, where = parse_target(spec)
    if kind == "registry":
        from ckptd.sinks.registry import RegistryTarget

        source.close()  # a link is made by the W&B client itself, on the version's server
        return RegistryTarget(config, where, api_key)
    from ckptd.sinks.hub import HubTarget

    return HubTarget(config, where, source)
