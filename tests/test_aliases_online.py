"""The common W&B checkpoint patterns as configuration, against the loopback W&B server:
every N steps, best only, best + latest, one best per metric; and `latest` kept on the
highest step when an older checkpoint lands late."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from tests.conftest import Daemon
from tests.support.checkpoints import renamed_in
from tests.support.fake_wandb import FakeWandbServer

PATTERNS = {
    "every-n": "aliases: {latest: true, templates: ['step-{step}'], best: []}",
    "best-only": "aliases: {latest: false, templates: [], best: [{metric: val_loss, alias: best}]}",
    "best-latest": (
        "aliases: {latest: true, templates: [], best: [{metric: val_loss, mode: min, alias: best}]}"
    ),
    "per-metric": (
        "aliases: {latest: true, templates: ['epoch-{epoch}'], best: ["
        "{metric: val_loss, mode: min}, {metric: val_accuracy, mode: max}, "
        "{metric: val_f1, mode: max, min_delta: 0.01}]}"
    ),
}
# step -> (val_loss, val_accuracy, val_f1)
HISTORY = {
    100: (0.90, 0.60, 0.50),
    200: (0.40, 0.70, 0.60),
    300: (0.40, 0.80, 0.605),  # ties val_loss (keeps 200); f1 within min_delta (keeps 200)
    400: (float("nan"), 0.75, 0.70),  # NaN never wins
}


def config(tmp_path: Path, server: FakeWandbServer, entries: dict[str, str]) -> Path:
    lines = [
        "state_dir: state",
        f'wandb: {{mode: online, project: patterns, base_url: "{server.url}"}}',
        "metrics: {listen: null}",
        "watch:",
    ]
    for name, aliases in entries.items():
        (tmp_path / name).mkdir()
        lines += [f"  - path: {name}", f"    artifact: {name}", "    settle: 1s",
                  "    sidecar: {wait: 5s}", f"    {aliases}"]  # fmt: skip
    path = tmp_path / "ckptd.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def write(root: Path, step: int, metrics: dict[str, float], epoch: int | None = None) -> None:
    renamed_in(root, f"ckpt_{step}.pt", 2000, step=step, epoch=epoch, metrics=metrics)


def holders(server: FakeWandbServer, name: str) -> dict[str, int]:
    """alias -> the step of the version holding it."""
    out = {}
    for version in server.versions(name, "patterns"):
        for alias in version.aliases:
            out[alias] = version.metadata["step"]
    return out


def test_the_four_patterns_end_with_the_expected_aliases(
    tmp_path: Path,
    wandb_server: FakeWandbServer,
    online_env: dict[str, str],
    start_daemon: Callable[..., Daemon],
) -> None:
    """Each pattern's aliases sit on the right versions after a run with ties, a NaN and a
    min_delta: step-N on every version, best on the first lowest loss, best-<metric> per rule,
    latest on the highest step."""
    daemon = start_daemon("--config", str(config(tmp_path, wandb_server, PATTERNS)), env=online_env)
    daemon.wait_for_log("ckptd started")
    for epoch, (step, (loss, acc, f1)) in enumerate(HISTORY.items(), start=1):
        for name in PATTERNS:
            write(tmp_path / name, step, {"val_loss": loss, "val_accuracy": acc, "val_f1": f1},
                  epoch=epoch)  # fmt: skip
    for name in PATTERNS:
        daemon.wait_for_log(f"ckpt_400.pt as {name}:v3", timeout=60)
    assert daemon.stop() == 0

    every_n = holders(wandb_server, "every-n")
    assert {a: s for a, s in every_n.items() if a.startswith("step-")} == {
        f"step-{s}": s for s in HISTORY
    }
    assert every_n["latest"] == 400

    best_only = holders(wandb_server, "best-only")
    assert best_only["best"] == 200
    assert not any(a.startswith("step-") for a in best_only)

    best_latest = holders(wandb_server, "best-latest")
    assert (best_latest["best"], best_latest["latest"]) == (200, 400)

    per_metric = holders(wandb_server, "per-metric")
    assert per_metric["best-val_loss"] == 200
    assert per_metric["best-val_accuracy"] == 300
    assert per_metric["best-val_f1"] == 400
    assert per_metric["latest"] == 400
    assert {a: s for a, s in per_metric.items() if a.startswith("epoch-")} == {
        "epoch-1": 100, "epoch-2": 200, "epoch-3": 300, "epoch-4": 400,
    }  # fmt: skip
    for name in PATTERNS:  # an alias is on one version only
        versions = wandb_server.versions(name, "patterns")
        seen = [a for v in versions for a in v.aliases]
        assert len(seen) == len(set(seen)), name


def test_latest_goes_back_to_the_highest_step_after_a_late_older_checkpoint(
    tmp_path: Path,
    wandb_server: FakeWandbServer,
    online_env: dict[str, str],
    start_daemon: Callable[..., Daemon],
) -> None:
    """An older checkpoint published after a newer one (found late) gets its own version,
    and `latest` is moved back to the highest step."""
    entries = {"late": PATTERNS["best-latest"]}
    daemon = start_daemon("--config", str(config(tmp_path, wandb_server, entries)), env=online_env)
    daemon.wait_for_log("ckptd started")
    write(tmp_path / "late", 10, {"val_loss": 0.5})
    daemon.wait_for_log("ckpt_10.pt as late:v0")
    write(tmp_path / "late", 5, {"val_loss": 0.1})
    daemon.wait_for_log("ckpt_5.pt as late:v1")
    daemon.wait_for_log("moved 'latest' back to v0")
    assert daemon.stop() == 0
    found = holders(wandb_server, "late")
    assert found["latest"] == 10
    assert found["best"] == 5


def test_empty_journal_keeps_best_and_latest_where_they_belong(
    tmp_path: Path,
    wandb_server: FakeWandbServer,
    online_env: dict[str, str],
    start_daemon: Callable[..., Daemon],
) -> None:
    """A new host (an empty state_dir) learns the best value and the highest step from W&B:
    a worse checkpoint does not take `best`, and an older one does not keep `latest`."""
    entries = {"fresh": PATTERNS["best-latest"]}
    path = config(tmp_path, wandb_server, entries)
    first = start_daemon("--config", str(path), env=online_env)
    first.wait_for_log("ckptd started")
    for step, loss in ((10, 0.5), (20, 0.2), (30, 0.4)):
        write(tmp_path / "fresh", step, {"val_loss": loss})
    first.wait_for_log("ckpt_30.pt as fresh:v2")
    assert first.stop() == 0
    shutil.rmtree(tmp_path / "state")
    for name in ("ckpt_10.pt", "ckpt_20.pt", "ckpt_30.pt"):  # the new host has only new files
        (tmp_path / "fresh" / name).unlink()
    second = start_daemon("--config", str(path), env=online_env)
    second.wait_for_log("ckptd started")
    write(tmp_path / "fresh", 25, {"val_loss": 0.3})  # worse than 0.2, older than step 30
    second.wait_for_log("ckpt_25.pt as fresh:v3")
    second.wait_for_log("moved 'latest' back to v2")
    write(tmp_path / "fresh", 40, {"val_loss": 0.25})  # newer, still worse
    second.wait_for_log("ckpt_40.pt as fresh:v4")
    assert second.stop() == 0
    assert "best is on v1 with val_loss=0.2 on W&B" in second.log()
    found = holders(wandb_server, "fresh")
    assert (found["best"], found["latest"]) == (20, 40)
