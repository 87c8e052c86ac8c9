"""The detector, driven step by step with an injected clock on real files (no sleeps)."""

from __future__ import annotations

import os
import time
import zipfile
from pathlib import Path

import pytest

from ckptd import sidecar
from ckptd.config import WatchConfig
from ckptd.detect import Detector

# The injected clock runs 1000 s ahead of the real one, so that the files' real ctimes are
# old news and each test sets the age that matters through mtime.
T0 = time.time() + 1000


def watch(root: Path, **overrides: object) -> WatchConfig:
    values: dict[str, object] = {"path": root, "settle": 5, "sidecar": {"wait": 0}}
    values.update(overrides)
    return WatchConfig.model_validate(values)


def zip_bytes(tmp: Path, payload: bytes = b"x" * 4000) -> bytes:
    path = tmp / "z.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("data.pkl", payload)
    data = path.read_bytes()
    path.unlink()
    return data


def set_mtime(path: Path, when: float) -> None:
    os.utime(path, (when, when))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "ck").mkdir()
    return tmp_path / "ck"


def test_renamed_in_file_is_ready_at_once(root: Path, tmp_path: Path) -> None:
    """A complete file renamed into place is finished without waiting for the settle window."""
    detector = Detector(watch(root))
    tmp = root / ".ckpt_1.pt.tmp"
    tmp.write_bytes(zip_bytes(tmp_path))
    detector.hint(tmp, T0)
    assert detector.poll(T0) == []
    tmp.rename(root / "ckpt_1.pt")
    set_mtime(root / "ckpt_1.pt", T0)
    detector.hint(root / "ckpt_1.pt", T0, moved_in=True)
    (ready,) = detector.poll(T0)
    assert ready.relpath == "ckpt_1.pt" and ready.info.step == 1


def test_in_place_write_waits_for_settle(root: Path, tmp_path: Path) -> None:
    """A file written in place is finished only after it stayed unchanged for `settle`."""
    detector = Detector(watch(root))
    path = root / "model.pt"
    data = zip_bytes(tmp_path)
    path.write_bytes(data[:100])  # torn: no zip end record yet
    set_mtime(path, T0)
    detector.hint(path, T0)
    assert detector.poll(T0) == []
    assert "end" in detector.pending()[path]
    path.write_bytes(data)
    set_mtime(path, T0 + 1)
    detector.hint(path, T0 + 1)
    assert detector.poll(T0 + 1) == []  # complete but not settled
    assert detector.poll(T0 + 5.9) == []
    (ready,) = detector.poll(T0 + 7)  # rechecks come at most a second apart
    assert ready.unit == path


def test_rewrite_after_rename_falls_back_to_settle(root: Path, tmp_path: Path) -> None:
    """A write event after the rename withdraws the rename's commit signal."""
    detector = Detector(watch(root))
    path = root / "ckpt_2.pt"
    path.write_bytes(zip_bytes(tmp_path))
    set_mtime(path, T0)
    detector.hint(path, T0, moved_in=True)
    detector.hint(path, T0, written=True)  # a later write to the same file
    assert detector.poll(T0) == []


def test_temp_and_sidecar_names_are_never_candidates(root: Path, tmp_path: Path) -> None:
    """Temp, hidden, partial and sidecar names are ignored by hints and scans."""
    detector = Detector(watch(root))
    names = [".hidden.pt", "a.pt.tmp", "b.pt.partial", "c.pt~", "d.pt.metrics.json", "notes.txt"]
    for name in names:
        (root / name).write_bytes(zip_bytes(tmp_path))
        detector.hint(root / name, T0)
    assert detector.scan(T0) == 0
    assert detector.poll(T0 + 100) == []


def test_scan_finds_old_files_and_they_are_settled(root: Path, tmp_path: Path) -> None:
    """Checkpoints written before start-up (mtime older than settle) are ready on the scan."""
    detector = Detector(watch(root))
    for step in (3, 1, 2):
        path = root / f"ckpt_{step}.pt"
        path.write_bytes(zip_bytes(tmp_path))
        set_mtime(path, T0 - 60)
    assert detector.scan(T0) == 3
    ready = detector.poll(T0)
    assert sorted(r.info.step for r in ready) == [1, 2, 3]


