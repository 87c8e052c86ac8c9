"""Real trainers beside the real daemon: every checkpoint a framework writes, even one its own
rotation deletes a second later, is published once with the bytes it wrote.

The trainers (tests/support/trainers.py) run in their own process and record each
checkpoint's files' md5 the moment it is saved. The daemon runs with the example config's
default `settle` and `sidecar.wait`, in W&B offline mode, under each observer; what it
published is read back from the offline run's `.wandb` file.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Daemon
from tests.support.mounts import tmpfs
from tests.support.wandb_offline import OfflineArtifact, artifacts

# settle and sidecar.wait are left out on purpose: the defaults (5s, 30s) are under test.
# poll_interval is not the default 2s: a checkpoint that the next save rotates away lives
# about a second, and the polling observer cannot see a file that comes and goes between
# two of its scans (inotify ignores the key).
CONFIG = """\
state_dir: state
wandb: {{mode: offline, project: real-trainers}}
metrics: {{listen: null}}
watch:
  - path: out
    artifact: {artifact}
    format: {format}
    observer: {observer}
    poll_interval: 0.5s
    aliases:
      templates: ["step-{{step}}"]
      best: [{{metric: {metric}, mode: min, alias: best}}]
"""

TRAINING_TIMEOUT = 300  # seconds: imports and 6 paced saves take ~15 s on an idle machine
# After DONE, `--until-file` publishes what is left: at most settle plus sidecar.wait
# (and its own 5 s) for the last candidate, then the uploads.
DRAIN_TIMEOUT = 180


@dataclass(frozen=True)
class Saved:
    """One checkpoint as the trainer saved it: where, its step, its metric, its files' md5s."""

    unit: str
    step: int
    metric: float | None
    files: dict[str, str]


@dataclass(frozen=True)
class Trainer:
    kind: str
    format: str
    metric: str


TRAINERS = {
    "hf-trainer": Trainer("hf-trainer", "hf-trainer", "eval_loss"),
    "lightning": Trainer("lightning", "lightning", "val_loss"),
    "torch-loop": Trainer("torch-loop", "auto", "val_loss"),
}


def md5_b64(hex_digest: str) -> str:
    """A hex md5 as W&B's manifest writes it (base64)."""
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


def train(kind: str, out: Path, record: Path, env: dict[str, str]) -> list[Saved]:
    """Run a trainer of tests/support/trainers.py to the end; what it saved, in order."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.support.trainers", kind, str(out), str(record)],
        env=env, capture_output=True, text=True, timeout=TRAINING_TIMEOUT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [Saved(**json.loads(line)) for line in record.read_text().splitlines()]


def run_beside_daemon(
    tmp_path: Path,
    start_daemon: Callable[..., Daemon],
    wandb_env: dict[str, str],
    kind: str,
    config: str,
    trainer_env: dict[str, str] | None = None,
) -> tuple[list[Saved], list[OfflineArtifact], Daemon]:
    """Start the daemon, train beside it, then let it publish what is left and exit."""
    (tmp_path / "ckptd.yaml").write_text(config)
    (tmp_path / "out").mkdir()
    done = tmp_path / "training-done"
    daemon = start_daemon(
        "--config", str(tmp_path / "ckptd.yaml"), "--until-file", str(done), env=wandb_env
    )
    daemon.wait_for_log("ckptd started")
    saved = train(kind, tmp_path / "out", tmp_path / "saved.jsonl", trainer_env or wandb_env)
    done.touch()
    try:
        code = daemon.proc.wait(DRAIN_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"ckptd did not finish:\n{daemon.log()}") from None
    assert code == 0, daemon.log()
    found = artifacts(tmp_path / "state" / "wandb")
    return saved, found, daemon


def alias_holders(found: list[OfflineArtifact]) -> dict[str, int]:
    """Where each alias ends up: a version logged with an alias takes it from any earlier
    one, so the last version logged with it holds it (the SDK adds `latest` to every
    version it logs). Alias -> that version's step."""
    holders = {}
    for art in found:
        for alias in art.aliases:
            holders[alias] = art.metadata["step"]
    return holders


