"""Chaos: ckptd is killed with SIGKILL at random moments while a writer produces checkpoints
and the W&B server misbehaves (online), or while wandb-core buffers the offline run files
(offline, where its wandb-core is sometimes killed too); in the end every checkpoint is
exactly one version (online) or one artifact record across all `.wandb` files (offline)."""

from __future__ import annotations

import base64
import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

from ckptd import sidecar
from tests.conftest import Daemon, ckptd_status, wait_until
from tests.support.fake_wandb import FakeWandbServer
from tests.support.wandb_offline import artifacts

CHECKPOINTS = 30
CONFIG = """\
state_dir: state
wandb: {{mode: online, project: chaos, base_url: "{url}"}}
metrics: {{listen: null}}
upload: {{workers: 2, retry: {{initial_delay: 200ms, max_delay: 1s}}, shutdown_timeout: 5s}}
watch:
  - path: ck
    artifact: model
    settle: 500ms
    sidecar: {{wait: 2s}}
    aliases:
      templates: ["step-{{step}}"]
      best: [{{metric: val_loss, mode: min, alias: best}}]
    retention: {{remote: {{keep_last: null}}}}   # every version stays, to be counted
"""
OFFLINE_CONFIG = (
    CONFIG.replace(
        'mode: online, project: chaos, base_url: "{url}"', "mode: offline, project: chaos"
    )
    .replace("{{", "{")
    .replace("}}", "}")
)
FAULTS: list[tuple[str, dict[str, object]]] = [
    ("CreateArtifact", {"status": 500}),
    ("CreateArtifact", {"status": 429, "retry_after": 1}),
    ("/storage/", {"reset": True}),
    ("CommitArtifact", {"reset": True}),
    ("CommitArtifact", {"status": 500, "after": True}),  # committed, but the answer is lost
    ("CreateArtifactFiles", {"delay": 3}),
    ("/graphql", {"status": 503}),
]


def writer(root: Path, rng: random.Random, losses: dict[int, float], done: threading.Event) -> None:
    """A training loop: a checkpoint with its sidecar every few hundred milliseconds."""
    for step in range(1, CHECKPOINTS + 1):
        loss = rng.choice([0.5, 0.4, 0.3, 0.3, round(rng.uniform(0.2, 0.9), 2)])
        losses[step] = loss
        final = root / f"ckpt_{step:03d}.pt"
        tmp = root / f".{final.name}.tmp"
        with zipfile.ZipFile(tmp, "w") as z:
            z.writestr("weights", rng.randbytes(rng.randint(2_000, 200_000)))
        sidecar.write(final, step=step, metrics={"val_loss": loss})
        os.replace(tmp, final)
        time.sleep(rng.uniform(0.2, 1.0))
    done.set()


