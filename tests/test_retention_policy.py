"""The retention planner: pure functions, pinned by properties (hypothesis) and examples."""

from __future__ import annotations

import fnmatch
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ckptd.config import AliasConfig, BestRule, LocalRetention, RemoteRetention, Size
from ckptd.retention.plan import (
    LocalCheckpoint,
    RetentionPlan,
    RetentionPolicy,
    RetentionState,
    format_size,
    journal_aliases,
    plan,
)
from ckptd.sinks import RemoteVersion

MiB = 1 << 20
ALIASES = AliasConfig(
    latest=True,
    templates=("step-{step}", "loss-{val_loss:.2f}"),
    best=(BestRule(metric="val_loss", alias="best"), BestRule(metric="acc", mode="max")),
)
# The oracle's own list of what ckptd manages among the aliases drawn below (not the code's).
MANAGED = {"latest", "best", "best-acc", "step-1", "step-20", "step-300", "loss-0.25"}
FOREIGN = {"candidate", "production", "staging", "release-1", "epoch-2"}
PROTECT_ENTRIES = [
    "latest", "best*", "production", "staging", "step-2*", "!candidate", "!release-*", "*",
    "!production",
]  # fmt: skip

alias_sets = st.frozensets(st.sampled_from(sorted(MANAGED | FOREIGN | {"v7"})), max_size=3)
remote_rules = st.builds(
    RemoteRetention,
    keep_last=st.none() | st.integers(1, 6),
    protect=st.lists(st.sampled_from(PROTECT_ENTRIES), max_size=4, unique=True).map(tuple),
    keep_every=st.none() | st.integers(1, 40),
)
local_rules = st.builds(
    LocalRetention,
    delete_after_upload=st.booleans(),
    keep_last=st.integers(0, 4),
    min_free=st.none() | st.integers(0, 64).map(lambda n: Size(bytes=n * MiB)),
    allow_offline=st.booleans(),
)
policies = st.builds(
    RetentionPolicy, remote=remote_rules, local=local_rules, aliases=st.just(ALIASES)
)


@st.composite
def remote_versions(draw: st.DrawFn) -> tuple[RemoteVersion, ...]:
    count = draw(st.integers(0, 14))
    return tuple(
        RemoteVersion(
            version=f"v{index}",
            index=index,
            step=draw(st.none() | st.integers(0, 120)) if draw(st.booleans()) else index * 10,
            aliases=tuple(sorted(draw(alias_sets))),
            size=draw(st.integers(0, 4 * MiB)),
            linked=draw(st.integers(0, 9)) == 0,
        )
        for index in range(count)
    )


@st.composite
def local_checkpoints(draw: st.DrawFn) -> tuple[LocalCheckpoint, ...]:
    count = draw(st.integers(0, 12))
    states = st.sampled_from(["ready", "hashed", "published", "aliased", "aliased", "failed"])
    return tuple(
        LocalCheckpoint(
            checkpoint_id=row_id,
            path=f"ckpt_{row_id}.pt",
            step=draw(st.integers(0, 50)),
            state=draw(states),
            version=draw(st.none() | st.just(f"v{row_id}")),
            aliases=tuple(sorted(draw(alias_sets))),
            size=draw(st.integers(1, 4 * MiB)),
            problem=draw(st.none() | st.just("ckpt.pt changed since it was published")),
        )
        for row_id in range(1, count + 1)
    )


states = st.builds(
    RetentionState,
    remote=st.none() | remote_versions(),
    local=local_checkpoints(),
    free_bytes=st.none() | st.integers(0, 64 * MiB),
    total_bytes=st.just(64 * MiB),
)


def protected(alias: str, protect: tuple[str, ...]) -> bool:
    """The oracle: what must keep a version, written from the rules, not from the code."""
    if alias == "v7":
        return False
    plain = [p for p in protect if not p.startswith("!")]
    released = [p[1:] for p in protect if p.startswith("!")]
    if any(fnmatch.fnmatchcase(alias, p) for p in plain):
        return True
    return alias in FOREIGN and not any(fnmatch.fnmatchcase(alias, p) for p in released)


def deleted(result: RetentionPlan, where: str) -> set[str]:
    return {
        (d.version if where == "remote" else d.path) or ""
        for d in result.deletions
        if d.where == where
    }


def apply(state: RetentionState, result: RetentionPlan) -> RetentionState:
    """What the world looks like after the executor carried `result` out."""
    gone_versions, gone_paths = deleted(result, "remote"), deleted(result, "local")
    freed = sum(c.size for c in state.local if c.path in gone_paths)
    return RetentionState(
        remote=None
        if state.remote is None
        else tuple(v for v in state.remote if v.version not in gone_versions),
        local=tuple(c for c in state.local if c.path not in gone_paths),
        free_bytes=None if state.free_bytes is None else state.free_bytes + freed,
        total_bytes=state.total_bytes,
    )