def assert_each_saved_once(
    saved: list[Saved], found: list[OfflineArtifact], metric: str, log: str
) -> None:
    """Every checkpoint saved is exactly one version, with the bytes it had when saved, and
    latest, best and step-N are where they belong."""
    assert len(saved) >= 5, saved  # the trainer really saved a checkpoint every second or so
    published = {art.metadata["step"]: art for art in found}
    assert sorted(art.metadata["step"] for art in found) == [s.step for s in saved], log
    for checkpoint in saved:
        art = published[checkpoint.step]
        entries = {name: entry[0] for name, entry in art.entries.items()}
        expected = {name: md5_b64(md5) for name, md5 in checkpoint.files.items()}
        assert entries == expected, f"{checkpoint.unit}: published {entries}, saved {expected}"
        assert art.metadata["source_path"].endswith(checkpoint.unit)
        if checkpoint.metric is not None:
            assert art.metadata["metrics"][metric] == pytest.approx(checkpoint.metric, abs=1e-6)
    best = min((s for s in saved if s.metric is not None), key=lambda s: s.metric or 0.0)
    holders = alias_holders(found)
    logged = [(art.metadata["step"], sorted(art.aliases)) for art in found]
    assert holders["latest"] == max(s.step for s in saved), f"logged in order: {logged}"
    assert holders["best"] == best.step, f"logged in order: {logged}"
    assert {f"step-{s.step}" for s in saved} <= set(holders)
    assert all(holders[f"step-{s.step}"] == s.step for s in saved)


@pytest.fixture
def in_place_tmpdir(tmp_path: Path, wandb_env: dict[str, str]) -> Iterator[dict[str, str]]:
    """The trainer's environment with TMPDIR on a filesystem of its own: Lightning saves to
    a temp file there and moves it into place, which across filesystems is a copy written
    in place at the final name (the case that needs the settle window or close evidence)."""
    with ExitStack() as stack:
        mount = stack.enter_context(tmpfs(tmp_path / "trainer-tmp", "64m"))
        yield {**wandb_env, "TMPDIR": str(mount)}


@pytest.mark.slow
@pytest.mark.parametrize("observer", ["inotify", "polling"])
@pytest.mark.parametrize("kind", sorted(TRAINERS))
def test_every_checkpoint_a_real_trainer_writes_is_published_once(
    kind: str,
    observer: str,
    tmp_path: Path,
    wandb_env: dict[str, str],
    in_place_tmpdir: dict[str, str],
    start_daemon: Callable[..., Daemon],
) -> None:
    """A real HF Trainer (save_total_limit=1), Lightning ModelCheckpoint (save_top_k=1) or
    plain torch.save loop (deleting the previous file), saving about every second, in
    place: each checkpoint is one version with the md5s it had when saved, latest on the
    highest step, best on the lowest metric, step-N on each."""
    trainer = TRAINERS[kind]
    config = CONFIG.format(
        artifact=kind, format=trainer.format, observer=observer, metric=trainer.metric
    )
    saved, found, daemon = run_beside_daemon(
        tmp_path, start_daemon, wandb_env, kind, config, in_place_tmpdir
    )
    assert_each_saved_once(saved, found, trainer.metric, daemon.log())
    # The framework's rotation really deleted all but the newest checkpoint.
    left = [p for p in (tmp_path / "out").iterdir() if not p.name.endswith(".metrics.json")]
    assert [p.name for p in left] == [saved[-1].unit]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "unit"), [("save-pretrained", "gpt2-tiny"), ("save-adapter", "lora-adapter")]
)
def test_save_pretrained_directory_is_published_once_with_all_its_files(
    kind: str,
    unit: str,
    tmp_path: Path,
    wandb_env: dict[str, str],
    start_daemon: Callable[..., Daemon],
) -> None:
    """A model's save_pretrained() directory (sharded, with its index) and a PEFT adapter's,
    written beside the running daemon under format auto, are each one version holding every
    file with the bytes written."""
    config = CONFIG.format(artifact=unit, format="auto", observer="auto", metric="eval_loss")
    saved, found, daemon = run_beside_daemon(tmp_path, start_daemon, wandb_env, kind, config)
    (checkpoint,) = saved
    assert len(found) == 1, daemon.log()
    (art,) = found
    entries = {name: entry[0] for name, entry in art.entries.items()}
    assert entries == {name: md5_b64(md5) for name, md5 in checkpoint.files.items()}
    assert art.metadata["source_path"] == str(tmp_path / "out" / unit)
    assert os.path.isdir(tmp_path / "out" / unit)
