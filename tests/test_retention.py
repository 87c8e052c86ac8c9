"""Retention end to end: the daemon and `ckptd gc` against the loopback W&B server with the
real wandb SDK, real files and a real small filesystem; the executor on a real journal.

Daemon tests rely on the publisher running `Retention.after_publish` after every publish;
`ckptd gc` tests drive the same executor from the command line.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ckptd.checkpoint import CheckpointInfo, stat_files
from ckptd.config import Config, load_config
from ckptd.journal import Journal, NewRow
from ckptd.retention.run import Retention
from ckptd.sinks.wandb import WandbSink
from tests.conftest import CKPTD, Daemon, wait_until
from tests.support.checkpoints import renamed_in
from tests.support.fake_wandb import FakeWandbServer, VersionInfo

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
COLLECTION, PROJECT = "model-checkpoint", "retention"
# val_loss falls slowly with the step, except at step 4: the best of all twelve.
LOSSES = {step: 0.1 if step == 4 else 1.0 - step / 100 for step in range(1, 13)}
NEWEST_THREE_AND_BEST = {4, 10, 11, 12}

CONFIG = """\
state_dir: {state}
wandb: {{mode: online, project: retention, base_url: "{url}"}}
metrics: {{listen: null}}
upload: {{retry: {{initial_delay: 200ms, max_delay: 500ms}}}}
watch:
  - path: {ck}
    artifact: model-checkpoint
    settle: 1s
    sidecar: {{wait: 10s}}
    aliases:
      templates: ["step-{{step}}"]
      best: [{{metric: val_loss, mode: min, alias: best}}]
    retention:
      remote: {{keep_last: {keep_last}}}
      local: {local}
"""


def write_config(
    path: Path,
    server: FakeWandbServer,
    *,
    keep_last: int,
    local: str = "{}",
    state: Path | None = None,
    ck: Path | None = None,
) -> Path:
    state = state or path.parent / "state"
    ck = ck or path.parent / "ck"
    ck.mkdir(parents=True, exist_ok=True)
    body = CONFIG.format(state=state, url=server.url, ck=ck, keep_last=keep_last, local=local)
    path.write_text(body)
    return path


def write_checkpoint(
    root: Path, step: int, *, size: int = 20_000, aliases: tuple[str, ...] = ()
) -> Path:
    """A sidecar, then a zip checkpoint renamed into place (finished at once)."""
    metrics = {"val_loss": LOSSES.get(step, 1.0)}
    return renamed_in(root, f"ckpt_{step}.pt", size, step=step, metrics=metrics, aliases=aliases)


def live(server: FakeWandbServer) -> dict[int, VersionInfo]:
    """The collection's versions that are not deleted, by the step in their metadata."""
    return {v.metadata["step"]: v for v in server.versions(COLLECTION, PROJECT)}


def gc(config: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CKPTD, "gc", "--config", str(config), *args],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def plan_rows(output: str, where: str = "remote") -> dict[int, tuple[str, str]]:
    """The rows of `ckptd gc` tables: step -> (action, reason)."""
    rows = {}
    for line in output.splitlines():
        parts = line.split(maxsplit=7)
        if len(parts) == 8 and parts[0].split(":")[0] == where and parts[2].isdigit():
            rows[int(parts[2])] = (parts[6], parts[7])
    return rows


def published_count(daemon: Daemon) -> int:
    return len(re.findall(rf"published \S+ as {COLLECTION}:v\d+", daemon.log()))


# -- remote retention, after each publish and by `ckptd gc` -------------------------------------