def test_sidecar_is_waited_for_then_read(root: Path, tmp_path: Path) -> None:
    """With `sidecar.expect: always`, a finished checkpoint waits up to sidecar.wait for its
    metrics, then uses them."""
    detector = Detector(watch(root, sidecar={"wait": 30, "expect": "always"}))
    path = root / "ckpt_7.pt"
    path.write_bytes(zip_bytes(tmp_path))
    set_mtime(path, T0 - 60)
    detector.scan(T0)
    assert detector.poll(T0) == []
    assert "sidecar" in detector.pending()[path]
    sidecar.write(path, step=700, metrics={"val_loss": 0.25}, aliases=["candidate"])
    detector.hint(path.with_name(path.name + ".metrics.json"), T0 + 1)
    (ready,) = detector.poll(T0 + 1)
    assert ready.info.step == 700
    assert ready.info.metrics == {"val_loss": 0.25}
    assert ready.info.aliases == ("candidate",)


def test_sidecar_never_arriving_publishes_without_metrics(root: Path, tmp_path: Path) -> None:
    """After sidecar.wait the checkpoint goes ahead with what its name says."""
    detector = Detector(watch(root, sidecar={"wait": 30, "expect": "always"}))
    path = root / "ckpt_9.pt"
    path.write_bytes(zip_bytes(tmp_path))
    set_mtime(path, T0 - 60)
    detector.scan(T0)
    assert detector.poll(T0) == []
    assert detector.poll(T0 + 29) == []
    (ready,) = detector.poll(T0 + 30.5)
    assert ready.info.step == 9 and ready.info.metrics == {}


def test_no_sidecar_wait_where_none_is_expected(root: Path, tmp_path: Path) -> None:
    """`expect: auto`: an entry that never had a sidecar, whose names give the step, does
    not wait for one; once a sidecar shows up, later checkpoints wait for theirs."""
    detector = Detector(watch(root, sidecar={"wait": 30}))
    first = root / "ckpt_1.pt"
    first.write_bytes(zip_bytes(tmp_path))
    set_mtime(first, T0 - 60)
    detector.scan(T0)
    (ready,) = detector.poll(T0)
    assert ready.info.step == 1
    detector.mark_done(ready)
    sidecar.write(root / "ckpt_0.pt", step=0, metrics={"val_loss": 1.0})
    detector.hint(root / "ckpt_0.pt.metrics.json", T0 + 1)
    second = root / "ckpt_2.pt"
    second.write_bytes(zip_bytes(tmp_path))
    set_mtime(second, T0 - 60)
    detector.hint(second, T0 + 1, moved_in=True)
    assert detector.poll(T0 + 1) == []
    assert "sidecar" in detector.pending()[second]


def test_a_name_without_a_step_waits_for_its_sidecar(root: Path, tmp_path: Path) -> None:
    """`expect: auto` waits where nothing but a sidecar can give the step (`last.pt`)."""
    detector = Detector(watch(root, sidecar={"wait": 30}))
    path = root / "last.pt"
    path.write_bytes(zip_bytes(tmp_path))
    set_mtime(path, T0 - 60)
    detector.scan(T0)
    assert detector.poll(T0) == []
    sidecar.write(path, step=40, metrics={})
    detector.hint(path.with_name("last.pt.metrics.json"), T0 + 1)
    (ready,) = detector.poll(T0 + 1)
    assert ready.info.step == 40


