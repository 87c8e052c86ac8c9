"""The drop log: every candidate seen and not published is logged once, counted and kept."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from ckptd.drops import Drop, DropLog
from ckptd.journal import Journal
from ckptd.metrics import Metrics
from tests.conftest import Daemon, ckptd_status
from tests.support.checkpoints import renamed_in
from tests.test_observability import free_port, get, metric


def _count(metrics: Metrics, collection: str, reason: str) -> float:
    value = metrics.registry.get_sample_value(
        "ckptd_checkpoints_dropped_total", {"collection": collection, "reason": reason}
    )
    return value or 0.0


def test_a_drop_is_logged_once_counted_once_and_journaled(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Reporting the same drop again (the detector re-checks every second) adds nothing."""
    metrics = Metrics()
    with Journal(tmp_path / "state") as journal:
        drops = DropLog(journal, metrics)
        drop = Drop("model", tmp_path / "ck" / "empty.pt", "zero-bytes", "0 bytes")
        with caplog.at_level(logging.WARNING, logger="ckptd.drops"):
            drops.record(drop, 10.0)
            drops.record(drop, 11.0)
        assert [r.getMessage() for r in caplog.records] == [
            f"not publishing {drop.path} (zero-bytes, a zero-byte file): 0 bytes"
        ]
        assert _count(metrics, "model", "zero-bytes") == 1
        (kept,) = journal.drops()
        assert (kept.collection, kept.path, kept.reason, kept.at) == (
            "model", str(drop.path), "zero-bytes", 10.0,
        )  # fmt: skip


def test_clearing_a_drop_forgets_it_and_warns_again_next_time(tmp_path: Path) -> None:
    """A candidate queued after all is no longer listed; a later drop of it is news again."""
    metrics = Metrics()
    with Journal(tmp_path / "state") as journal:
        drops = DropLog(journal, metrics)
        drop = Drop("model", tmp_path / "checkpoint-5", "incomplete", "no trainer_state.json")
        drops.record(drop, 1.0)
        drops.clear("model", drop.path)
        assert journal.drops() == []
        drops.record(drop, 2.0)
        assert [d.at for d in journal.drops()] == [2.0]
        assert _count(metrics, "model", "incomplete") == 2


def test_unknown_reasons_are_refused() -> None:
    """A typo in a reason would hide a drop from the status section's grouping."""
    with pytest.raises(ValueError, match="unknown drop reason"):
        Drop("model", Path("x"), "gone")


def test_status_lists_each_drop_with_path_reason_and_time(tmp_path: Path) -> None:
    """`ckptd status` shows the dropped count and names every dropped path with its reason."""
    config = tmp_path / "ckptd.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\nwatch: [{{path: {tmp_path / 'ck'}}}]\n")
    with Journal(tmp_path / "state") as journal:
        journal.record_drop("model-checkpoint", "/ck/a.pt", "zero-bytes", "0 bytes", 1.0)
        journal.record_drop("model-checkpoint", "/ck/b", "unrecognised", "", 2.0)
    result = subprocess.run(
        [sys.executable, "-m", "ckptd", "status", "--config", str(config)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    lines = result.stdout.splitlines()
    assert "0 pending" in lines[0] and "2 dropped" in lines[0]
    assert any(line.startswith("  dropped /ck/a.pt (zero-bytes, ") for line in lines)
    assert any(line.startswith("  dropped /ck/b (unrecognised, ") for line in lines)


def test_the_daemon_names_counts_and_lists_every_drop_reason_of_detection(
    tmp_path: Path, wandb_env: dict[str, str], start_daemon: Callable[..., Daemon]
) -> None:
    """A zero-byte checkpoint, a directory in no known layout, one deleted before it was
    whole and one that never completes: each gets one WARNING naming it, a count under its
    reason in /metrics and a line in `ckptd status`; nothing is published for them, and a
    good checkpoint written after them is."""
    root = tmp_path / "ck"
    root.mkdir()
    port = free_port()
    config = tmp_path / "ckptd.yaml"
    config.write_text(
        f"state_dir: state\nmetrics: {{listen: '127.0.0.1:{port}'}}\n"
        "log: {level: debug}\n"
        "watch: [{path: ck, artifact: model, settle: 1s, incomplete_after: 4s}]\n"
    )
    daemon = start_daemon("--config", str(config), env=wandb_env)
    daemon.wait_for_log("ckptd started")
    gone = root / "ckpt_5.pt"
    gone.write_bytes(b"PK\x03\x04 half written")
    daemon.wait_for_log(f"{gone} is not finished", timeout=10)
    gone.unlink()
    (root / "empty.pt").touch()
    (root / "exported").mkdir()
    (root / "exported" / "weights.bin").write_bytes(b"w" * 1000)
    (root / "torn.pt").write_bytes(b"PK\x03\x04 and never an end record")
    renamed_in(root, "ckpt_100.pt", step=100, metrics={"val_loss": 0.5})
    daemon.wait_for_log("published")
    expected = {
        root / "empty.pt": "zero-bytes",
        root / "exported": "unrecognised",
        root / "torn.pt": "incomplete",
        gone: "vanished",
    }
    for path, reason in expected.items():
        daemon.wait_for_log(f"not publishing {path} ({reason}", timeout=30)
    status = ckptd_status(config, wandb_env)
    _, text = get(f"http://127.0.0.1:{port}/metrics")
    assert daemon.stop() == 0
    log = daemon.log()
    for path, reason in expected.items():
        assert log.count(f"not publishing {path} (") == 1, log
        assert f"  dropped {path} ({reason}, " in status
        assert (
            metric(text, "ckptd_checkpoints_dropped_total", collection="model", reason=reason) == 1
        )
    # Offline, a version counts as published once its record is on disk: after the stop.
    assert "1 logged offline but unconfirmed, 0 pending" in status and "4 dropped" in status
    assert "1 published, 0 pending" in ckptd_status(config, wandb_env)
    published = [line for line in log.splitlines() if "published " in line]
    assert len(published) == 1 and "ckpt_100.pt" in published[0]