def test_daemon_keeps_the_newest_three_and_the_best_of_twelve(
    tmp_path: Path,
    wandb_server: FakeWandbServer,
    online_env: dict[str, str],
    start_daemon: Callable[..., Daemon],
) -> None:
    """Twelve checkpoints with keep_last 3 and a best rule leave exactly the versions of steps
    10, 11, 12 and the best (step 4), with latest, best and step-N aliases intact; every
    deletion is logged and recorded in the journal with its reason."""
    config = write_config(tmp_path / "ckptd.yaml", wandb_server, keep_last=3)
    daemon = start_daemon("--config", str(config), env=online_env)
    daemon.wait_for_log("ckptd started")
    for step in range(1, 13):
        write_checkpoint(tmp_path / "ck", step)
    wait_until(
        lambda: wandb_server.created_versions == 12 and len(live(wandb_server)) == 4,
        120,
        "retention after the twelfth publish",
    )
    assert daemon.stop() == 0, daemon.log()

    versions = live(wandb_server)
    assert set(versions) == NEWEST_THREE_AND_BEST
    assert all(v.state == "COMMITTED" for v in versions.values())
    assert wandb_server.alias_holder(COLLECTION, "latest", PROJECT) == versions[12].version
    assert wandb_server.alias_holder(COLLECTION, "best", PROJECT) == versions[4].version
    for step, version in versions.items():
        assert f"step-{step}" in version.aliases
    with Journal(tmp_path / "state").open(exclusive=False) as journal:
        deletions = journal.deletions(COLLECTION)
    assert len(deletions) == 8
    assert {d.reason for d in deletions} == {"older than the newest 3 by step"}
    for deletion in deletions:
        assert f"retention deleted {deletion.target} " in daemon.log()


