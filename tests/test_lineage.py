"""Lineage: a version is recorded as an output of the training run named by `run_path` (sidecar
or config), besides ckptd's upload run, without changing its aliases; a run that cannot take
it costs one warning and never the version; malformed run paths are refused where they are
read."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from ckptd import sidecar
from ckptd.config import load_config
from ckptd.errors import ConfigError, SidecarError
from tests.conftest import Daemon
from tests.support.fake_wandb import DEFAULT_ENTITY, FakeWandbServer

PROJECT = "spine"
TRAIN = f"{DEFAULT_ENTITY}/{PROJECT}/train-7"
LOSSES = {1: 0.9, 2: 0.2, 3: 0.5}
# What the first two and all three checkpoints above end with, lineage or not.
ALIASES_2 = [{"step-1"}, {"step-2", "best", "latest"}]
ALIASES_3 = [{"step-1"}, {"step-2", "best"}, {"step-3", "latest"}]

WATCH = """\
  - path: {path}
    artifact: {artifact}
    settle: 1s
    sidecar: {{wait: 10s}}
    aliases:
      templates: ["step-{{step}}"]
      best: [{{metric: val_loss, mode: min, alias: best}}]
"""
ONLINE = """\
state_dir: state
wandb: {{mode: online, project: spine, base_url: "{url}"}}
metrics: {{listen: null}}
upload: {{retry: {{initial_delay: 200ms, max_delay: 2s}}}}
watch:
"""


def write_by_rename(root: Path, name: str, payload: bytes) -> Path:
    """Write a zip checkpoint under a temp name and rename it into place."""
    tmp, final = root / f".{name}.tmp", root / name
    with zipfile.ZipFile(tmp, "w") as z:
        z.writestr("data.pkl", payload)
    os.replace(tmp, final)
    return final


def checkpoint(root: Path, step: int, run_path: str | None) -> None:
    """Checkpoint `ckpt_<step>.pt` with its sidecar (val_loss from LOSSES) under `root`."""
    name = f"ckpt_{step}.pt"
    sidecar.write(root / name, step=step, metrics={"val_loss": LOSSES[step]}, run_path=run_path)
    write_by_rename(root, name, os.urandom(4000 + step))


def start(
    tmp_path: Path,
    start_daemon: Callable[..., Daemon],
    env: dict[str, str],
    head: str,
    watches: dict[str, str],
    run_path: str | None = None,
) -> Daemon:
    """Start ckptd with one watch entry per `{directory: artifact}` (each with `run_path`)."""
    body = head
    for path, artifact in watches.items():
        body += WATCH.format(path=path, artifact=artifact)
        if run_path is not None:
            body += f"    run_path: {run_path}\n"
        (tmp_path / path).mkdir()
    config = tmp_path / "ckptd.yaml"
    config.write_text(body)
    daemon = start_daemon("--config", str(config), env=env)
    daemon.wait_for_log("ckptd started")
    return daemon


def upload_run(server: FakeWandbServer, collection: str) -> str:
    """The id of ckptd's upload run for `collection`."""
    (found,) = [r for r in server.runs() if r.display_name == f"ckptd-{collection}"]
    assert found.job_type == "checkpoint-upload"
    return found.name


def warnings_naming(daemon: Daemon, text: str) -> list[str]:
    """The WARNING lines of the daemon's log that contain `text`."""
    return [line for line in daemon.log().splitlines() if " WARNING " in line and text in line]


def test_sidecar_run_path_adds_the_training_run_and_leaves_aliases_as_without_lineage(
    tmp_path: Path,
    wandb_server: FakeWandbServer,
    online_env: dict[str, str],
    start_daemon: Callable[..., Daemon],
) -> None:
    """Three checkpoints whose sidecars name an existing training run become versions that
    are outputs of both that run and ckptd's upload run, with exactly the aliases that the
    same checkpoints without a run path get in a second watch of the same daemon."""
    wandb_server.create_run(DEFAULT_ENTITY, PROJECT, "train-7")
    head = ONLINE.format(url=wandb_server.url)
    daemon = start(tmp_path, start_daemon, online_env, head, {"ck": "linked", "plain": "plain"})
    for step in LOSSES:
        checkpoint(tmp_path / "ck", step, TRAIN)
        checkpoint(tmp_path / "plain", step, None)
    daemon.wait_for_log("ckpt_3.pt as linked:v2")
    daemon.wait_for_log("ckpt_3.pt as plain:v2")
    assert daemon.stop() == 0, daemon.log()

    linked = wandb_server.versions("linked", PROJECT)
    plain = wandb_server.versions("plain", PROJECT)
    assert [v.aliases for v in linked] == [v.aliases for v in plain] == ALIASES_3
    uploader = upload_run(wandb_server, "linked")
    assert [v.output_runs for v in linked] == [{uploader, "train-7"}] * 3
    assert all(v.run == uploader and v.state == "COMMITTED" for v in linked)
    assert [v.output_runs for v in plain] == [{upload_run(wandb_server, "plain")}] * 3
    assert wandb_server.created_versions == 6
    assert daemon.log().count(f"as an output of run {TRAIN}") == 3
    assert warnings_naming(daemon, TRAIN) == []
    assert wandb_server.unknown_operations == []