def test_malformed_sidecar_is_logged_with_its_path(
    root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A broken sidecar gives one warning naming the file; the checkpoint still goes ahead."""
    detector = Detector(watch(root, sidecar={"wait": 30}))
    path = root / "ckpt_4.pt"
    path.write_bytes(zip_bytes(tmp_path))
    set_mtime(path, T0 - 60)
    bad = root / "ckpt_4.pt.metrics.json"
    bad.write_text("{not json")
    detector.scan(T0)
    (ready,) = detector.poll(T0)
    assert ready.info.step == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and str(bad) in warnings[0] and "JSON" in warnings[0]


def test_symlink_leaving_the_root_is_refused(
    root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A symlinked checkpoint pointing outside the watched root is refused, naming both."""
    outside = tmp_path / "elsewhere.pt"
    outside.write_bytes(zip_bytes(tmp_path))
    (root / "last.pt").symlink_to(outside)
    detector = Detector(watch(root))
    detector.scan(T0)
    assert detector.poll(T0 + 100) == []
    assert any("outside the watched root" in r.getMessage() and "last.pt" in r.getMessage()
               for r in caplog.records)  # fmt: skip


def test_symlink_inside_the_root_publishes_the_target_once(root: Path, tmp_path: Path) -> None:
    """`last.pt -> ckpt_5.pt` yields only the target as a checkpoint."""
    target = root / "ckpt_5.pt"
    target.write_bytes(zip_bytes(tmp_path))
    set_mtime(target, T0 - 60)
    (root / "last.pt").symlink_to("ckpt_5.pt")
    detector = Detector(watch(root))
    detector.scan(T0)
    assert [r.relpath for r in detector.poll(T0)] == ["ckpt_5.pt"]


def test_done_unit_is_ignored_until_it_changes(root: Path, tmp_path: Path) -> None:
    """After mark_done the same files are not offered again; a rewrite is."""
    detector = Detector(watch(root))
    path = root / "last.pt"
    path.write_bytes(zip_bytes(tmp_path))
    set_mtime(path, T0 - 60)
    detector.scan(T0)
    (ready,) = detector.poll(T0)
    detector.mark_done(ready)
    detector.scan(T0 + 1)
    assert detector.poll(T0 + 1) == []
    path.write_bytes(zip_bytes(tmp_path, b"y" * 4000))
    set_mtime(path, T0 - 30)
    detector.scan(T0 + 2)
    assert [r.relpath for r in detector.poll(T0 + 2)] == ["last.pt"]


def test_remembered_checkpoints_are_not_read_again_until_they_change(
    root: Path, tmp_path: Path
) -> None:
    """What the journal already holds (seeded at start-up) costs a stat, not a structural
    check or a sidecar read; a rewritten file is checked and offered again."""
    first = Detector(watch(root, format="auto"))
    for step in (1, 2):
        path = root / f"ckpt_{step}.pt"
        path.write_bytes(zip_bytes(tmp_path, bytes([step]) * 4000))
        set_mtime(path, T0 - 60)
    first.scan(T0)
    recorded = {r.relpath: r.files for r in first.poll(T0)}
    assert sorted(recorded) == ["ckpt_1.pt", "ckpt_2.pt"]

    restarted = Detector(watch(root, format="auto"))
    for relpath, files in recorded.items():
        restarted.remember(relpath, files)
    checked: list[Path] = []
    check = restarted.fmt.check

    def counting_check(unit: Path) -> object:
        checked.append(unit)
        return check(unit)

    restarted.fmt.check = counting_check  # type: ignore[method-assign,assignment]
    restarted.scan(T0)
    assert restarted.poll(T0) == [] and checked == [] and restarted.pending() == {}

    (root / "ckpt_2.pt").write_bytes(zip_bytes(tmp_path, b"z" * 4000))
    set_mtime(root / "ckpt_2.pt", T0 - 30)
    restarted.scan(T0 + 1)
    assert [r.relpath for r in restarted.poll(T0 + 1)] == ["ckpt_2.pt"]
    assert checked == [root / "ckpt_2.pt"]


def test_vanished_candidate_is_dropped(root: Path, tmp_path: Path) -> None:
    """A candidate deleted before it finished (rotation) is forgotten without an error."""
    detector = Detector(watch(root))
    path = root / "ckpt_1.pt"
    path.write_bytes(b"PK partial")
    detector.hint(path, T0)
    path.unlink()
    assert detector.poll(T0) == []
    assert detector.pending() == {}
