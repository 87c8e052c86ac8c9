"""Every writer of the corpus against a real Detector, step by step, with an injected clock.

The clock runs ~1000 s ahead of real time, and after each writer step every file the step
created or changed gets that step's (injected) time as its mtime, the way a real write or
rename would stamp it: so the detector's "untouched for `settle`" rule sees exactly the ages
the writer produced, never the real ones.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ckptd.config import WatchConfig
from ckptd.detect import Detector, ReadyCheckpoint
from ckptd.formats import format_for
from tests.support.writers import ALL_SPECS, WRITERS, WriterSpec, WriterStep, rotate

SETTLE = 5.0
GAP = 1.0  # injected seconds between two writer steps: a writer busy saving
PEEK = 0.9  # a second poll this long after each step, well inside the settle window
STEP = 100
T0 = time.time() + 1000

# Intermediate states that only the settle window keeps from being published, because the
# framework writes in place after its last signal: Megatron's tokenizer assets land after
# the tracker, and Orbax's commit-file variant looks like an older Orbax release (which wrote
# no commit_success.txt) until its commit file lands.
SETTLE_PROTECTED = {
    "megatron": [
        "latest_checkpointed_iteration.txt written: '100'",
        "iter_0000100/tokenizer/ created",
        "iter_0000100/tokenizer/tokenizer_config.json written",
    ],
    "orbax/commit-file": ["100/_CHECKPOINT_METADATA rewritten with commit_timestamp_nsecs"],
}

# Layouts whose finished state carries the framework's own commit signal (a rename, a marker
# file, a marker removal, the state file): offered at once, no settle window.
COMMITTED = {"lightning/sharded", "torch-dcp", "orbax", "orbax/commit-file", "nemo", "tensorflow"}


class Run:
    """A Detector on `root`, fed the hints a watcher would give while writers run."""

    def __init__(self, root: Path, fmt: str, gap: float = GAP) -> None:
        root.mkdir(parents=True, exist_ok=True)
        values = {"path": root, "format": fmt, "settle": SETTLE, "sidecar": {"wait": 0}}
        self.detector = Detector(WatchConfig.model_validate(values))
        self.root = self.detector.root
        self.gap = gap
        self.now = T0
        self.offered: list[ReadyCheckpoint] = []
        self.durations: list[float] = []  # injected seconds each writer took
        self._stamped: dict[int, tuple[str, int, int]] = {}

    def write(
        self,
        steps: Iterator[WriterStep],
        after: Callable[[], object] = lambda: None,
        *,
        settle: bool = True,
        pause: tuple[str, float] = ("", 0.0),
    ) -> tuple[list[ReadyCheckpoint], list[ReadyCheckpoint]]:
        """Run a writer; `after` runs right after its last step (a rotation), and the writer
        idles for `pause[1]` seconds (polled throughout) before the step whose description
        starts with `pause[0]`. Returns what was offered while it ran and what was offered
        once it had finished (after the settle window, unless `settle` is False)."""
        early: list[ReadyCheckpoint] = []
        late: list[ReadyCheckpoint] = []
        start = self.now
        for state in steps:
            if pause[0] and state.description.startswith(pause[0]):
                for _ in range(int(pause[1])):
                    self.now += 1.0
                    early += self.poll(self.now)
            self.now += self.gap
            if state.finished:
                after()
            self._stamp()
            path = Path(state.path)
            path = path if path.is_absolute() else self.root / path
            self.detector.hint(path, self.now, moved_in=" renamed to " in state.description)
            self.detector.scan(self.now)
            offers = self.poll(self.now) + self.poll(self.now + min(PEEK, self.gap / 2))
            (late if state.finished else early).extend(offers)
        self.durations.append(self.now - start)
        return early, late + (self.settle() if settle else [])

    def settle(self) -> list[ReadyCheckpoint]:
        """Let the settle window pass (with a rescan) and return what is offered."""
        self.now += SETTLE + 1.1
        self.detector.scan(self.now)
        offers = self.poll(self.now)
        self.now += 3 * SETTLE
        self.detector.scan(self.now)
        return offers + self.poll(self.now)

    def poll(self, now: float) -> list[ReadyCheckpoint]:
        """One detector step; offered checkpoints are taken, as the service takes them."""
        ready = self.detector.poll(now)
        for offer in ready:
            self.detector.mark_done(offer)
        self.offered.extend(ready)
        return ready

    def _stamp(self) -> None:
        """Give every file created, changed or renamed by the last step the step's time."""
        for dirpath, _, filenames in os.walk(self.root.parent):
            for name in filenames:
                path = Path(dirpath) / name
                st = path.lstat()
                if self._stamped.get(st.st_ino) == (name, st.st_mtime_ns, st.st_size):
                    continue
                os.utime(path, (self.now, self.now), follow_symlinks=False)
                st = path.lstat()
                self._stamped[st.st_ino] = (name, st.st_mtime_ns, st.st_size)