def test_gc_dry_run_shows_the_plan_and_deletes_nothing_then_gc_carries_it_out(
    tmp_path: Path,
    wandb_server: FakeWandbServer,
    online_env: dict[str, str],
    start_daemon: Callable[..., Daemon],
) -> None:
    """With twelve versions published under keep_last 50, `gc --dry-run` under keep_last 3
    plans the daemon's outcome (keep steps 4, 10, 11, 12, delete the rest) and deletes
    nothing, even while the daemon runs; acting is refused while the daemon runs, then
    deletes exactly the planned versions, and a second plan deletes nothing more."""
    daemon_config = write_config(tmp_path / "ckptd.yaml", wandb_server, keep_last=50)
    gc_config = write_config(tmp_path / "gc.yaml", wandb_server, keep_last=3)
    daemon = start_daemon("--config", str(daemon_config), env=online_env)
    daemon.wait_for_log("ckptd started")
    for step in range(1, 13):
        write_checkpoint(tmp_path / "ck", step)
    wait_until(lambda: published_count(daemon) == 12, 120, "twelve publishes")

    refused = gc(gc_config, online_env)
    assert refused.returncode == 1
    assert "stop it, or use --dry-run" in refused.stderr
    running = gc(gc_config, online_env, "--dry-run")
    assert running.returncode == 0, running.stderr
    assert daemon.stop() == 0, daemon.log()

    dry = gc(gc_config, online_env, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    expected = {
        4: ("keep", "holds protected alias 'best'"),
        10: ("keep", "among the newest 3 by step"),
        11: ("keep", "among the newest 3 by step"),
        12: ("keep", "holds protected alias 'latest'"),
    }
    expected.update(
        {
            s: ("delete", "older than the newest 3 by step")
            for s in range(1, 13)
            if s not in expected
        }
    )
    assert plan_rows(dry.stdout) == expected
    assert plan_rows(running.stdout) == expected
    assert "dry run: 8 deletion(s) planned, nothing deleted" in dry.stdout
    assert len(live(wandb_server)) == 12
    with Journal(tmp_path / "state").open(exclusive=False) as journal:
        assert journal.deletions() == []

    acted = gc(gc_config, online_env)
    assert acted.returncode == 0, acted.stderr
    assert "deleted 8 of 8 planned" in acted.stdout
    versions = live(wandb_server)
    assert set(versions) == {s for s, (action, _) in expected.items() if action == "keep"}
    assert set(versions) == NEWEST_THREE_AND_BEST
    assert wandb_server.alias_holder(COLLECTION, "latest", PROJECT) == versions[12].version
    assert wandb_server.alias_holder(COLLECTION, "best", PROJECT) == versions[4].version
    assert all(f"step-{s}" in v.aliases for s, v in versions.items())
    with Journal(tmp_path / "state").open(exclusive=False) as journal:
        assert len(journal.deletions(COLLECTION)) == 8
    again = gc(gc_config, online_env, "--dry-run")
    assert "dry run: 0 deletion(s) planned" in again.stdout


def test_versions_linked_to_a_registry_or_holding_foreign_aliases_are_kept(
    tmp_path: Path,
    wandb_server: FakeWandbServer,
    online_env: dict[str, str],
    start_daemon: Callable[..., Daemon],
) -> None:
    """Under keep_last 1, `ckptd gc` keeps a version linked to a registry, one holding a
    sidecar's alias ckptd does not manage (`candidate`) and the holders of `best` and
    `latest`, and deletes the unprotected rest."""
    config = write_config(tmp_path / "ckptd.yaml", wandb_server, keep_last=50)
    daemon = start_daemon("--config", str(config), env=online_env)
    daemon.wait_for_log("ckptd started")
    for step in range(1, 7):
        write_checkpoint(tmp_path / "ck", step, aliases=("candidate",) if step == 2 else ())
    wait_until(lambda: published_count(daemon) == 6, 120, "six publishes")
    assert daemon.stop() == 0, daemon.log()
    wandb_server.link(COLLECTION, live(wandb_server)[1].version, project=PROJECT)

    result = gc(write_config(tmp_path / "gc.yaml", wandb_server, keep_last=1), online_env)
    assert result.returncode == 0, result.stderr
    assert plan_rows(result.stdout) == {
        1: ("keep", "linked to a registry"),
        2: ("keep", "holds alias 'candidate', which ckptd does not manage"),
        3: ("delete", "older than the newest 1 by step"),
        4: ("keep", "holds protected alias 'best'"),
        5: ("delete", "older than the newest 1 by step"),
        6: ("keep", "holds protected alias 'latest'"),
    }
    assert set(live(wandb_server)) == {1, 2, 4, 6}


def test_a_failed_deletion_is_retried_and_never_blocks_publishing(
    tmp_path: Path,
    wandb_server: FakeWandbServer,
    online_env: dict[str, str],
    start_daemon: Callable[..., Daemon],
) -> None:
    """A deletion the server refuses is logged and retried at a later run after its backoff,
    while every checkpoint keeps being published without waiting for it."""
    config = write_config(tmp_path / "ckptd.yaml", wandb_server, keep_last=1)
    daemon = start_daemon("--config", str(config), env=online_env)
    daemon.wait_for_log("ckptd started")
    fault = wandb_server.inject("DeleteArtifact", status=403)
    write_checkpoint(tmp_path / "ck", 1)
    daemon.wait_for_log(f"ckpt_1.pt as {COLLECTION}:v0")
    write_checkpoint(tmp_path / "ck", 2)
    daemon.wait_for_log(f"retention could not handle {COLLECTION}:v0 (attempt 1")
    assert fault.hits == 1

    def v0_deleted() -> bool:
        return any(
            v.version == "v0" and v.state == "DELETED"
            for v in wandb_server.versions(COLLECTION, PROJECT, include_deleted=True)
        )

    step = 2
    while not v0_deleted() and step < 12:  # each publish is a later run; one comes after 500ms
        step += 1
        write_checkpoint(tmp_path / "ck", step)
        daemon.wait_for_log(f"ckpt_{step}.pt as {COLLECTION}:v{step - 1}")
        wait_until(lambda: len(live(wandb_server)) <= 2, 30, f"retention after step {step}")
    assert v0_deleted(), daemon.log()
    wait_until(lambda: set(live(wandb_server)) == {step}, 30, "only the newest version left")
    assert wandb_server.created_versions == step
    assert f"retention handled {COLLECTION}:v0 after 1 failed attempts" in daemon.log()
    assert daemon.stop() == 0, daemon.log()


# -- local retention --------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs mounted for this test; failing to mount fails the test, loudly."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.fail(
            f"cannot mount an 8 MiB tmpfs at {mount} (this test needs root or CAP_SYS_ADMIN): "
            f"{done.stderr.strip()}"
        )
    try:
        assert shutil.disk_usage(mount).total == 8 * MiB
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_min_free_on_a_small_filesystem_never_fills_it_nor_touches_unpublished_files(
    tmp_path: Path,
    small_disk: Path,
    wandb_server: FakeWandbServer,
    online_env: dict[str, str],
    start_daemon: Callable[..., Daemon],
) -> None:
    """On an 8 MiB filesystem, 1 MiB checkpoints written in bursts while uploads are slow:
    with min_free 4MiB and keep_last 1, no write ever fails for lack of space; only files of
    checkpoints whose version was committed are deleted (each after its publish, oldest
    first), never a queued checkpoint, the newest, the holder of `best`, a file still being
    written or a file that is no checkpoint; every checkpoint still lands on W&B intact."""
    ck = small_disk / "ck"
    config = write_config(
        tmp_path / "ckptd.yaml", wandb_server, keep_last=50, state=small_disk / "state", ck=ck,
        local="{min_free: 4MiB, keep_last: 1}",
    )  # fmt: skip
    (ck / "notes.txt").write_text("not a checkpoint")
    being_written = ck / "ckpt_99.pt"
    being_written.write_bytes(b"PK\x03\x04" + os.urandom(100_000))  # a zip without its end
    daemon = start_daemon("--config", str(config), env=online_env)
    daemon.wait_for_log("ckptd started")
    wandb_server.inject("CreateArtifact", delay=1.0, times=12)  # slow uploads: a queue forms

    written: dict[int, bytes] = {}
    lowest_free = shutil.disk_usage(small_disk).free
    for step in range(1, 13):
        try:
            path = write_checkpoint(ck, step, size=MiB)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                pytest.fail(f"the disk filled at step {step}:\n{daemon.log()}")
            raise
        written[step] = path.read_bytes()
        lowest_free = min(lowest_free, shutil.disk_usage(small_disk).free)
        if step % 3 == 0:  # a burst of three, then wait for its upload and the space it frees
            wait_until(lambda s=step: f"ckpt_{s}.pt as {COLLECTION}" in daemon.log(), 60, step)
            wait_until(
                lambda: shutil.disk_usage(small_disk).free >= 4 * MiB, 30, "min_free restored"
            )
    assert daemon.stop() == 0, daemon.log()

    log = daemon.log()
    assert "No space left" not in log
    assert lowest_free > 0
    assert (ck / "notes.txt").read_text() == "not a checkpoint"
    assert being_written.stat().st_size == 100_004
    assert (ck / "ckpt_12.pt").read_bytes() == written[12]  # the newest is kept
    assert (ck / "ckpt_4.pt").read_bytes() == written[4]  # and the best
    with Journal(small_disk / "state").open(exclusive=False) as journal:
        rows = {row.step: row for row in journal.rows(COLLECTION)}
        deletions = {d.checkpoint_id: d for d in journal.deletions(COLLECTION)}
    deleted_steps = sorted(s for s in written if not (ck / f"ckpt_{s}.pt").exists())
    assert deleted_steps, "min_free never asked for a deletion: the test proves nothing"
    deletable = [s for s in sorted(written) if s != 4]  # step 4 holds `best`: protected
    assert deleted_steps == deletable[: len(deleted_steps)]  # oldest first
    for step in written:
        row = rows[step]
        assert row.state == "aliased" and row.version is not None
        if step in deleted_steps:
            deletion = deletions[row.id]
            assert deletion.reason.startswith("free space")
            assert deletion.target == str(ck / f"ckpt_{step}.pt")
            # The file went only after its version was committed and logged as published.
            published_at = log.index(f"published {ck}/ckpt_{step}.pt as {COLLECTION}:")
            assert published_at < log.index(f"the files of {deletion.target} ")
        else:
            assert (ck / f"ckpt_{step}.pt").read_bytes() == written[step]
    assert set(deletions) == {rows[s].id for s in deleted_steps}
    # Not vacuous: some deletion happened while a later checkpoint waited, unpublished.
    assert any(
        r.detected_at < d.at < r.updated_at for d in deletions.values() for r in rows.values()
    )
    for step, version in live(wandb_server).items():
        assert version.state == "COMMITTED"
        assert version.read_bytes(f"ckpt_{step}.pt") == written[step]
    assert set(live(wandb_server)) == set(written)


