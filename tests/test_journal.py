"""The journal's state machine, driven with an injected clock; real SQLite files, no sleeps."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from ckptd.checkpoint import CheckpointInfo, FileState
from ckptd.errors import JournalError, StateDirLocked
from ckptd.journal import Journal, NewRow
from ckptd.journal.rows import SCHEMA, SCHEMA_VERSION

FILES = (FileState("ckpt.pt", 10, 1, 2, 3),)


def add(journal: Journal, relpath: str, step: int | None, *, fingerprint: str = "f") -> int | None:
    new = NewRow(
        collection="model", watch_path=Path("/w"), relpath=relpath, fingerprint=fingerprint,
        format="file", step=step, files=FILES, info=CheckpointInfo(step=step),
        snapshot=Path("/s") / relpath,
    )  # fmt: skip
    return journal.add(new, 100.0)


@pytest.fixture
def journal(tmp_path: Path) -> Journal:
    j = Journal(tmp_path / "state").open()
    yield j
    j.close()


def test_happy_path_and_persistence(journal: Journal, tmp_path: Path) -> None:
    """ready -> hashed -> published -> aliased is recorded durably with its fields."""
    row_id = add(journal, "ckpt_1.pt", 1)
    assert row_id is not None
    journal.mark_hashed(row_id, 101.0, md5s={"ckpt.pt": "abc"}, digest="d1")
    journal.mark_published(row_id, 102.0, version="v0", aliases=("latest", "step-1"), best={})
    journal.mark_aliased(row_id, 103.0)
    journal.close()
    reopened = Journal(tmp_path / "state").open()
    row = reopened.get(row_id)
    assert (row.state, row.version, row.aliases, row.md5s) == (
        "aliased", "v0", ("latest", "step-1"), {"ckpt.pt": "abc"},
    )  # fmt: skip
    assert row.updated_at == 103.0 and row.detected_at == 100.0
    reopened.close()


def test_forbidden_transitions_are_refused(journal: Journal) -> None:
    """A row cannot skip states or leave an end state."""
    row_id = add(journal, "ckpt_1.pt", 1)
    assert row_id is not None
    with pytest.raises(JournalError, match="cannot go from ready to published"):
        journal.mark_published(row_id, 1.0, version="v0", aliases=(), best={})
    journal.supersede(row_id, 2.0, "replaced")
    with pytest.raises(JournalError, match="cannot go from superseded to hashed"):
        journal.mark_hashed(row_id, 3.0, md5s={}, digest="d")
    with pytest.raises(JournalError, match="cannot go from superseded to aliased"):
        journal.mark_aliased(row_id, 4.0)


def test_same_checkpoint_is_recorded_once(journal: Journal) -> None:
    """The same files (same fingerprint) are one row; a rewrite is a new row."""
    assert add(journal, "last.pt", 5) is not None
    assert add(journal, "last.pt", 5) is None
    assert journal.known("model", Path("/w"), "last.pt", "f")
    assert add(journal, "last.pt", 5, fingerprint="g") is not None


def test_missing_step_takes_detection_order(journal: Journal) -> None:
    """Without a step, a checkpoint gets the next one after the collection's highest."""
    add(journal, "a.pt", 7)
    row_id = add(journal, "b.pt", None)
    assert row_id is not None and journal.get(row_id).step == 8


def test_rows_come_in_step_order(journal: Journal) -> None:
    """Queued rows are listed lowest step first, whatever the detection order."""
    for step in (30, 10, 20):
        add(journal, f"ckpt_{step}.pt", step)
    assert [r.step for r in journal.rows(states=("ready",))] == [10, 20, 30]


def test_second_daemon_cannot_open_the_state_dir(journal: Journal, tmp_path: Path) -> None:
    """Two daemons on one state_dir would publish twice: the second is refused."""
    with pytest.raises(StateDirLocked, match="in use by ckptd pid"):
        Journal(tmp_path / "state").open()
    reader = Journal(tmp_path / "state").open(exclusive=False)  # `ckptd status` still reads
    assert reader.rows() == []
    reader.close()


def test_a_reader_opened_for_with_stays_a_reader(journal: Journal, tmp_path: Path) -> None:
    """`with Journal(d).open(exclusive=False)` does not take the state_dir lock in
    `__enter__` (the daemon holds it), and `with Journal(d)` still does."""
    with Journal(tmp_path / "state").open(exclusive=False) as reader:
        assert reader.rows() == []
    journal.close()
    with Journal(tmp_path / "state") as writer:
        with pytest.raises(StateDirLocked):
            Journal(tmp_path / "state").open()
        assert writer.is_open