def test_config_run_path_applies_and_a_sidecar_run_path_wins(
    tmp_path: Path,
    wandb_server: FakeWandbServer,
    online_env: dict[str, str],
    start_daemon: Callable[..., Daemon],
) -> None:
    """A watch's `run_path` makes the training run an output of checkpoints whose sidecar
    names none; a sidecar's own `run_path` takes precedence over it."""
    wandb_server.create_run(DEFAULT_ENTITY, PROJECT, "train-7")
    wandb_server.create_run(DEFAULT_ENTITY, PROJECT, "train-9")
    head = ONLINE.format(url=wandb_server.url)
    daemon = start(
        tmp_path, start_daemon, online_env, head, {"ck": "model"}, f"{DEFAULT_ENTITY}/spine/train-9"
    )
    checkpoint(tmp_path / "ck", 1, None)
    checkpoint(tmp_path / "ck", 2, TRAIN)
    daemon.wait_for_log("ckpt_2.pt as model:v1")
    assert daemon.stop() == 0, daemon.log()

    uploader = upload_run(wandb_server, "model")
    versions = wandb_server.versions("model", PROJECT)
    assert [v.output_runs for v in versions] == [{uploader, "train-9"}, {uploader, "train-7"}]
    assert [v.aliases for v in versions] == ALIASES_2
    assert {r.name: r.logged_artifacts for r in wandb_server.runs()}["train-9"] == (versions[0].id,)


def test_a_run_that_cannot_take_the_version_costs_one_warning_and_never_the_version(
    tmp_path: Path,
    wandb_server: FakeWandbServer,
    online_env: dict[str, str],
    start_daemon: Callable[..., Daemon],
) -> None:
    """A run path to a run that does not exist, or to a run of another project, still
    publishes the version with its aliases; each costs exactly one warning naming the run
    path and the reason, and the version is an output of the upload run only."""
    wandb_server.create_run(DEFAULT_ENTITY, "elsewhere", "train-7")
    ghost, foreign = f"{DEFAULT_ENTITY}/{PROJECT}/ghost", f"{DEFAULT_ENTITY}/elsewhere/train-7"
    head = ONLINE.format(url=wandb_server.url)
    daemon = start(tmp_path, start_daemon, online_env, head, {"ck": "model"})
    checkpoint(tmp_path / "ck", 1, ghost)
    checkpoint(tmp_path / "ck", 2, foreign)
    daemon.wait_for_log("ckpt_2.pt as model:v1")
    assert daemon.stop() == 0, daemon.log()

    versions = wandb_server.versions("model", PROJECT)
    assert [(v.version, v.state) for v in versions] == [("v0", "COMMITTED"), ("v1", "COMMITTED")]
    assert [v.aliases for v in versions] == ALIASES_2
    assert [v.output_runs for v in versions] == [{upload_run(wandb_server, "model")}] * 2
    (missing,) = warnings_naming(daemon, ghost)
    assert "model:v0 is published" in missing and "Could not find run" in missing
    (other,) = warnings_naming(daemon, foreign)
    assert f"not in {DEFAULT_ENTITY}/{PROJECT}" in other
    assert wandb_server.unknown_operations == []


def test_offline_says_once_per_run_path_that_lineage_is_skipped(
    tmp_path: Path, wandb_env: dict[str, str], start_daemon: Callable[..., Daemon]
) -> None:
    """Offline, two checkpoints naming the same training run are published and the skipped
    lineage is reported once for that run path."""
    head = "state_dir: state\nwandb: {mode: offline, project: spine}\n"
    head += "metrics: {listen: null}\nwatch:\n"
    daemon = start(tmp_path, start_daemon, wandb_env, head, {"ck": "model"})
    checkpoint(tmp_path / "ck", 1, TRAIN)
    checkpoint(tmp_path / "ck", 2, TRAIN)
    daemon.wait_for_log("ckpt_2.pt as model:<offline>")
    assert daemon.stop() == 0, daemon.log()
    (skipped,) = warnings_naming(daemon, TRAIN)
    assert "offline mode" in skipped


MALFORMED = ["spine/train-7", "e/p/r/x", "e//r", "/p/r", "e/p/", " e/p/r", ""]


@pytest.mark.parametrize("run_path", MALFORMED)
def test_config_refuses_a_malformed_run_path_naming_the_key(tmp_path: Path, run_path: str) -> None:
    """A watch `run_path` that is not entity/project/run_id is a config error naming the key
    path, the expected shape and the value."""
    config = tmp_path / "ckptd.yaml"
    config.write_text(f"watch:\n  - path: ck\n    run_path: {run_path!r}\n")
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert info.value.problems == [
        "watch[0].run_path: a run path is entity/project/run_id (three non-empty parts), "
        f"got {run_path!r}"
    ]


@pytest.mark.parametrize("run_path", MALFORMED)
def test_sidecar_refuses_a_malformed_run_path_naming_the_file(
    tmp_path: Path, run_path: str
) -> None:
    """A sidecar `run_path` that is not entity/project/run_id raises SidecarError naming the
    file and the value."""
    path = tmp_path / "ckpt_1.pt.metrics.json"
    with pytest.raises(SidecarError) as info:
        sidecar.parse(f'{{"step": 1, "run_path": "{run_path}"}}'.encode(), path)
    assert str(info.value) == (
        f"{path}: 'run_path' must be entity/project/run_id (three non-empty parts), "
        f"got {run_path!r}"
    )


def test_well_formed_run_paths_are_accepted_by_config_and_sidecar(tmp_path: Path) -> None:
    """`entity/project/run_id` passes both the config and the sidecar reader unchanged."""
    config = tmp_path / "ckptd.yaml"
    config.write_text(f"watch:\n  - path: ck\n    run_path: {TRAIN}\n")
    assert load_config(config).watch[0].run_path == TRAIN
    parsed = sidecar.parse(f'{{"run_path": "{TRAIN}"}}'.encode(), tmp_path / "s.json")
    assert parsed["run_path"] == TRAIN
