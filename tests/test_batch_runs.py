"""Batch runs end: `--once` (and `--until-file`) exit within `--deadline`, naming what is
left, and a later start publishes it."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

from ckptd import leftovers
from ckptd.journal import Journal
from tests.conftest import Daemon
from tests.support.checkpoints import renamed_in
from tests.support.fake_wandb import FakeWandbServer

CONFIG = """\
state_dir: state
wandb: {{mode: online, project: batch, base_url: "{url}"}}
metrics: {{listen: null}}
upload: {{retry: {{initial_delay: 200ms, max_delay: 1s}}}}
watch:
  - path: ck
    artifact: model
    settle: 500ms
    sidecar: {{wait: 2s}}
"""


def unused_port() -> int:
    """A loopback port that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_once_against_an_unreachable_server_exits_1_by_the_deadline_and_resumes_later(
    tmp_path: Path,
    wandb_server: FakeWandbServer,
    online_env: dict[str, str],
    start_daemon: Callable[..., Daemon],
) -> None:
    """`--once --deadline 8s` with base_url at a port nobody listens on exits 1 soon after the
    deadline, with one line naming each pending checkpoint; the next `--once`, with the
    server reachable, publishes both and exits 0."""
    (tmp_path / "ck").mkdir()
    for step in (1, 2):
        renamed_in(tmp_path / "ck", f"ckpt_{step}.pt", 3000, step=step, metrics={"loss": 1.0})
    config = tmp_path / "ckptd.yaml"
    config.write_text(CONFIG.format(url=f"http://127.0.0.1:{unused_port()}"))
    began = time.monotonic()
    daemon = start_daemon("--config", str(config), "--once", "--deadline", "8s", env=online_env)
    assert daemon.proc.wait(60) == 1, daemon.log()
    took = time.monotonic() - began
    assert took < 8 + 15, f"exited {took:.1f}s after start"  # start-up, then the deadline
    lines = [line for line in daemon.log().splitlines() if "not published:" in line]
    assert len(lines) == 2, daemon.log()
    for step, line in zip((1, 2), lines, strict=True):
        assert f"ckpt_{step}.pt (step {step}): not published yet" in line

    config.write_text(CONFIG.format(url=wandb_server.url))
    later = start_daemon("--config", str(config), "--once", env=online_env)
    assert later.proc.wait(120) == 0, later.log()
    steps = sorted(v.metadata["step"] for v in wandb_server.versions("model", "batch"))
    assert steps == [1, 2]


def test_batch_failures_name_losses_of_this_run_only(tmp_path: Path) -> None:
    """What a batch run reports as not published: losses dropped during this run (not those
    of earlier runs, nor drops that lose nothing), failed rows and parked collections."""
    with Journal(tmp_path / "state") as journal:
        journal.record_drop("model", "/ck/old.pt", "unreadable", "EACCES", now=10.0)
        journal.record_drop("model", "/ck/a.pt", "unreadable", "EACCES", now=20.0)
        journal.record_drop("model", "/ck/b.pt", "vanished", "", now=20.0)
        journal.park("other", "403 forbidden", now=20.0)
        lines = leftovers.failures(journal, since=15.0)
    assert lines == [
        "other is parked: 403 forbidden",
        "/ck/a.pt (model): dropped, cannot be read: EACCES",
    ]


def test_until_file_run_against_an_unreachable_server_ends_at_its_deadline(
    tmp_path: Path, online_env: dict[str, str], start_daemon: Callable[..., Daemon]
) -> None:
    """The Kubernetes Job's mode: once the done marker exists, `--until-file` exits 1 by its
    `--deadline` although W&B cannot be reached, naming the checkpoint it could not publish."""
    (tmp_path / "ck").mkdir()
    renamed_in(tmp_path / "ck", "ckpt_5.pt", 3000, step=5, metrics={"loss": 1.0})
    config = tmp_path / "ckptd.yaml"
    config.write_text(CONFIG.format(url=f"http://127.0.0.1:{unused_port()}"))
    done = tmp_path / "done"
    daemon = start_daemon(
        "--config", str(config), "--until-file", str(done), "--deadline", "5s", env=online_env
    )
    daemon.wait_for_log("ckpt_5.pt (step 5) queued")
    done.touch()
    daemon.wait_for_log("publishing what is left, then exiting")
    began = time.monotonic()
    assert daemon.proc.wait(60) == 1, daemon.log()
    assert time.monotonic() - began < 5 + 10
    (line,) = [x for x in daemon.log().splitlines() if "not published:" in x]
    assert "ckpt_5.pt (step 5): not published yet" in line