def test_retry_later_keeps_the_state_and_records_why(journal: Journal) -> None:
    """A retry is bookkeeping on the row, not a state change."""
    row_id = add(journal, "ckpt_1.pt", 1)
    assert row_id is not None
    journal.retry_later(row_id, 5.0, at=35.0, error="cannot read", attempts=2)
    row = journal.get(row_id)
    assert (row.state, row.next_attempt_at, row.last_error, row.attempts) == (
        "ready", 35.0, "cannot read", 2,
    )  # fmt: skip
    journal.mark_hashed(row_id, 40.0, md5s={"ckpt.pt": "abc"}, digest="d1")
    row = journal.get(row_id)
    assert (row.attempts, row.next_attempt_at, row.last_error) == (0, 0, None)


def test_best_and_parked_tables(journal: Journal) -> None:
    """Best-so-far values and parked collections survive in the journal."""
    for step in (1, 2):
        row_id = add(journal, f"ckpt_{step}.pt", step)
        assert row_id is not None
        journal.mark_hashed(row_id, 1.0, md5s={}, digest=f"d{step}")
        journal.mark_published(row_id, 2.0, version=f"v{step}", aliases=("best",),
                               best={"best": {1: 0.5, 2: 0.4}[step]})  # fmt: skip
    assert journal.best("model") == {"best": (2, 0.4)}
    journal.park("model", "401 unauthorized", 10.0)
    assert journal.parked() == {"model": ("401 unauthorized", 10.0)}
    journal.unpark("model")
    assert journal.parked() == {}


def test_read_only_state_dir_is_a_clear_error(tmp_path: Path) -> None:
    """A state_dir that cannot be created is reported with its path."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(JournalError, match=str(blocker)):
        Journal(blocker / "state").open()


def test_version_1_journal_upgrades_and_offline_publishes_start_unconfirmed(
    tmp_path: Path,
) -> None:
    """A journal written before schema version 2 opens with its published rows durable; a
    row published with durable=False is listed unconfirmed until `confirm`."""
    state = tmp_path / "state"
    state.mkdir()
    db = sqlite3.connect(state / "journal.sqlite3")
    db.executescript(SCHEMA)
    db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    db.execute(
        "INSERT INTO checkpoints (collection, watch_path, relpath, fingerprint, format, step, "
        "state, files, info, detected_at, updated_at) VALUES ('model', '/w', 'old.pt', 'f', "
        "'file', 0, 'aliased', '[]', '{}', 1, 1)"
    )
    db.commit()
    db.close()
    journal = Journal(state).open()
    try:
        (old,) = journal.rows()
        assert old.durable and journal.unconfirmed() == []
        row_id = add(journal, "ckpt_1.pt", 1)
        assert row_id is not None
        journal.mark_hashed(row_id, 101.0, md5s={"ckpt.pt": "abc"}, digest="d1")
        journal.mark_published(row_id, 102.0, version=None, aliases=(), best={}, durable=False)
        journal.mark_aliased(row_id, 103.0)
        assert [r.id for r in journal.unconfirmed()] == [row_id]
        journal.confirm(row_id, 104.0)
        assert journal.unconfirmed() == [] and journal.get(row_id).durable
    finally:
        journal.close()
    check = sqlite3.connect(state / "journal.sqlite3")
    assert check.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (
        str(SCHEMA_VERSION),
    )
    check.close()


def test_a_journal_written_by_a_newer_ckptd_is_refused_and_left_alone(tmp_path: Path) -> None:
    """Downgrading ckptd must not run an old schema over a newer journal: opening it fails
    naming the file and the versions, and the journal is unchanged."""
    import sqlite3

    from ckptd.errors import NewerJournal
    from ckptd.journal.rows import SCHEMA_VERSION

    with Journal(tmp_path / "state"):
        pass
    path = tmp_path / "state" / "journal.sqlite3"
    db = sqlite3.connect(path)
    newer = str(SCHEMA_VERSION + 1)
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (newer,))
    db.commit()
    db.close()
    with pytest.raises(NewerJournal, match=f"{path}: the journal was written by a newer ckptd"):
        Journal(tmp_path / "state").open()
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (newer,)
    db.close()
