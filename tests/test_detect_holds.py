"""Holds, close evidence and drops in the detector, step by step on real files (no sleeps)."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest

from ckptd.config import WatchConfig
from ckptd.detect import Detector, ReadyCheckpoint
from tests.test_detect import T0, set_mtime, zip_bytes


def watch(root: Path, **overrides: object) -> WatchConfig:
    values: dict[str, object] = {"path": root, "settle": 5, "sidecar": {"wait": 30}}
    values.update(overrides)
    return WatchConfig.model_validate(values)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "ck").mkdir()
    return tmp_path / "ck"


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    (tmp_path / "staging").mkdir()
    return tmp_path / "staging"


def write_in_place(detector: Detector, path: Path, data: bytes, now: float) -> None:
    """Write `path` in place the way torch.save does, telling the detector what inotify
    would: written (created), then closed after writing."""
    path.write_bytes(data)
    set_mtime(path, now)
    detector.hint(path, now, written=True)
    detector.hint(path, now, closed=True)


def hf_checkpoint(root: Path, step: int, now: float, detector: Detector | None = None) -> Path:
    """A small Hugging Face Trainer checkpoint written in place, trainer_state.json last."""
    unit = root / f"checkpoint-{step}"
    unit.mkdir()
    tensor = b"\0" * 64
    header = json.dumps({"w": {"dtype": "F32", "shape": [16], "data_offsets": [0, 64]}})
    files = {
        "config.json": b'{"model_type": "gpt2"}',
        "model.safetensors": len(header).to_bytes(8, "little") + header.encode() + tensor,
        "trainer_state.json": json.dumps(
            {"global_step": step, "epoch": 1.0, "log_history": [{"eval_loss": 1.0 / step}]}
        ).encode(),
    }
    for name, data in files.items():
        (unit / name).write_bytes(data)
        set_mtime(unit / name, now)
        if detector is not None:
            detector.hint(unit / name, now, written=True)
            detector.hint(unit / name, now, closed=True)
    return unit


def held_bytes(ready: ReadyCheckpoint) -> dict[str, bytes]:
    assert ready.hold is not None
    return {f.name: (ready.hold.dest / f.name).read_bytes() for f in ready.files}


def test_closed_after_writing_finishes_an_in_place_file_at_once(root: Path, staging: Path) -> None:
    """On inotify's evidence (written, then closed) a whole zip is finished without `settle`."""
    detector = Detector(watch(root), staging)
    path = root / "ckpt_3.pt"
    write_in_place(detector, path, zip_bytes(root.parent), T0)
    (ready,) = detector.poll(T0)
    assert ready.info.step == 3 and ready.hold is not None
    assert held_bytes(ready) == {"ckpt_3.pt": path.read_bytes()}


def test_without_a_close_an_in_place_file_waits_for_settle(root: Path, staging: Path) -> None:
    """The polling observer sends writes but no closes: the settle window decides."""
    detector = Detector(watch(root), staging)
    path = root / "ckpt_4.pt"
    path.write_bytes(zip_bytes(root.parent))
    set_mtime(path, T0)
    detector.hint(path, T0, written=True)
    assert detector.poll(T0) == []
    assert detector.poll(T0 + 4) == []
    (ready,) = detector.poll(T0 + 5.1)
    assert ready.relpath == "ckpt_4.pt"


def test_a_write_after_the_close_withdraws_the_evidence(root: Path, staging: Path) -> None:
    """A file reopened and written again after its close is not finished until it settles."""
    detector = Detector(watch(root), staging)
    path = root / "ckpt_5.pt"
    write_in_place(detector, path, zip_bytes(root.parent), T0)
    detector.hint(path, T0, written=True)
    assert detector.poll(T0) == []


def test_a_file_deleted_before_settle_is_published_from_its_hold(root: Path, staging: Path) -> None:
    """Rotation that deletes a whole file during the settle window loses nothing: the held
    links are judged (unchanged for settle) and published with the bytes that were written."""
    detector = Detector(watch(root), staging)
    path = root / "ckpt_6.pt"
    data = zip_bytes(root.parent, b"six" * 1000)
    path.write_bytes(data)
    set_mtime(path, T0)
    detector.hint(path, T0, written=True)
    assert detector.poll(T0) == []  # whole, held, settling
    assert len(list(staging.iterdir())) == 1
    path.unlink()  # the framework rotates it away
    detector.hint(path, T0 + 1)
    assert detector.poll(T0 + 1) == []
    (ready,) = detector.poll(T0 + 5.1)
    assert held_bytes(ready) == {"ckpt_6.pt": data}


