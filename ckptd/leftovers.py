"""What a stopping ckptd has not published, one line per checkpoint with the reason.

`left_for_next_start` is what the journal still holds to publish (the daemon's last log line
names it); `failures` is what will not be published without help (failed rows, parked
collections, and checkpoints dropped with a loss during this run). A batch run
(`--once`, `--until-file`) exits 1 naming both.
"""

from __future__ import annotations

from ckptd.drops import LOSSES, REASONS
from ckptd.journal import Journal, Row

__all__ = ["failures", "left_for_next_start"]


def left_for_next_start(journal: Journal) -> list[str]:
    """Each queued or unconfirmed checkpoint, with why it is not published yet."""
    queued = journal.rows(states=("ready", "hashed", "upserted", "published"))
    lines = [f"{_name(r)}: {_why_queued(r)}" for r in queued]
    lines += [
        f"{_name(r)}: logged offline, but W&B has not written its record yet"
        for r in journal.unconfirmed()
        if r.state != "published"
    ]
    return lines


def failures(journal: Journal, since: float) -> list[str]:
    """Failed rows, parked collections and losses recorded at or after `since`."""
    lines = [f"{_name(r)}: failed: {r.last_error}" for r in journal.rows(states=("failed",))]
    lines += [f"{c} is parked: {reason}" for c, (reason, _) in journal.parked().items()]
    lines += [
        f"{d.path} ({d.collection}): dropped, {REASONS[d.reason]}"
        + (f": {d.detail}" if d.detail else "")
        for d in journal.drops(since=since)
        if d.reason in LOSSES
    ]
    return lines


def _name(row: Row) -> str:
    return f"{row.source} (step {row.step})"


def _why_queued(row: Row) -> str:
    if row.state == "published":
        return "published, its aliases and snapshot not yet settled"
    if row.state == "upserted":
        return "this host's part is in W&B; its version is not committed yet"
    what = "not hashed yet" if row.state == "ready" else "not published yet"
    return f"{what}; last error: {row.last_error}" if row.last_error else what
