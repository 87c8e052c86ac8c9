"""Every framework writer beside the real daemon, with the inotify and the polling observer.

Each writer of the corpus runs step by step in its own watched directory while one ckptd
process watches them all. After every intermediate step the writer stays frozen for a moment
(well inside the settle window) and nothing may have been queued for its collection; after
its last step exactly one version with all of the checkpoint's files must land.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ckptd.journal import Journal
from tests.conftest import Daemon, wait_until
from tests.support.wandb_offline import artifacts
from tests.support.writers import ALL_SPECS, WriterSpec, rotate

STEP = 100
FROZEN = 0.25  # seconds each intermediate state is held; the settle window is 2 s


def collection(spec: WriterSpec) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "--", spec.id)


def config(tmp_path: Path, observer: str) -> Path:
    lines = [
        "state_dir: state",
        "wandb: {mode: offline, project: corpus}",
        "metrics: {listen: null}",
        "watch:",
    ]
    for spec in ALL_SPECS:
        root = tmp_path / "roots" / collection(spec)
        root.mkdir(parents=True)
        lines += [
            f"  - path: {root}",
            f"    artifact: {collection(spec)}",
            f"    format: {spec.format}",
            f"    observer: {observer}",
            "    poll_interval: 200ms",
            "    settle: 2s",
            "    sidecar: {wait: 0s}",
        ]
    path = tmp_path / "ckptd.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def rows(state: Path, name: str) -> list[tuple[str, tuple[str, ...]]]:
    journal = Journal(state).open(exclusive=False)
    try:
        return [(r.state, tuple(sorted(f.name for f in r.files))) for r in journal.rows(name)]
    finally:
        journal.close()


def drive(spec: WriterSpec, tmp_path: Path) -> None:
    """Run one writer beside the daemon, checking the journal at every frozen state."""
    root = tmp_path / "roots" / collection(spec)
    state = tmp_path / "state"
    for step in spec.steps(root, STEP):
        if step.finished:
            break
        time.sleep(FROZEN)
        assert rows(state, collection(spec)) == [], f"{spec.id}: queued at {step.description!r}"
    wait_until(
        lambda: [s for s, _ in rows(state, collection(spec))] == ["aliased"],
        30,
        f"{spec.id} to be published",
    )
    ((_, files),) = rows(state, collection(spec))
    assert set(files) == set(spec.files(STEP)), spec.id


@pytest.mark.parametrize("observer", ["inotify", "polling"])
def test_every_format_is_published_once_and_only_when_finished(
    tmp_path: Path, wandb_env: dict[str, str], start_daemon: Callable[..., Daemon], observer: str
) -> None:
    """With either observer, no writer's intermediate state is queued and each finished
    checkpoint becomes exactly one version holding exactly its files."""
    daemon = start_daemon("--config", str(config(tmp_path, observer)), env=wandb_env)
    daemon.wait_for_log("ckptd started")
    with ThreadPoolExecutor(len(ALL_SPECS)) as pool:
        for future in [pool.submit(drive, spec, tmp_path) for spec in ALL_SPECS]:
            future.result()
    assert daemon.stop() == 0, daemon.log()
    published = {a.name: a for a in artifacts(tmp_path / "state" / "wandb")}
    assert set(published) == {collection(spec) for spec in ALL_SPECS}
    for spec in ALL_SPECS:
        assert set(published[collection(spec)].entries) == set(spec.files(STEP)), spec.id


def test_rotation_right_after_each_save_loses_no_checkpoint(
    tmp_path: Path, wandb_env: dict[str, str], start_daemon: Callable[..., Daemon]
) -> None:
    """An HF Trainer with save_total_limit=1 deletes the previous checkpoint right after it
    writes the next one; every finished checkpoint still ends as a version with its files."""
    root = tmp_path / "out"
    root.mkdir()
    config = tmp_path / "ckptd.yaml"
    config.write_text(
        "state_dir: state\nwandb: {mode: offline, project: rotation}\nmetrics: {listen: null}\n"
        f"watch: [{{path: {root}, artifact: hf, format: hf-trainer, settle: 1s,"
        " sidecar: {wait: 0s}}]\n"
    )
    daemon = start_daemon("--config", str(config), env=wandb_env)
    daemon.wait_for_log("ckptd started")
    spec = next(s for s in ALL_SPECS if s.id == "hf-trainer")
    steps = [100, 200, 300, 400, 500]
    for step in steps:
        for _ in spec.steps(root, step):
            pass
        rotate(root, keep=1, unit_glob="checkpoint-*")  # HF rotates right after saving
        time.sleep(1.5)  # the training steps between two saves
    for step in steps:
        daemon.wait_for_log(f"checkpoint-{step} as hf:", timeout=30)
    assert daemon.stop() == 0, daemon.log()
    published = artifacts(tmp_path / "state" / "wandb")
    assert sorted(a.metadata["step"] for a in published) == steps
    for art in published:
        assert set(art.entries) == set(spec.files(art.metadata["step"]))
    assert [p.name for p in root.iterdir()] == ["checkpoint-500"]
