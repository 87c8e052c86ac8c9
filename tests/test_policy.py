"""Alias policy: pure decisions, pinned by examples and by properties over random histories."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from ckptd.config import AliasConfig, BestRule
from ckptd.policy import Candidate, metric_value, plan_aliases

RULES = AliasConfig(
    latest=True,
    templates=("step-{step}",),
    best=(
        BestRule(metric="val_loss", mode="min", alias="best"),
        BestRule(metric="val_accuracy", mode="max"),
    ),
)


def test_first_checkpoint_takes_every_alias() -> None:
    """With nothing published, the first finite metrics win every best alias."""
    plan = plan_aliases(
        RULES, Candidate(10, None, {"val_loss": 0.5, "val_accuracy": 0.7}), None, {}
    )
    assert plan.aliases == ("latest", "step-10", "best", "best-val_accuracy")
    assert dict(plan.best) == {"best": 0.5, "best-val_accuracy": 0.7}


def test_ties_keep_the_earlier_version() -> None:
    """An equal value does not move a best alias."""
    plan = plan_aliases(RULES, Candidate(20, None, {"val_loss": 0.5}), 10, {"best": 0.5})
    assert "best" not in plan.aliases


def test_min_delta_requires_a_real_improvement() -> None:
    """min_delta demands an improvement larger than itself."""
    rules = AliasConfig(best=(BestRule(metric="loss", mode="min", alias="best", min_delta=0.1),))
    assert (
        "best"
        not in plan_aliases(rules, Candidate(2, None, {"loss": 0.45}), 1, {"best": 0.5}).aliases
    )
    assert (
        "best" in plan_aliases(rules, Candidate(2, None, {"loss": 0.39}), 1, {"best": 0.5}).aliases
    )


def test_bad_metrics_never_win_and_are_reported() -> None:
    """NaN, inf, missing and non-numeric metrics are reported and never take a best alias."""
    for metrics in ({"val_loss": math.nan}, {"val_loss": math.inf}, {}, {"val_loss": "low"},
                    {"val_loss": True}):  # fmt: skip
        plan = plan_aliases(RULES, Candidate(5, None, metrics), None, {})
        assert "best" not in plan.aliases
        assert any("val_loss" in note for note in plan.notes)


def test_older_step_published_late_does_not_take_latest() -> None:
    """A late, lower step gets its step alias and not latest."""
    plan = plan_aliases(RULES, Candidate(5, None, {}), 10, {})
    assert "latest" not in plan.aliases
    assert "step-5" in plan.aliases


def test_templates_over_epoch_and_metrics() -> None:
    """Templates see step, epoch and metrics; a template naming a missing value is skipped."""
    rules = AliasConfig(templates=("epoch-{epoch}", "loss-{val_loss:.2f}", "x-{nothing}"))
    plan = plan_aliases(rules, Candidate(7, 3.0, {"val_loss": 0.1234}), None, {})
    assert plan.aliases == ("latest", "epoch-3", "loss-0.12")
    assert any("x-{nothing}" in note for note in plan.notes)


def test_requested_aliases_are_validated() -> None:
    """Sidecar aliases are added when W&B would accept them, reported otherwise."""
    plan = plan_aliases(
        AliasConfig(), Candidate(1, None, {}, ("production", "bad/alias")), None, {}
    )
    assert "production" in plan.aliases and "bad/alias" not in plan.aliases
    assert any("bad/alias" in note for note in plan.notes)


def test_metric_value_accepts_only_finite_numbers() -> None:
    """Integers and finite floats count; everything else is None."""
    assert metric_value({"m": 3}, "m") == 3.0
    assert metric_value({"m": float("-inf")}, "m") is None
    assert metric_value({"m": None}, "m") is None


# -- properties over random histories ------------------------------------------------------


@dataclass
class Collection:
    """A model of W&B's server-side alias semantics: unique aliases, `latest` on the newest
    created version. The policy's plans are applied here the way the publisher applies them."""

    versions: list[Candidate] = field(default_factory=list)
    aliases: dict[str, int] = field(default_factory=dict)  # alias -> version index
    best: dict[str, float] = field(default_factory=dict)

    def publish(self, candidate: Candidate) -> None:
        highest = max((v.step for v in self.versions), default=None)
        plan = plan_aliases(RULES, candidate, highest, self.best)
        self.versions.append(candidate)
        index = len(self.versions) - 1
        for alias in (*plan.aliases, "latest"):  # W&B adds latest to the newest version
            self.aliases[alias] = index
        self.best.update(plan.best)
        if candidate.step < max(v.step for v in self.versions):  # the publisher's finish()
            self.aliases["latest"] = max(
                range(len(self.versions)), key=lambda i: self.versions[i].step
            )


metric = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([0.1, 0.2, 0.3]),  # ties are common in real runs
    st.none(),
    st.text(max_size=3),
)


@st.composite
def histories(draw: st.DrawFn) -> list[Candidate]:
    steps = draw(st.lists(st.integers(0, 10_000), min_size=1, max_size=25, unique=True))
    out = []
    for step in steps:  # the list order is the publication order, not step order
        metrics = {}
        for name in ("val_loss", "val_accuracy"):
            value = draw(metric)
            if value is not None:
                metrics[name] = value
        out.append(Candidate(step, None, metrics))
    return out


@settings(max_examples=300, deadline=None)
@given(histories())
def test_aliases_stay_right_after_every_publish(history: list[Candidate]) -> None:
    """After each publish: latest holds the highest step, each best alias holds the first
    version with the best finite value, and no alias is on two versions."""
    collection = Collection()
    for count, candidate in enumerate(history, start=1):
        collection.publish(candidate)
        published = collection.versions[:count]
        latest = collection.aliases["latest"]
        assert published[latest].step == max(v.step for v in published)
        for rule in RULES.best:
            finite = [
                (metric_value(v.metrics, rule.metric), i)
                for i, v in enumerate(published)
                if metric_value(v.metrics, rule.metric) is not None
            ]
            if not finite:
                assert rule.alias_name not in collection.aliases
                continue
            sign = 1 if rule.mode == "min" else -1
            expected = min(finite, key=lambda pair: (sign * pair[0], pair[1]))[1]  # type: ignore[operator]
            assert collection.aliases[rule.alias_name] == expected
        # aliases map to exactly one version by construction; step aliases are per version
        for index, version in enumerate(published):
            assert collection.aliases[f"step-{version.step}"] == index
