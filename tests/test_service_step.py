"""The coordinator as a step: `Service.run_once(now)` driven with an injected clock.

Real files in a real watched directory, the in-memory sink, and executors that run each job
inline, so that every test is a sequence of steps at chosen times: no sleeps, no threads
racing the assertions (one test uses real threads on purpose, to watch the pipeline).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any

import pytest

from ckptd.config import Config, load_config
from ckptd.errors import PublishError
from ckptd.service import Pools, Service
from ckptd.sinks import PublishedVersion, PublishRequest
from ckptd.sinks.memory import MemorySink
from tests.conftest import wait_until
from tests.support.checkpoints import renamed_in

T0 = 1_000_000.0  # the test's epoch: far from the files' real mtimes, which settle long before


class InlineExecutor(Executor):
    """Runs each job at once, on the caller's thread."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # the job's own failure, as a pool would keep it
            future.set_exception(exc)
        return future


INLINE = Pools(make=lambda workers, name: InlineExecutor())


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def make_config(tmp_path: Path, extra: str = "") -> Config:
    path = tmp_path / "ckptd.yaml"
    path.write_text(
        f"state_dir: {tmp_path / 'state'}\n"
        "metrics: null\n"
        "upload: {workers: 2, retry: {initial_delay: 10s, max_delay: 60s, give_up_after: 1h}}\n"
        "watch:\n"
        f"  - path: {tmp_path / 'ck'}\n"
        "    artifact: model\n"
        "    observer: polling\n"
        "    poll_interval: 1h\n"  # no watcher events: the rescans below find every file
        "    rescan: 1s\n"
        "    settle: 2s\n"
        "    sidecar: {expect: never}\n"
        "    aliases: {best: [{metric: loss, mode: min, alias: best}]}\n" + extra
    )
    (tmp_path / "ck").mkdir(exist_ok=True)
    return load_config(path)


@pytest.fixture
def sink() -> MemorySink:
    return MemorySink()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def service(tmp_path: Path, sink: MemorySink, clock: Clock) -> Iterator[Service]:
    svc = Service(make_config(tmp_path), lambda config: sink, clock, INLINE)
    svc.start()
    yield svc
    svc.shutdown(drain=False)


def write(tmp_path: Path, step: int, loss: float | None = None) -> Path:
    """`ckpt_<step>.pt`, a zip as torch.save writes, with its sidecar if `loss` is given."""
    metrics = {} if loss is None else {"metrics": {"loss": loss}}
    return renamed_in(tmp_path / "ck", f"ckpt_{step}.pt", f"step {step}".encode(), **metrics)


def steps(service: Service, clock: Clock, seconds: float, every: float = 1.0) -> None:
    """Run the coordinator every `every` seconds of the test clock for `seconds`."""
    end = clock.now + seconds
    while clock.now < end:
        clock.now += every
        service.run_once(clock.now)


def published_steps(sink: MemorySink) -> list[int]:
    return [v.step or -1 for v in sink.versions("model", "model")]


def test_checkpoints_found_together_are_published_in_step_order(
    tmp_path: Path, service: Service, sink: MemorySink, clock: Clock
) -> None:
    """Three checkpoints found in one scan are versions in step order, `latest` on the
    highest; each is published once its files settled, not before."""
    for step in (30, 10, 20):
        write(tmp_path, step)
    service.run_once(clock.now)  # found, not yet settled
    assert sink.calls == []
    steps(service, clock, 8)
    assert published_steps(sink) == [10, 20, 30]
    assert sink.alias_holder("model", "latest") == "v2"
    assert [r.state for r in service.journal.rows()] == ["aliased"] * 3


def test_a_transient_failure_waits_for_its_backoff_then_publishes(
    tmp_path: Path, service: Service, sink: MemorySink, clock: Clock
) -> None:
    """A 503 schedules a retry (attempt 1: 5-10 s with initial_delay 10s); the step says
    when it is due; nothing is tried before, and the retry publishes."""
    sink.fail("submit", PublishError("503 unavailable", transient=True))
    write(tmp_path, 1)
    steps(service, clock, 4)
    (row,) = service.journal.rows()
    assert (row.state, row.attempts) == ("hashed", 1)
    submits = [op for op, _, _ in sink.calls if op == "submit"]
    assert clock.now + 1 <= row.next_attempt_at <= clock.now + 10
    due = service.run_once(clock.now)
    assert due <= row.next_attempt_at
    clock.now = row.next_attempt_at - 0.5
    service.run_once(clock.now)
    assert [op for op, _, _ in sink.calls if op == "submit"] == submits  # not yet
    clock.now = row.next_attempt_at
    service.run_once(clock.now)
    assert published_steps(sink) == [1]


def test_a_permanent_error_parks_the_collection_until_max_delay(
    tmp_path: Path, service: Service, sink: MemorySink, clock: Clock
) -> None:
    """A 403 parks the collection (journal and metric); its queue waits, later checkpoints
    too; after retry.max_delay (60 s) it is unparked and everything publishes in order."""
    sink.fail("submit", PublishError("403 forbidden", transient=False))
    write(tmp_path, 1)
    steps(service, clock, 5)
    assert set(service.journal.parked()) == {"model"}
    assert service.metrics.parked.labels(collection="model")._value.get() == 1
    write(tmp_path, 2)
    steps(service, clock, 30)
    assert published_steps(sink) == []
    assert service.not_ready() == "parked: model"
    steps(service, clock, 35)
    assert service.journal.parked() == {}
    assert published_steps(sink) == [1, 2]