@settings(max_examples=400)
@given(states, policies)
def test_remote_plan_never_deletes_protected_linked_foreign_or_newest(
    state: RetentionState, policy: RetentionPolicy
) -> None:
    """No plan deletes a version that is not ckptd's, is linked, holds a protected or foreign
    alias, or is among the newest keep_last by step; without keep_last nothing is deleted."""
    result = plan(state, policy)
    gone = deleted(result, "remote")
    versions = state.remote or ()
    ours = sorted((v for v in versions if v.step is not None), key=lambda v: (v.step, v.index))
    newest = {v.version for v in ours[max(0, len(ours) - (policy.remote.keep_last or 0)) :]}
    for v in versions:
        if v.version not in gone:
            continue
        assert policy.remote.keep_last is not None
        assert v.step is not None and not v.linked
        assert not any(protected(a, policy.remote.protect) for a in v.aliases), v
        assert v.version not in newest
    assert len([d for d in result.decisions if d.where == "remote"]) == len(versions)


@settings(max_examples=400)
@given(states, policies)
def test_local_plan_never_deletes_unpublished_changed_protected_or_newest(
    state: RetentionState, policy: RetentionPolicy
) -> None:
    """No plan deletes the files of a checkpoint that is not published with a committed
    version (offline ones only with allow_offline), whose files changed, that holds a
    protected alias or is among the newest keep_last published; nothing at all unless
    delete_after_upload or min_free asks for it."""
    result = plan(state, policy)
    gone = deleted(result, "local")
    rules = policy.local
    eligible = sorted(
        (
            c
            for c in state.local
            if c.state == "aliased"
            and (c.version is not None or rules.allow_offline)
            and c.problem is None
        ),
        key=lambda c: (c.step, c.checkpoint_id),
    )
    newest = (
        {c.path for c in eligible[max(0, len(eligible) - rules.keep_last) :]}
        if rules.keep_last
        else set()
    )
    if not rules.delete_after_upload and rules.min_free is None:
        assert gone == set()
    for c in state.local:
        if c.path not in gone:
            continue
        assert c in eligible, c
        assert c.path not in newest
        assert not any(protected(a, policy.remote.protect) for a in c.aliases), c


@settings(max_examples=300)
@given(states, policies)
def test_min_free_deletes_oldest_first_and_only_what_is_needed(
    state: RetentionState, policy: RetentionPolicy
) -> None:
    """Under min_free alone, the deletions are the oldest deletable checkpoints, stopping as
    soon as the bytes freed lift free space to min_free; with enough free space, none."""
    rules = policy.local
    if rules.delete_after_upload or rules.min_free is None:
        return
    result = plan(state, policy)
    gone = [d for d in result.decisions if d.where == "local" and d.action == "delete"]
    target = rules.min_free.resolve(state.total_bytes or 0)
    if state.free_bytes is None or state.free_bytes >= target:
        assert gone == []
        return
    eligible = sorted(
        (
            c
            for c in state.local
            if c.state == "aliased"
            and (c.version is not None or rules.allow_offline)
            and c.problem is None
        ),
        key=lambda c: (c.step, c.checkpoint_id),
    )
    older = eligible[: max(0, len(eligible) - rules.keep_last)]
    deletable = [
        c for c in older if not any(protected(a, policy.remote.protect) for a in c.aliases)
    ]
    assert [d.path for d in gone] == [c.path for c in deletable[: len(gone)]]
    assert state.free_bytes + sum(d.size for d in gone[:-1]) < target
    if len(gone) < len(deletable):
        assert state.free_bytes + sum(d.size for d in gone) >= target


@settings(max_examples=400)
@given(states, policies)
def test_plan_is_stable(state: RetentionState, policy: RetentionPolicy) -> None:
    """Carrying a plan out and planning again deletes nothing more."""
    first = plan(state, policy)
    again = plan(apply(state, first), policy)
    assert again.deletions == ()


def version(index: int, step: int | None, *aliases: str, linked: bool = False) -> RemoteVersion:
    return RemoteVersion(f"v{index}", index, step, aliases, 1000, linked)


def remote_policy(**rules: Any) -> RetentionPolicy:
    return RetentionPolicy(RemoteRetention(**rules), LocalRetention(), ALIASES)


