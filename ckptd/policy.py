"""Alias policy: which aliases a new version takes. Pure functions of state, no I/O.

The caller (the publisher) carries the plan out: it logs the version with `plan.aliases` and
records `plan.best` in the journal. A step published after a higher one gets no `latest`;
the publisher moves `latest` back once the late version is committed (the sink put it there).
"""

from __future__ import annotations

import math
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ckptd.config import AliasConfig, BestRule, valid_alias

__all__ = ["AliasPlan", "Candidate", "better", "metric_value", "plan_aliases", "valid_alias"]


@dataclass(frozen=True)
class Candidate:
    """The checkpoint about to be published, as the policy needs to see it."""

    step: int
    epoch: float | None
    metrics: Mapping[str, Any]
    requested: tuple[str, ...] = ()  # aliases asked for by the sidecar


@dataclass(frozen=True)
class AliasPlan:
    """What to do with aliases when publishing one candidate."""

    aliases: tuple[str, ...]
    best: Mapping[str, float] = field(default_factory=dict)  # best aliases won, with values
    notes: tuple[str, ...] = ()  # problems worth one log line each (bad metric, bad alias)


def metric_value(metrics: Mapping[str, Any], name: str) -> float | None:
    """The metric as a finite float, or None (missing, NaN, inf, not a number)."""
    value = metrics.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def better(rule: BestRule, value: float, incumbent: float | None) -> bool:
    """Strictly better than the incumbent by more than min_delta; ties keep the incumbent."""
    if incumbent is None:
        return True
    if rule.mode == "min":
        return value < incumbent - rule.min_delta
    return value > incumbent + rule.min_delta


def plan_aliases(
    rules: AliasConfig,
    candidate: Candidate,
    highest_step: int | None,
    best: Mapping[str, float],
) -> AliasPlan:
    """Aliases for `candidate`, given the highest step already published in its collection
    and the current value of each best alias."""
    aliases: list[str] = []
    notes: list[str] = []
    won: dict[str, float] = {}
    is_newest = highest_step is None or candidate.step >= highest_step
    if rules.latest and is_newest:
        aliases.append("latest")
    for template in rules.templates:
        alias = _render(template, candidate)
        if alias is None:
            notes.append(f"alias template {template!r} names a value this checkpoint lacks")
        elif not valid_alias(alias):
            notes.append(f"alias template {template!r} gave {alias!r}, not a valid W&B alias")
        else:
            aliases.append(alias)
    for rule in rules.best:
        value = metric_value(candidate.metrics, rule.metric)
        if value is None:
            raw = candidate.metrics.get(rule.metric, "missing")
            notes.append(f"metric {rule.metric} is {raw!r}: cannot compete for {rule.alias_name}")
            continue
        if better(rule, value, best.get(rule.alias_name)):
            aliases.append(rule.alias_name)
            won[rule.alias_name] = value
    for alias in candidate.requested:
        if valid_alias(alias):
            aliases.append(alias)
        else:
            notes.append(f"requested alias {alias!r} is not a valid W&B alias")
    return AliasPlan(
        aliases=tuple(dict.fromkeys(aliases)),
        best=won,
        notes=tuple(notes),
    )


def _render(template: str, candidate: Candidate) -> str | None:
    values: dict[str, Any] = {"step": candidate.step}
    if candidate.epoch is not None:
        values["epoch"] = (
            int(candidate.epoch) if candidate.epoch == int(candidate.epoch) else (candidate.epoch)
        )
    values.update(candidate.metrics)
    names = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    if not names <= values.keys():
        return None
    try:
        return template.format_map(values)
    except (ValueError, KeyError, IndexError):
        return None