def test_a_trainer_directory_deleted_by_rotation_is_published_whole(
    root: Path, staging: Path
) -> None:
    """save_total_limit's rmtree, seen half way (some files gone) and at the end, never
    turns the hold into a smaller checkpoint: every file of the whole unit is published."""
    detector = Detector(watch(root, format="hf-trainer"), staging)
    unit = hf_checkpoint(root, 10, T0)
    detector.hint(unit / "trainer_state.json", T0, written=True)
    assert detector.poll(T0) == []
    expected = {p.name: p.read_bytes() for p in unit.iterdir()}
    (unit / "config.json").unlink()  # rmtree, half way
    detector.hint(unit / "config.json", T0 + 1)
    assert detector.poll(T0 + 1) == []
    shutil.rmtree(unit)
    detector.hint(unit, T0 + 2)
    assert detector.poll(T0 + 2) == []
    (ready,) = detector.poll(T0 + 5.1)
    assert held_bytes(ready) == expected
    assert ready.info.step == 10 and ready.info.metrics == {"eval_loss": 0.1}


def test_flush_keeps_a_deleted_hold_at_shutdown(root: Path, staging: Path) -> None:
    """At shutdown, a held candidate whose framework deleted it already is handed over."""
    detector = Detector(watch(root), staging)
    path = root / "ckpt_8.pt"
    path.write_bytes(zip_bytes(root.parent))
    set_mtime(path, T0)
    detector.hint(path, T0, written=True)
    assert detector.poll(T0) == []
    path.unlink()
    (ready,) = detector.flush(T0 + 1)
    assert ready.relpath == "ckpt_8.pt" and ready.hold is not None


def test_inconclusive_formats_ignore_close_evidence(root: Path, staging: Path) -> None:
    """Orbax written in place is ready on a commit timestamp alone, but commit_success.txt
    may still follow: closes do not shorten its settle window."""
    detector = Detector(watch(root, format="orbax"), staging)
    unit = root / "100"
    (unit / "state").mkdir(parents=True)
    files = {
        "_CHECKPOINT_METADATA": b'{"commit_timestamp_nsecs": 1}',
        "state/data": b"x" * 100,
    }
    for name, data in files.items():
        (unit / name).write_bytes(data)
        set_mtime(unit / name, T0)
        detector.hint(unit / name, T0, written=True)
        detector.hint(unit / name, T0, closed=True)
    assert detector.poll(T0) == []
    assert "unchanged" in detector.pending()[unit]


def test_a_zero_byte_checkpoint_is_dropped_by_name(root: Path, staging: Path) -> None:
    """An empty `.pt` that stays empty for `settle` is one drop, and is not looked at again
    until it changes."""
    detector = Detector(watch(root), staging)
    path = root / "ckpt_1.pt"
    path.touch()
    detector.hint(path, T0, written=True)
    assert detector.poll(T0) == []
    assert detector.poll(T0 + 5.1) == []
    (drop,) = detector.take_drops()
    assert (drop.path, drop.reason) == (path, "zero-bytes")
    detector.scan(T0 + 10)  # a rescan finds it again, unchanged: no second drop
    assert detector.poll(T0 + 10) == [] and detector.take_drops() == []
    assert path not in detector.pending()


def test_an_unrecognised_directory_of_weights_is_dropped(root: Path, staging: Path) -> None:
    """With `format: auto`, a directory holding checkpoint-like files in no known layout is
    reported once it stays that way, and nothing is published for it."""
    detector = Detector(watch(root, format="auto"), staging)
    weights = root / "exported" / "weights.bin"
    weights.parent.mkdir()
    weights.write_bytes(b"w" * 100)
    detector.hint(weights, T0, written=True)
    assert detector.poll(T0) == []
    assert detector.poll(T0 + 5.1) == []
    (drop,) = detector.take_drops()
    assert (drop.path, drop.reason) == (root / "exported", "unrecognised")
    assert "weights.bin" in drop.detail