def _format(spec: WriterSpec, how: str) -> str:
    """The `format:` to configure: the spec's own, or auto."""
    return spec.format if how == "own" else "auto"


def _expect_one(spec: WriterSpec, run: Run, offers: list[ReadyCheckpoint], step: int) -> None:
    """`offers` is exactly the spec's unit for `step`, with exactly the spec's files."""
    assert len(offers) == 1, [o.relpath for o in offers]
    (ready,) = offers
    assert ready.unit == spec.unit_path(run.root, step)
    assert {f.name for f in ready.files} == spec.files(step)
    assert all((ready.base / f.name).is_file() for f in ready.files)


@pytest.mark.parametrize("how", ["own", "auto"])
@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.id)
def test_offered_once_only_when_finished(spec: WriterSpec, how: str, tmp_path: Path) -> None:
    """Nothing is offered at any intermediate step; the finished unit is offered once, with
    exactly the spec's files."""
    run = Run(tmp_path / "root", _format(spec, how))
    early, late = run.write(spec.steps(run.root, STEP))
    assert early == [], [o.relpath for o in early]
    _expect_one(spec, run, late, STEP)
    assert run.detector.pending() == {}


@pytest.mark.parametrize("how", ["own", "auto"])
@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.id)
def test_second_save_offered_once_only_when_finished(
    spec: WriterSpec, how: str, tmp_path: Path
) -> None:
    """A second save beside a published one (trackers naming the old one, best.keras rewritten
    in place) is offered once when it finishes, and the first is not offered again."""
    run = Run(tmp_path / "root", _format(spec, how))
    _, first = run.write(spec.steps(run.root, STEP))
    _expect_one(spec, run, first, STEP)
    early, late = run.write(spec.steps(run.root, 2 * STEP))
    assert early == [], [o.relpath for o in early]
    _expect_one(spec, run, late, 2 * STEP)


@pytest.mark.parametrize("how", ["own", "auto"])
def test_dcp_resave_into_the_same_directory(how: str, tmp_path: Path) -> None:
    """A DCP re-save into `last/` is not offered while the previous save's `.metadata`
    lingers beside rewritten shards, and is offered once its own `.metadata` lands."""
    spec = WRITERS["torch-dcp"]
    run = Run(tmp_path / "root", _format(spec, how))
    _, first = run.write(spec.steps(run.root, 1, name="last"))
    assert [o.relpath for o in first] == ["last"]
    early, late = run.write(spec.steps(run.root, 2, name="last"))
    assert early == [], [o.relpath for o in early]
    assert [o.relpath for o in late] == ["last"]
    assert late[0].fingerprint != first[0].fingerprint


_ROTATED = {
    "hf-trainer": "checkpoint-*",
    "orbax": "[0-9]*",
    "lightning": "epoch=*.ckpt",
    "torch-dcp": "step_*",
    "keras": "model-*.keras",
}