def test_kill_9_and_faults_lose_nothing_and_duplicate_nothing(
    tmp_path: Path,
    wandb_server: FakeWandbServer,
    online_env: dict[str, str],
    start_daemon: Callable[..., Daemon],
) -> None:
    """30 checkpoints, random SIGKILLs and restarts, 5xx/429/resets/stalls: every checkpoint
    ends as exactly one committed version with the source's md5, latest is on the highest
    step, best on the first lowest val_loss, and no step is published twice."""
    seed = int(os.environ.get("CKPTD_CHAOS_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    root = tmp_path / "ck"
    root.mkdir()
    config = tmp_path / "ckptd.yaml"
    config.write_text(CONFIG.format(url=wandb_server.url))
    losses: dict[int, float] = {}
    done = threading.Event()
    training = threading.Thread(target=writer, args=(root, rng, losses, done), daemon=True)
    training.start()

    kills = 0
    deadline = time.monotonic() + 150
    while (not done.is_set() or kills < 8) and time.monotonic() < deadline:
        match, fault = rng.choice(FAULTS)
        wandb_server.inject(match, times=rng.randint(1, 2), **fault)  # type: ignore[arg-type]
        daemon = start_daemon("--config", str(config), env=online_env)
        if rng.random() < 0.5:
            time.sleep(rng.uniform(0.5, 4.0))  # anywhere: start-up, scan, hashing, upload
        else:  # right after a version landed: between commit and journal, or the next upload
            published = wandb_server.created_versions
            _wait_quietly(lambda n=published: wandb_server.created_versions > n, 8)
            time.sleep(rng.uniform(0.0, 0.3))
        daemon.kill()
        kills += 1
    training.join(30)
    assert done.is_set(), f"writer did not finish (seed {seed})"

    wandb_server.clear_faults()
    final = start_daemon("--config", str(config), env=online_env)

    def all_committed() -> bool:
        steps = {v.metadata.get("step") for v in wandb_server.versions("model", "chaos")
                 if v.state == "COMMITTED"}  # fmt: skip
        return len(steps) == CHECKPOINTS

    wait_until(all_committed, 120, f"all {CHECKPOINTS} versions (seed {seed})")
    wait_until(lambda: "0 pending" in ckptd_status(config, online_env), 30, "the queue to drain")
    assert final.stop() == 0, final.log()

    committed = [v for v in wandb_server.versions("model", "chaos") if v.state == "COMMITTED"]
    steps = [v.metadata["step"] for v in committed]
    assert sorted(steps) == list(range(1, CHECKPOINTS + 1)), f"seed {seed}: {steps}"
    for version in committed:
        name = f"ckpt_{version.metadata['step']:03d}.pt"
        source = hashlib.md5((root / name).read_bytes()).hexdigest()
        assert version.file_md5(name) == source, f"seed {seed}: {name}"
        assert f"step-{version.metadata['step']}" in version.aliases
    by_step = {v.metadata["step"]: v for v in committed}
    assert "latest" in by_step[CHECKPOINTS].aliases, f"seed {seed}"
    first_best = min(committed, key=lambda v: (losses[v.metadata["step"]], v.index))
    assert "best" in first_best.aliases, f"seed {seed}: best on {first_best.version}"
    holders = [v.version for v in wandb_server.versions("model", "chaos") if "best" in v.aliases]
    assert holders == [first_best.version], f"seed {seed}"
    assert kills >= 3, f"only {kills} kills happened (seed {seed})"


def _wait_quietly(condition: Callable[[], bool], timeout: float) -> None:
    """Wait for `condition` up to `timeout` seconds; carry on either way."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)


def test_kill_9_offline_loses_nothing_and_duplicates_nothing(
    tmp_path: Path, wandb_env: dict[str, str], start_daemon: Callable[..., Daemon]
) -> None:
    """Offline, 30 checkpoints, random SIGKILLs of ckptd (and, one time in three, of its
    wandb-core first): every .wandb file under the state dir together holds exactly one
    artifact record per checkpoint, with the source's md5 and its step alias, and `wandb
    sync` of every run directory uploads each checkpoint exactly once."""
    seed = int(os.environ.get("CKPTD_CHAOS_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    root = tmp_path / "ck"
    root.mkdir()
    config = tmp_path / "ckptd.yaml"
    config.write_text(OFFLINE_CONFIG)
    losses: dict[int, float] = {}
    done = threading.Event()
    training = threading.Thread(target=writer, args=(root, rng, losses, done), daemon=True)
    training.start()
    kills = 0
    deadline = time.monotonic() + 120
    while (not done.is_set() or kills < 8) and time.monotonic() < deadline:
        daemon = start_daemon("--config", str(config), env=wandb_env)
        _wait_quietly(lambda d=daemon: " as model:" in d.log(), 8)  # a run holds records
        time.sleep(rng.uniform(0.0, 2.0))
        if rng.random() < 1 / 3:
            for pid in _children(daemon.proc.pid):
                os.kill(pid, signal.SIGKILL)
        daemon.kill()
        kills += 1
    training.join(30)
    assert done.is_set(), f"writer did not finish (seed {seed})"

    final = start_daemon("--config", str(config), env=wandb_env)
    final.wait_for_log("ckptd started")
    wait_until(lambda: " 0 pending" in ckptd_status(config, wandb_env), 120, f"seed {seed}")
    assert final.stop() == 0, final.log()
    shown = ckptd_status(config, wandb_env)
    assert f"{CHECKPOINTS} published, 0 pending" in shown, f"seed {seed}: {shown}"
    records = artifacts(tmp_path / "state" / "wandb")
    steps = sorted(a.metadata["step"] for a in records)
    assert steps == list(range(1, CHECKPOINTS + 1)), f"seed {seed}: {steps}"
    for record in records:
        name = f"ckpt_{record.metadata['step']:03d}.pt"
        source = hashlib.md5((root / name).read_bytes()).digest()
        assert record.entries[name][0] == base64.b64encode(source).decode(), f"seed {seed}"
        assert f"step-{record.metadata['step']}" in record.aliases, f"seed {seed}"
    assert kills >= 3, f"only {kills} kills happened (seed {seed})"
    runs = sorted(str(p) for p in (tmp_path / "state" / "wandb").glob("offline-run-*"))
    with FakeWandbServer(storage_dir=tmp_path / "server") as server:  # what `wandb sync` uploads
        env = {**wandb_env, **server.env(tmp_path / "sync-env")}
        sync = subprocess.run(
            [str(Path(sys.executable).parent / "wandb"), "sync", *runs],
            env=env, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert sync.returncode == 0, sync.stdout + sync.stderr
        synced = sorted(v.metadata["step"] for v in server.versions("model", "chaos"))
    assert synced == list(range(1, CHECKPOINTS + 1)), f"seed {seed}: {synced}"


def _children(pid: int) -> list[int]:
    """The pids of the processes whose parent is `pid` (wandb-core, for ckptd), from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue
        if stat and int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found