def test_keep_every_keeps_the_first_version_of_each_window() -> None:
    """keep_every 20 keeps the lowest step at or after each multiple of 20, beside keep_last."""
    steps = [5, 12, 25, 31, 48, 55]
    versions = tuple(version(i, s) for i, s in enumerate(steps))
    result = plan(RetentionState(versions), remote_policy(keep_last=1, keep_every=20))
    kept = {d.step: d.reason for d in result.decisions if d.action == "keep"}
    assert kept == {
        5: "first at or after step 0 (keep_every 20)",
        25: "first at or after step 20 (keep_every 20)",
        48: "first at or after step 40 (keep_every 20)",
        55: "among the newest 1 by step",
    }


def test_foreign_aliases_keep_a_version_unless_released() -> None:
    """A sidecar's `candidate` keeps its version; `!candidate` in protect releases it, but a
    plain protect entry matching the same alias still wins."""
    versions = (version(0, 1, "candidate"), version(1, 2, "step-2"), version(2, 3, "latest"))
    kept = plan(RetentionState(versions), remote_policy(keep_last=1))
    assert [d.action for d in kept.decisions] == ["keep", "delete", "keep"]
    assert kept.decisions[0].reason == "holds alias 'candidate', which ckptd does not manage"
    released = plan(
        RetentionState(versions), remote_policy(keep_last=1, protect=("latest", "!candidate"))
    )
    assert [d.action for d in released.decisions] == ["delete", "delete", "keep"]
    both = plan(
        RetentionState(versions), remote_policy(keep_last=1, protect=("cand*", "!candidate"))
    )
    assert both.decisions[0].reason == "holds protected alias 'candidate'"


def test_versions_ckptd_did_not_publish_or_linked_are_kept() -> None:
    """A version without ckptd's step metadata, and a version linked to a registry, stay."""
    versions = (version(0, None), version(1, 1, linked=True), version(2, 2), version(3, 3))
    result = plan(RetentionState(versions), remote_policy(keep_last=1))
    assert [(d.action, d.reason) for d in result.decisions] == [
        ("keep", "not published by ckptd (no step in its metadata)"),
        ("keep", "linked to a registry"),
        ("delete", "older than the newest 1 by step"),
        ("keep", "among the newest 1 by step"),
    ]


def test_template_aliases_with_format_specs_are_managed() -> None:
    """`loss-{val_loss:.2f}` renders `loss-0.25`, which ckptd manages; `epoch-2` it does not."""
    policy = remote_policy()
    assert policy.manages("loss-0.25") and policy.manages("step-77") and policy.manages("best-acc")
    assert not policy.manages("epoch-2") and not policy.manages("step-")


def test_offline_state_notes_that_remote_retention_is_skipped() -> None:
    """Without a listing, the plan has no remote decisions and says why in its notes."""
    state = RetentionState(None, remote_note="offline mode: remote retention skipped")
    result = plan(state, remote_policy(keep_last=1))
    assert result.decisions == ()
    assert result.notes == (
        "offline mode: remote retention skipped",
        "local retention is off (no delete_after_upload, no min_free)",
    )


def test_table_has_one_row_per_decision_with_every_column() -> None:
    """The table shows where, version, step, aliases, size, action and reason for each row."""
    versions = (version(0, 10, "step-10"), version(1, 20, "latest", "step-20"))
    table = plan(RetentionState(versions), remote_policy(keep_last=1)).table().splitlines()
    assert table[0].split() == ["WHERE", "VERSION", "STEP", "ALIASES", "SIZE", "ACTION", "REASON"]
    assert table[1].split()[:7] == ["remote", "v0", "10", "step-10", "1000", "B", "delete"]
    assert table[2].split()[:7] == ["remote", "v1", "20", "latest,step-20", "1000", "B", "keep"]
    assert table[2].endswith("holds protected alias 'latest'")


def test_journal_aliases_follow_latest_and_best_holders() -> None:
    """`latest` is on the highest step and a best alias only on its holder; other aliases a
    checkpoint was published with are assumed still held."""
    published = [
        (1, 100, ("latest", "step-100", "best")),
        (2, 200, ("latest", "step-200", "candidate")),
        (3, 300, ("latest", "step-300", "best")),
    ]
    held = journal_aliases(published, {"best": 3})
    assert held == {
        1: ("step-100",),
        2: ("step-200", "candidate"),
        3: ("latest", "step-300", "best"),
    }


def test_format_size_uses_binary_units() -> None:
    """Sizes print as bytes under 1 KiB, else with one decimal in the largest binary unit."""
    assert [format_size(n) for n in (0, 1023, 1536, 3 * MiB, 5 << 40)] == [
        "0 B", "1023 B", "1.5 KiB", "3.0 MiB", "5.0 TiB",
    ]  # fmt: skip
