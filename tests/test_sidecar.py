"""Sidecars: the training-side helper, the parser, and one clear log line per bad sidecar
while the checkpoint is still published."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from ckptd import sidecar
from ckptd.config import WatchConfig
from ckptd.detect import Detector
from ckptd.errors import SidecarError

T0 = time.time() + 1000


def test_write_is_atomic_and_reads_back(tmp_path: Path) -> None:
    """write() leaves exactly one file, no temp residue, and read() returns its content."""
    ckpt = tmp_path / "ckpt_5.pt"
    path = sidecar.write(ckpt, step=5, epoch=1.5, metrics={"val_loss": 0.25},
                         aliases=["candidate"], metadata={"lr": 0.1}, run_path="e/p/r",
                         description="nightly")  # fmt: skip
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt_5.pt.metrics.json"]
    found = sidecar.read(ckpt)
    assert found is not None and found[1] == path
    assert found[0] == {
        "step": 5, "epoch": 1.5, "metrics": {"val_loss": 0.25}, "aliases": ["candidate"],
        "metadata": {"lr": 0.1}, "run_path": "e/p/r", "description": "nightly", "ignored": [],
    }  # fmt: skip


def test_helper_imports_nothing_heavy() -> None:
    """`import ckptd.sidecar` in a training process pulls in no third-party package."""
    code = (
        "import sys; import ckptd.sidecar; "
        "heavy = {'pydantic', 'wandb', 'watchdog', 'yaml', 'tenacity', 'prometheus_client'}; "
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_flat_form_is_step_plus_metrics(tmp_path: Path) -> None:
    """`{"step": 500, "val_loss": 0.2}` reads as step 500 with metric val_loss."""
    data = sidecar.parse(b'{"step": 500, "val_loss": 0.2, "acc": 0.9}', tmp_path / "s.json")
    assert data["step"] == 500 and data["metrics"] == {"val_loss": 0.2, "acc": 0.9}


def test_lookup_order(tmp_path: Path) -> None:
    """`<name>.metrics.json` wins over `<stem>.metrics.json`; directories read metrics.json."""
    ckpt = tmp_path / "ckpt_1.pt"
    (tmp_path / "ckpt_1.metrics.json").write_text('{"step": 2}')
    found = sidecar.read(ckpt)
    assert found is not None and found[0]["step"] == 2
    (tmp_path / "ckpt_1.pt.metrics.json").write_text('{"step": 3}')
    found = sidecar.read(ckpt)
    assert found is not None and found[0]["step"] == 3
    directory = tmp_path / "checkpoint-9"
    directory.mkdir()
    (directory / "metrics.json").write_text('{"step": 9}')
    found = sidecar.read(directory)
    assert found is not None and found[0]["step"] == 9


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"{oops", "not valid JSON"),
        (b"[1, 2]", "expected a JSON object, got list"),
        (b'{"step": "five"}', "'step' must be a whole number"),
        (b'{"step": 1.5}', "'step' must be a whole number"),
        (b'{"step": -1}', "'step' cannot be negative"),
        (b'{"epoch": "one"}', "'epoch' must be a number"),
        (b'{"metrics": [1]}', "'metrics' must be an object"),
        (b'{"aliases": "best"}', "'aliases' must be a list of strings"),
        (b'{"metadata": 3}', "'metadata' must be an object"),
        (b'{"run_path": 7}', "'run_path' must be a string"),
        (b"\xff\xfe", "not valid JSON"),
    ],
)
def test_bad_sidecars_name_the_file_and_the_problem(
    tmp_path: Path, body: bytes, problem: str
) -> None:
    """Each malformed sidecar raises SidecarError naming the file and what is wrong."""
    path = tmp_path / "ckpt.pt.metrics.json"
    with pytest.raises(SidecarError) as info:
        sidecar.parse(body, path)
    assert str(info.value).startswith(f"{path}: ") and problem in str(info.value)


# -- through the detector: one log line each, and the checkpoint still goes ahead ----------


def finished_checkpoint(root: Path, name: str = "ckpt_3.pt") -> Path:
    path = root / name
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("w", b"x" * 1000)
    os.utime(path, (T0 - 60, T0 - 60))
    return path


def detector(root: Path, expect: str = "auto") -> Detector:
    sidecar_config = {"wait": 30, "expect": expect}
    return Detector(
        WatchConfig.model_validate({"path": root, "settle": 5, "sidecar": sidecar_config})
    )


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize(
    "body",
    [
        b"{oops",
        b'"a string"',
        b'{"step": "three"}',
        b'{"metrics": {"val_loss": 0.1}, "aliases": [1]}',
        b'{"step": 3, "metrics": {}, "pad": "' + b"x" * (sidecar.MAX_SIDECAR_BYTES + 10) + b'"}',
    ],
    ids=["not-json", "not-an-object", "wrong-type", "wrong-alias-type", "huge"],
)
def test_bad_sidecar_gives_one_line_and_the_checkpoint_goes_ahead(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, body: bytes
) -> None:
    """A bad sidecar is reported once, naming it, however often the detector looks; the
    checkpoint is offered with the step from its name."""
    finished_checkpoint(tmp_path)
    bad = tmp_path / "ckpt_3.pt.metrics.json"
    bad.write_bytes(body)
    d = detector(tmp_path)
    d.scan(T0)
    (ready,) = d.poll(T0)
    assert ready.info.step == 3 and ready.info.metrics == {}
    d.hint(bad, T0 + 1)  # the same bad file seen again (a rescan, an event)
    d.scan(T0 + 1)
    d.poll(T0 + 1)
    lines = warnings(caplog)
    assert len(lines) == 1 and str(bad) in lines[0], lines


def test_sidecar_arriving_late_within_the_wait_is_used(tmp_path: Path) -> None:
    """Where a sidecar is expected, one written after the checkpoint, inside sidecar.wait,
    supplies its metrics."""
    ckpt = finished_checkpoint(tmp_path)
    d = detector(tmp_path, expect="always")
    d.scan(T0)
    assert d.poll(T0) == []
    path = sidecar.write(ckpt, step=300, metrics={"val_loss": 0.5})
    d.hint(path, T0 + 10)
    (ready,) = d.poll(T0 + 10)
    assert ready.info.step == 300 and ready.info.metrics == {"val_loss": 0.5}


def test_sidecar_arriving_never_is_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An expected sidecar that never arrives within sidecar.wait: one line names the
    checkpoint and the step used."""
    caplog.set_level(logging.INFO)
    ckpt = finished_checkpoint(tmp_path)
    d = detector(tmp_path, expect="always")
    d.scan(T0)
    assert d.poll(T0) == []
    (ready,) = d.poll(T0 + 31)
    assert ready.info.step == 3
    lines = [r.getMessage() for r in caplog.records if "no sidecar" in r.getMessage()]
    assert len(lines) == 1 and str(ckpt) in lines[0] and "step 3" in lines[0]


