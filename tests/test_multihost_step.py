"""The multi-host state machine step by step, with an injected clock: three hosts' publishers
(each its own journal) over one in-memory parts store and sink, so that timeouts, late hosts
and lost answers are exact and take no time."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckptd.checkpoint import CheckpointInfo, content_digest, stat_files
from ckptd.config import Config, load_config
from ckptd.drops import DropLog
from ckptd.errors import PublishError
from ckptd.journal import Journal, NewRow, Row
from ckptd.metrics import Metrics
from ckptd.multihost import MultiHost
from ckptd.publish import Publisher
from ckptd.sinks.memory import MemorySink
from tests.support.memory_parts import MemoryParts, PartsStore

HOSTS = 3
TIMEOUT = 60.0


class Host:
    """One host: its config (rank), journal and publisher with the multi-host path."""

    def __init__(self, tmp_path: Path, rank: int, store: PartsStore, clock: list[float]) -> None:
        self.root = tmp_path / f"host{rank}"
        (self.root / "ck").mkdir(parents=True)
        config_path = self.root / "ckptd.yaml"
        config_path.write_text(
            "state_dir: state\nwandb: {mode: online}\nmetrics: null\n"
            "upload: {retry: {initial_delay: 1s, max_delay: 5s, give_up_after: 1h}}\n"
            "watch:\n  - path: ck\n    artifact: model\n    format: torch-dcp\n"
            f"    distributed: {{group: job, hosts: {HOSTS}, rank: {rank}, timeout: 60s}}\n"
            "    aliases: {best: [{metric: loss, mode: min, alias: best}]}\n"
        )
        self.config: Config = load_config(config_path, env={})
        self.journal = Journal(self.config.state_dir).open()
        metrics = Metrics()
        self.publisher = Publisher(
            self.config, self.journal, store.sink, metrics, lambda: clock[0],
            DropLog(self.journal, metrics),
        )  # fmt: skip
        self.publisher.multihost = MultiHost(self.publisher, MemoryParts(store))
        self.rank = rank

    def part(self, step: int, loss: float | None = None) -> int:
        """This host's part of `step`, hashed in the journal: its ranks' shards."""
        snap = self.root / "snapshots" / f"step_{step}"
        snap.mkdir(parents=True)
        for rank in (2 * self.rank, 2 * self.rank + 1):
            (snap / f"__{rank}_0.distcp").write_bytes(os.urandom(500))
        files = stat_files(snap)
        metrics = {} if loss is None else {"loss": loss}
        row_id = self.journal.add(
            NewRow(
                collection="model", watch_path=self.config.watch[0].path, relpath=f"step_{step}",
                fingerprint=f"{step}", format="torch-dcp", step=step, files=files,
                info=CheckpointInfo(step=step, metrics=metrics), snapshot=snap,
            ),
            0.0,
        )  # fmt: skip
        assert row_id is not None
        md5s = {
            f.name: base64.b64encode(hashlib.md5((snap / f.name).read_bytes()).digest()).decode()
            for f in files
        }
        self.journal.mark_hashed(row_id, 0.0, md5s=md5s, digest=content_digest(md5s))
        return row_id

    def step(self, row_id: int) -> Row:
        """What the coordinator does when the row is due: hand it to the publisher."""
        outcome = self.publisher.begin(self.journal.get(row_id))
        assert not hasattr(outcome, "pending"), "a multi-host row never goes to the sink alone"
        return self.journal.get(row_id)


@pytest.fixture
def store() -> PartsStore:
    return PartsStore(MemorySink())


@pytest.fixture
def clock() -> list[float]:
    return [1000.0]


@pytest.fixture
def hosts(tmp_path: Path, store: PartsStore, clock: list[float]) -> Iterator[list[Host]]:
    made = [Host(tmp_path, rank, store, clock) for rank in range(HOSTS)]
    yield made
    for host in made:
        host.journal.close()


def test_the_finisher_commits_once_every_part_is_in_and_the_others_follow(
    hosts: list[Host], store: PartsStore
) -> None:
    """Parts land in any order; the finisher commits when the last is recorded (not
    before), with the best alias from a metric only host 1 gave; hosts 1 and 2 publish the
    same version when they read the commit."""
    rows = [host.part(5, loss=0.3 if host.rank == 1 else None) for host in hosts]
    assert hosts[0].step(rows[0]).state == "upserted"  # ranks 1 and 2 are not in yet
    assert hosts[0].journal.get(rows[0]).last_error == "waiting for the parts of ranks 1, 2"
    assert hosts[1].step(rows[1]).state == "upserted"
    assert hosts[2].step(rows[2]).state == "upserted"
    assert store.sink.live("model") == []
    assert hosts[0].step(rows[0]).state == "aliased"
    (version,) = store.sink.live("model")
    assert set(version.files) == {f"__{r}_0.distcp" for r in range(6)}
    assert version.aliases == {"latest", "step-5", "best"}
    assert version.metadata["files"] == {f"__{r}_0.distcp": 500 for r in range(6)}
    for host, row_id in zip(hosts[1:], rows[1:], strict=True):
        row = host.step(row_id)
        assert (row.state, row.version) == ("aliased", "v0")


def test_a_rank_that_never_arrives_is_given_up_after_the_timeout_once(
    hosts: list[Host], store: PartsStore, clock: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    """Rank 2 never writes step 6: the finisher waits `timeout` from its own part, then
    fails the row with one WARNING naming rank 2 and records the step abandoned; host 1
    gives it up as soon as it reads that, and rank 2 arriving late gives it up too. No
    version is committed, and step 7 commits as usual."""
    caplog.set_level(logging.WARNING)
    first, second = hosts[0].part(6), hosts[1].part(6)
    hosts[0].step(first)
    hosts[1].step(second)
    clock[0] += TIMEOUT - 1
    assert hosts[0].step(first).state == "upserted"
    assert hosts[1].step(second).state == "upserted"
    clock[0] += 2
    row = hosts[0].step(first)
    assert row.state == "failed"
    assert row.last_error == (
        "partial: step 6: rank 2 of 3 did not arrive within distributed.timeout (60s); "
        "no version was committed"
    )
    warnings = [r.getMessage() for r in caplog.records if "step 6" in r.getMessage()]
    assert len(warnings) == 1 and "rank 2 of 3 did not arrive" in warnings[0]
    assert [(d.reason, d.path.endswith("step_6")) for d in hosts[0].journal.drops()] == [
        ("partial", True)
    ]
    assert "gave it up: rank 2 of 3" in (hosts[1].step(second).last_error or "")
    late = hosts[2].part(6)
    assert hosts[2].step(late).state == "failed"
    assert store.sink.live("model") == [] and ("finish", 0, 6) not in store.calls
    rows = [host.part(7) for host in hosts]
    for host, row_id in reversed(list(zip(hosts, rows, strict=True))):
        host.step(row_id)
    assert hosts[0].journal.get(rows[0]).state == "aliased"
    assert [v.version for v in store.sink.live("model")] == ["v0"]


def test_a_lost_commit_answer_or_a_repeated_upsert_commits_the_version_once(
    hosts: list[Host], store: PartsStore, clock: list[float]
) -> None:
    """The finisher's commit lands but its answer is lost (as a kill -9 right after the
    commit would leave it): the next try finds the version committed and records it; a host
    whose upsert answer was lost upserts again. One version, every host on it."""
    rows = [host.part(8) for host in hosts]
    store.fail("upsert", PublishError("reset", transient=True), after=True)
    assert hosts[1].step(rows[1]).state == "hashed"  # landed, but it does not know
    assert hosts[1].journal.get(rows[1]).next_attempt_at > clock[0]
    clock[0] += 5
    assert hosts[1].step(rows[1]).state == "upserted"
    hosts[2].step(rows[2])
    store.fail("finish", PublishError("answer lost", transient=True), after=True)
    assert hosts[0].step(rows[0]).state == "upserted"
    assert len(store.sink.live("model")) == 1  # committed, unknown to the finisher
    clock[0] += 5
    assert hosts[0].step(rows[0]).state == "aliased"
    for host, row_id in zip(hosts[1:], rows[1:], strict=True):
        assert host.step(row_id).state == "aliased"
    assert [v.version for v in store.sink.live("model")] == ["v0"]
    assert [c for c in store.calls if c[0] == "upsert" and c[1] == 1] == [("upsert", 1, 8)] * 2