def offline_config(tmp_path: Path, local: str) -> Config:
    path = tmp_path / "offline.yaml"
    path.write_text(
        "state_dir: state\nwandb: {mode: offline}\nmetrics: {listen: null}\n"
        "watch:\n  - path: ck\n    aliases: {templates: ['step-{step}']}\n"
        f"    retention: {{local: {local}}}\n"
    )
    (tmp_path / "ck").mkdir(exist_ok=True)
    return load_config(path)


def journal_checkpoint(
    journal: Journal, config: Config, unit: Path, step: int, state: str = "aliased"
) -> int:
    """Record `unit` (a file or a directory under the watched root) as ckptd would, in `state`."""
    watch = config.watch[0]
    new = NewRow(
        collection=watch.artifact, watch_path=watch.path, relpath=unit.name,
        fingerprint=str(stat_files(unit)), format="file", step=step, files=stat_files(unit),
        info=CheckpointInfo(step=step), snapshot=None,
    )  # fmt: skip
    row_id = journal.add(new, 1.0)
    assert row_id is not None
    path = ["ready", "hashed", "published", "aliased"]
    reached = path.index(state)
    if reached >= 1:
        journal.mark_hashed(row_id, 2.0, md5s={}, digest=f"d{row_id}")
    if reached >= 2:
        journal.mark_published(row_id, 2.0, version=None, aliases=(f"step-{step}",), best={})
    if reached >= 3:
        journal.mark_aliased(row_id, 2.0)
    return row_id