def test_give_up_fails_one_checkpoint_and_the_next_one_goes_on(
    tmp_path: Path, service: Service, sink: MemorySink, clock: Clock
) -> None:
    """A checkpoint failing transiently for longer than give_up_after (1 h) ends `failed`
    with a `gave-up` drop; the collection moves on."""
    sink.fail("submit", PublishError("502 bad gateway", transient=True), times=1000)
    write(tmp_path, 1)
    steps(service, clock, 3700, every=30)
    (row,) = service.journal.rows()
    assert row.state == "failed" and "502" in (row.last_error or "")
    assert [(d.reason, Path(d.path).name) for d in service.journal.drops()] == [
        ("gave-up", "ckpt_1.pt")
    ]
    sink.heal()
    write(tmp_path, 2)
    steps(service, clock, 6)
    assert published_steps(sink) == [2]


def test_a_late_older_step_gets_no_latest_and_latest_goes_back(
    tmp_path: Path, service: Service, sink: MemorySink, clock: Clock
) -> None:
    """Step 5 is published, then step 3 appears: step 3 is a version without `latest` in
    its plan; the sink put `latest` on it, and the publisher moves it back to step 5."""
    write(tmp_path, 5, loss=0.5)
    steps(service, clock, 6)
    write(tmp_path, 3, loss=0.4)
    steps(service, clock, 6)
    assert published_steps(sink) == [5, 3]
    assert sink.alias_holder("model", "latest") == "v0"
    assert sink.alias_holder("model", "best") == "v1"  # 0.4 beats 0.5 whatever the step
    assert ("move_alias", "model", "latest -> v0") in sink.calls


def test_retention_runs_after_a_version_is_in_place(
    tmp_path: Path, sink: MemorySink, clock: Clock
) -> None:
    """keep_last 2: after each version is aliased (never before its commit), retention
    lists and deletes the oldest; the best-holder stays."""
    extra = "    retention: {remote: {keep_last: 2}}\n"
    service = Service(make_config(tmp_path, extra), lambda config: sink, clock, INLINE)
    service.start()
    try:
        for step, loss in ((1, 0.1), (2, 0.5), (3, 0.6), (4, 0.7)):
            write(tmp_path, step, loss)
            steps(service, clock, 6)
        assert [d.target for d in service.journal.deletions()] == ["model:v1"]
    finally:
        service.shutdown(drain=False)
    assert [v.step for v in sink.versions("model", "model")] == [1, 3, 4]  # v0 holds best
    deleted = sink.calls.index(("delete_version", "model", "v1"))
    assert deleted > sink.calls.index(("commit", "model", "step 3"))  # once keep_last was passed


def test_shutdown_drains_what_is_queued(tmp_path: Path, sink: MemorySink, clock: Clock) -> None:
    """Checkpoints journaled but not yet published when shutdown is asked are published
    before it returns; nothing is left for the next start."""
    service = Service(make_config(tmp_path), lambda config: sink, clock, INLINE)
    service.start()
    sink.fail("submit", PublishError("503", transient=True))
    for step in (1, 2):
        write(tmp_path, step)
    steps(service, clock, 4)
    assert published_steps(sink) == []
    clock.now += 20  # past the retry
    service.shutdown(drain=True)
    assert published_steps(sink) == [1, 2]
    assert service.left == []


class GatedSink(MemorySink):
    """Commits only when the test opens the gate of that step."""

    def __init__(self) -> None:
        super().__init__()
        self.gates: dict[int, threading.Event] = {}

    def submit(self, request: PublishRequest) -> Any:
        self.gates.setdefault(request.facts.step, threading.Event())
        return super().submit(request)

    def _commit(self, request: PublishRequest, ticket: int) -> PublishedVersion:
        assert self.gates[request.facts.step].wait(30), "gate never opened"
        return super()._commit(request, ticket)


def test_version_n_plus_1_is_handed_over_while_n_commits(tmp_path: Path, clock: Clock) -> None:
    """With a pipelining sink and real publisher threads, step 2 is submitted while step 1
    is still committing, never a third while two are in flight, and versions are recorded
    in step order."""
    sink = GatedSink()
    service = Service(make_config(tmp_path), lambda config: sink, clock)
    service.start()
    try:
        for step in (1, 2, 3):
            write(tmp_path, step)

        def submitted() -> list[str]:
            clock.now += 1
            service.run_once(clock.now)
            return [detail for op, _, detail in sink.calls if op == "submit"]

        wait_until(lambda: len(submitted()) == 2, 30, "two submits")
        assert not any(op == "commit" for op, _, _ in sink.calls)
        for _ in range(5):
            assert len(submitted()) == 2  # depth 2: step 3 waits
        sink.gates[1].set()
        wait_until(lambda: len(submitted()) == 3, 30, "the third submit")
        sink.gates[2].set()
        sink.gates[3].set()
        wait_until(lambda: len(service.journal.rows(states=("aliased",))) == 3, 30, "3 aliased")
        assert published_steps(sink) == [1, 2, 3]
    finally:
        for gate in sink.gates.values():
            gate.set()
        service.shutdown(drain=False)