@pytest.mark.parametrize("gap", [GAP, 0.01], ids=["slow-writer", "fast-writer"])
@pytest.mark.parametrize("how", ["own", "auto"])
@pytest.mark.parametrize("name", sorted(_ROTATED))
def test_rotation_keep_one(name: str, how: str, gap: float, tmp_path: Path) -> None:
    """With `save_total_limit=1`-style rotation right after each save, every checkpoint is
    offered at most once, the newest exactly once, and the others either were offered or
    were deleted before they finished settling, without an error."""
    spec = WRITERS[name]
    run = Run(tmp_path / "root", _format(spec, how), gap=gap)
    steps = (100, 200, 300)
    for step in steps:
        newest = spec.unit_path(run.root, step)
        run.write(
            spec.steps(run.root, step),
            after=lambda newest=newest: rotate(run.root, 1, _ROTATED[name], protect=[newest]),
            settle=False,
        )
    run.settle()
    offered = [o.unit for o in run.offered]
    assert len(offered) == len(set(offered))
    assert offered.count(spec.unit_path(run.root, steps[-1])) == 1
    for step in steps[:-1]:
        unit = spec.unit_path(run.root, step)
        assert unit in offered or not unit.exists()
    assert not spec.unit_path(run.root, steps[0]).exists()
    assert run.detector.pending() == {}
    # Committed and renamed-in checkpoints need no settling, and a save that outlasts the
    # settle window gives the previous one time to settle: then rotation loses nothing.
    if name in {"orbax", "torch-dcp", "lightning"} or min(run.durations) > SETTLE:
        assert len(offered) == len(steps)


@pytest.mark.parametrize("how", ["own", "auto"])
@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.id)
def test_only_known_states_rely_on_the_settle_window(
    spec: WriterSpec, how: str, tmp_path: Path
) -> None:
    """No intermediate state carries a commit signal, and the only intermediate states the
    format's own rules accept (leaving them to the settle window) are the known ones."""
    root = tmp_path / "root"
    root.mkdir()
    fmt = format_for(WatchConfig.model_validate({"path": root, "format": _format(spec, how)}))
    unit = spec.unit_path(root, STEP)
    relying = []
    for state in spec.steps(root, STEP):
        try:
            verdict = fmt.check(unit)
        except FileNotFoundError:
            continue
        if state.finished:
            assert verdict.ready, verdict.reason
            assert verdict.committed == (spec.id in COMMITTED)
        elif verdict.ready:
            assert not verdict.committed, state.description
            relying.append(state.description)
    assert relying == SETTLE_PROTECTED.get(spec.id, [])


@pytest.mark.parametrize("how", ["own", "auto"])
def test_megatron_async_finalize_waits_for_tokenizer_assets(how: str, tmp_path: Path) -> None:
    """When the tracker lands long after the shards (an async save's finalize), the
    tokenizer assets written right after it are still part of the one offer."""
    spec = WRITERS["megatron"]
    run = Run(tmp_path / "root", _format(spec, how))
    tracker = "latest_checkpointed_iteration.txt truncated"
    early, late = run.write(spec.steps(run.root, STEP), pause=(tracker, 3 * SETTLE))
    assert early == [], [sorted(f.name for f in o.files) for o in early]
    _expect_one(spec, run, late, STEP)


@pytest.mark.parametrize("how", ["own", "auto"])
def test_published_unit_seen_mid_deletion_is_not_offered_again(how: str, tmp_path: Path) -> None:
    """A rescan that catches a published Orbax step half deleted by rotation (its commit
    file not yet removed) does not offer the remains as a new checkpoint."""
    spec = WRITERS["orbax"]
    run = Run(tmp_path / "root", _format(spec, how))
    _, first = run.write(spec.steps(run.root, STEP))
    _expect_one(spec, run, first, STEP)
    unit = spec.unit_path(run.root, STEP)
    shutil.rmtree(unit / "state" / "ocdbt.process_0")
    assert run.settle() == []