def test_local_retention_deletes_only_published_unchanged_files_inside_the_root(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With delete_after_upload and keep_last 2 (offline, allow_offline): a published file and
    a published directory are deleted and recorded; a file rewritten since publishing, a
    queued checkpoint (replacing a published one of the same name), a file swapped for a
    symlink leaving the root, the newest two, the holder of `latest` and files of no
    checkpoint stay; remote retention is skipped with one log line; a second run deletes
    nothing more."""
    config = offline_config(
        tmp_path, "{delete_after_upload: true, keep_last: 2, allow_offline: true}"
    )
    ck = config.watch[0].path
    outside = tmp_path / "outside.pt"
    outside.write_bytes(b"precious")
    files = {step: ck / f"ckpt_{step}.pt" for step in (1, 2, 3, 4, 6, 7)}
    for path in files.values():
        path.write_bytes(os.urandom(1000))
    directory = ck / "checkpoint-5"
    (directory / "shards").mkdir(parents=True)
    (directory / "model.safetensors").write_bytes(os.urandom(500))
    (directory / "shards" / "part-0").write_bytes(os.urandom(500))
    (ck / "notes.txt").write_text("keep me")

    with Journal(config.state_dir) as journal:
        ids = {
            step: journal_checkpoint(journal, config, path, step) for step, path in files.items()
        }
        ids[5] = journal_checkpoint(journal, config, directory, 5)
        files[3].write_bytes(os.urandom(1000))  # a new checkpoint under the same name, queued
        os.utime(files[3], ns=(2, 2))
        ids[3] = journal_checkpoint(journal, config, files[3], 3, "hashed")
        with files[2].open("r+b") as f:  # rewritten in place after it was published
            f.write(b"new bytes")
        os.utime(files[2], ns=(1, 1))
        files[4].unlink()
        files[4].symlink_to(outside)
        retention = Retention(config, journal, WandbSink(config))
        with caplog.at_level(logging.INFO, logger="ckptd"):
            first = retention.run(config.watch[0], 100.0)
            second = retention.run(config.watch[0], 101.0)
        deletions = journal.deletions()
        assert journal.retired(config.watch[0].artifact) == {ids[1], ids[5]}

    assert len(first.decisions) == 7  # one per path: the older checkpoint at ckpt_3.pt is gone
    by_step = {d.step: (d.action, d.reason) for d in first.decisions}
    assert by_step == {
        1: ("delete", "published; delete_after_upload is on"),
        2: ("keep", "ckpt_2.pt changed since it was published"),
        3: ("keep", "not published yet (hashed)"),
        4: ("keep", "ckpt_4.pt is not a regular file any more"),
        5: ("delete", "published; delete_after_upload is on"),
        6: ("keep", "among the newest 2 published"),
        7: ("keep", "holds protected alias 'latest'"),
    }
    assert not files[1].exists() and not directory.exists()
    assert files[2].exists() and files[3].exists()
    assert outside.read_bytes() == b"precious" and files[4].is_symlink()
    assert files[6].exists() and files[7].exists()
    assert (ck / "notes.txt").read_text() == "keep me"
    assert [(d.target, d.checkpoint_id) for d in deletions] == [
        (str(files[1]), ids[1]),
        (str(directory), ids[5]),
    ]
    assert second.deletions == ()
    assert caplog.text.count("remote retention is skipped") == 1
    assert f"retention deleted the files of {files[1]} (step 1)" in caplog.text


def test_offline_local_retention_keeps_files_without_allow_offline(tmp_path: Path) -> None:
    """In offline mode nothing is committed on W&B until `wandb sync`, so without
    allow_offline no local file is deleted, whatever the policy asks."""
    config = offline_config(tmp_path, "{delete_after_upload: true, keep_last: 0}")
    ck = config.watch[0].path
    with Journal(config.state_dir) as journal:
        for step in (1, 2):
            (ck / f"ckpt_{step}.pt").write_bytes(os.urandom(100))
            journal_checkpoint(journal, config, ck / f"ckpt_{step}.pt", step)
        result = Retention(config, journal, WandbSink(config)).run(config.watch[0], 100.0)
        assert journal.deletions() == []
    assert result.deletions == ()
    assert {d.reason for d in result.decisions} == {
        "published offline only; allow_offline is false"
    }
    assert (ck / "ckpt_1.pt").exists() and (ck / "ckpt_2.pt").exists()


def test_gc_command_prints_the_local_plan_and_acts_only_without_dry_run(tmp_path: Path) -> None:
    """`ckptd gc --dry-run` prints the local rows and the offline note and deletes nothing;
    `ckptd gc` then deletes what the dry run showed."""
    config = offline_config(
        tmp_path, "{delete_after_upload: true, keep_last: 1, allow_offline: true}"
    )
    ck = config.watch[0].path
    with Journal(config.state_dir) as journal:
        for step in (1, 2, 3):
            (ck / f"ckpt_{step}.pt").write_bytes(os.urandom(100))
            journal_checkpoint(journal, config, ck / f"ckpt_{step}.pt", step)
    path = tmp_path / "offline.yaml"
    dry = subprocess.run(
        [*CKPTD, "gc", "--config", str(path), "--dry-run"], capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    assert "note: offline mode: remote versions cannot be listed" in dry.stdout
    assert plan_rows(dry.stdout, "local") == {
        1: ("delete", "published; delete_after_upload is on"),
        2: ("delete", "published; delete_after_upload is on"),
        3: ("keep", "holds protected alias 'latest'"),
    }
    assert "dry run: 2 deletion(s) planned, nothing deleted" in dry.stdout
    assert all((ck / f"ckpt_{s}.pt").exists() for s in (1, 2, 3))
    acted = subprocess.run(
        [*CKPTD, "gc", "--config", str(path)], capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert acted.returncode == 0, acted.stderr
    assert "deleted 2 of 2 planned" in acted.stdout
    assert [(ck / f"ckpt_{s}.pt").exists() for s in (1, 2, 3)] == [False, False, True]


def test_a_config_without_retention_deletes_no_version(
    tmp_path: Path,
    wandb_server: FakeWandbServer,
    online_env: dict[str, str],
    start_daemon: Callable[..., Daemon],
) -> None:
    """No `retention` section, online: eight checkpoints leave eight versions on W&B and no
    deletion in the journal (destroying versions is something a config must ask for)."""
    (tmp_path / "ck").mkdir()
    config = tmp_path / "ckptd.yaml"
    config.write_text(
        f"state_dir: {tmp_path / 'state'}\n"
        f'wandb: {{mode: online, project: retention, base_url: "{wandb_server.url}"}}\n'
        "metrics: {listen: null}\n"
        f"watch: [{{path: {tmp_path / 'ck'}, settle: 1s, sidecar: {{wait: 10s}}}}]\n"
    )
    daemon = start_daemon("--config", str(config), env=online_env)
    daemon.wait_for_log("ckptd started")
    for step in range(1, 9):
        write_checkpoint(tmp_path / "ck", step)
    wait_until(lambda: daemon.log().count("published ") == 8, 120, "eight publishes")
    assert daemon.stop() == 0, daemon.log()
    assert sorted(live(wandb_server)) == list(range(1, 9))
    with Journal(tmp_path / "state").open(exclusive=False) as journal:
        assert journal.deletions() == []
    assert "retention deleted" not in daemon.log()