def test_the_start_up_scan_finds_unrecognised_directories(root: Path, staging: Path) -> None:
    """Directories written before ckptd started are reported too, not only hinted ones."""
    (root / "exported").mkdir()
    (root / "exported" / "model.safetensors").write_bytes(b"x" * 10)
    (root / "logs").mkdir()
    (root / "logs" / "events.txt").write_text("not a checkpoint")
    detector = Detector(watch(root, format="auto"), staging)
    assert detector.scan(T0) == 1
    assert detector.poll(T0 + 5.1) == []
    assert [d.path for d in detector.take_drops()] == [root / "exported"]


def test_a_checkpoint_that_never_completes_is_dropped_after_incomplete_after(
    root: Path, staging: Path
) -> None:
    """A torn zip (no end record) is reported as incomplete after `incomplete_after`."""
    detector = Detector(watch(root, incomplete_after=60), staging)
    path = root / "ckpt_2.pt"
    path.write_bytes(zip_bytes(root.parent)[:-30])
    detector.hint(path, T0, written=True)
    assert detector.poll(T0) == []
    assert detector.poll(T0 + 59) == [] and detector.take_drops() == []
    detector.hint(path, T0 + 60)
    assert detector.poll(T0 + 60) == []
    (drop,) = detector.take_drops()
    assert drop.reason == "incomplete" and "end" in drop.detail


def test_deleted_before_it_was_whole_is_dropped(root: Path, staging: Path) -> None:
    """A candidate that had files and vanished before its format said it was whole."""
    detector = Detector(watch(root), staging)
    path = root / "ckpt_9.pt"
    path.write_bytes(b"PK\x03\x04partial")
    detector.hint(path, T0, written=True)
    assert detector.poll(T0) == []
    path.unlink()
    detector.hint(path, T0 + 1)
    assert detector.poll(T0 + 1) == []
    (drop,) = detector.take_drops()
    assert (drop.path, drop.reason) == (path, "vanished")
    assert list(Path(root.parent / "staging").iterdir()) == []


def test_a_flood_of_unfinished_candidates_never_starves_a_fresh_one(
    root: Path, staging: Path
) -> None:
    """2,500 files that never finish: a step checks at most 2,000 of them, a freshly hinted
    checkpoint first, and the unchanged ones back off to long intervals."""
    detector = Detector(watch(root, settle=60), staging)
    for i in range(2500):
        (root / f"junk_{i}.pt").write_bytes(b"PK\x03\x04")
    assert detector.scan(T0) == 2500
    good = root / "ckpt_1.pt"
    write_in_place(detector, good, zip_bytes(root.parent), T0)
    (ready,) = detector.poll(T0)
    assert ready.relpath == "ckpt_1.pt"
    detector.mark_done(ready)
    assert detector.next_due() <= T0  # the rest of the flood waits for the next step
    now = T0
    for _ in range(25):
        now = max(now, detector.next_due())
        detector.poll(now)
    for _ in range(3):  # the last step may leave part of the flood due: check it too
        if detector.next_due() <= now:
            detector.poll(now)
    assert now < T0 + 600 and detector.next_due() - now >= 16
    assert len(detector.pending()) == 2500 and detector.take_drops() == []
    for _ in range(3):  # past incomplete_after (600 s by default): each is reported once
        detector.poll(T0 + 600)
    drops = detector.take_drops()
    assert len(drops) == 2500 and {d.reason for d in drops} == {"incomplete"}
    assert detector.pending() == {}


def test_holds_are_released_when_a_candidate_is_forgotten(root: Path, staging: Path) -> None:
    """A hold never outlives its candidate: a rewritten file gets a new hold, the old one goes."""
    detector = Detector(watch(root), staging)
    path = root / "ckpt_7.pt"
    path.write_bytes(zip_bytes(root.parent))
    set_mtime(path, T0)
    detector.hint(path, T0, written=True)
    assert detector.poll(T0) == []
    (first,) = staging.iterdir()
    tmp = root / ".ckpt_7.pt.tmp"
    with zipfile.ZipFile(tmp, "w") as z:
        z.writestr("data.pkl", b"new" * 100)
    os.replace(tmp, path)
    set_mtime(path, T0 + 1)
    detector.hint(path, T0 + 1, written=True)
    assert detector.poll(T0 + 1) == []
    (second,) = staging.iterdir()
    assert second != first
    detector.forget(path)
    assert list(staging.iterdir()) == []