def test_sidecar_arriving_after_the_wait_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A sidecar that lands after its checkpoint was queued without it is named in one
    warning saying its metrics were not applied."""
    ckpt = finished_checkpoint(tmp_path)
    d = detector(tmp_path)
    d.scan(T0)
    d.poll(T0)
    (ready,) = d.poll(T0 + 31)
    d.mark_done(ready)
    late = sidecar.write(ckpt, step=3, metrics={"val_loss": 0.5})
    d.hint(late, T0 + 40)
    d.hint(late, T0 + 41)
    lines = warnings(caplog)
    assert len(lines) == 1 and str(late) in lines[0] and "not applied" in lines[0]
    assert json.loads(late.read_text())["step"] == 3


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_write_honours_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    """The helper's sidecar gets the mode any file the job writes gets (0644 under 022),
    not mkstemp's 0600, so a daemon running as another user can read it."""
    previous = os.umask(umask)
    try:
        written = sidecar.write(tmp_path / "ckpt_1.pt", step=1, metrics={"val_loss": 0.5})
    finally:
        os.umask(previous)
    assert stat.S_IMODE(written.stat().st_mode) == mode


def test_the_helper_works_copied_alone_into_a_training_environment(tmp_path: Path) -> None:
    """A training environment that must not install ckptd (nor its pinned wandb) can copy
    ckptd/sidecar.py beside its script: `write` needs nothing but the standard library."""
    import shutil
    import subprocess
    import sys

    import ckptd.sidecar

    job = tmp_path / "job"
    job.mkdir()
    shutil.copy(ckptd.sidecar.__file__, job / "ckptd_sidecar.py")
    script = (
        "import sys; sys.modules['ckptd'] = None  # ckptd is not installed here\n"
        "import ckptd_sidecar\n"
        "ckptd_sidecar.write('ckpt_7.pt', step=7, metrics={'val_loss': 0.5})\n"
    )
    subprocess.run([sys.executable, "-E", "-s", "-c", script], cwd=job, check=True, timeout=60)
    assert json.loads((job / "ckpt_7.pt.metrics.json").read_text()) == {
        "step": 7,
        "metrics": {"val_loss": 0.5},
    }
