"""`ckptd promote ... --to huggingface:...` end to end: a real Hugging Face Trainer
checkpoint, published by the real daemon to the loopback W&B server, released with the real
`huggingface_hub` client on the loopback Hub server."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CKPTD
from tests.support.fake_hub import TOKEN, FakeHubServer
from tests.support.fake_wandb import FakeWandbServer

REPO = "org/demo"
MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors"}
TRAINING_STATE = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
                  "training_args.bin"}  # fmt: skip


@pytest.fixture
def hub() -> Iterator[FakeHubServer]:
    with FakeHubServer() as server:
        yield server


def ckptd(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CKPTD, *args], env=env, capture_output=True, text=True, timeout=120
    )  # fmt: skip


def test_a_trainer_checkpoint_is_released_once_with_its_model_files_only(
    tmp_path: Path,
    wandb_server: FakeWandbServer,
    online_env: dict[str, str],
    hub: FakeHubServer,
) -> None:
    """A `final: best` rule releases the best version when `--once` ends; and `ckptd promote
    model-checkpoint:best --to huggingface:org/demo` on a Trainer
    checkpoint: a private repo whose one commit holds exactly the model files, byte for
    byte, and a model card naming the step, the metric and the W&B version; tag step-N. Run
    again: no new commit. With the tag gone (a crash between commit and tag): still no new
    commit, the tag comes back on the same commit."""
    out = tmp_path / "out"
    subprocess.run(
        [sys.executable, "-m", "tests.support.trainers", "hf-trainer", str(out),
         str(tmp_path / "record.jsonl")],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    (checkpoint,) = out.iterdir()  # save_total_limit=1 keeps the last: checkpoint-12
    step = int(checkpoint.name.removeprefix("checkpoint-"))
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    eval_loss = [e["eval_loss"] for e in history if "eval_loss" in e][-1]
    assert {p.name for p in checkpoint.iterdir()} == MODEL_FILES | TRAINING_STATE

    config = tmp_path / "ckptd.yaml"
    config.write_text(
        "state_dir: state\n"
        f'wandb: {{mode: online, project: release, base_url: "{wandb_server.url}"}}\n'
        f'huggingface: {{endpoint: "{hub.url}"}}\n'
        "metrics: {listen: null}\n"
        "watch:\n"
        f"  - path: {out}\n"
        "    artifact: model-checkpoint\n"
        "    format: hf-trainer\n"
        "    settle: 1s\n"
        "    aliases: {best: [{metric: eval_loss, mode: min, alias: best}]}\n"
        "    promote: [{when: {final: best}, to: 'huggingface:org/final'}]\n"
    )
    env = {**online_env, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(tmp_path / "hf-home")}  # fmt: skip
    published = ckptd("run", "--config", str(config), "--once", env=env)
    assert published.returncode == 0, published.stdout + published.stderr
    assert wandb_server.alias_holder("model-checkpoint", "best") == "v0"
    # The daemon's own `final: best` rule released the same version before --once exited.
    final = hub.repo("org/final")
    assert final is not None and len(final.commits) == 1
    assert set(final.commits[0].files) == MODEL_FILES | {"README.md"}
    assert final.tags == {f"step-{step}": final.commits[0].oid}

    promote = ["promote", "--config", str(config), "model-checkpoint:best",
               "--to", f"huggingface:{REPO}"]  # fmt: skip
    first = ckptd(*promote, env=env)
    assert first.returncode == 0, first.stderr
    assert f"released model-checkpoint:v0 on {REPO} (committed" in first.stdout

    repo = hub.repo(REPO)
    assert repo is not None and repo.private
    (commit,) = repo.commits
    assert set(commit.files) == MODEL_FILES | {"README.md"}
    for name in MODEL_FILES:
        assert commit.files[name] == (checkpoint / name).read_bytes(), name
    card = commit.files["README.md"].decode()
    assert f"step {step}" in card
    assert f"| eval_loss | {eval_loss} |" in card
    assert "fake-entity/release/model-checkpoint:v0" in card
    assert commit.title.startswith(f"step {step}: eval_loss={eval_loss}, ")
    assert commit.title.endswith(" (W&B fake-entity/release/model-checkpoint:v0)")
    assert repo.tags == {f"step-{step}": commit.oid}

    again = ckptd(*promote, env=env)
    assert again.returncode == 0, again.stderr
    assert f"has step-{step} already" in again.stdout
    repo = hub.repo(REPO)
    assert repo is not None and len(repo.commits) == 1

    hub.drop_tag(REPO, f"step-{step}")
    after_crash = ckptd(*promote, env=env)
    assert after_crash.returncode == 0, after_crash.stderr
    assert "nothing changed since" in after_crash.stdout
    repo = hub.repo(REPO)
    assert repo is not None and len(repo.commits) == 1
    assert repo.tags == {f"step-{step}": commit.oid}
    for result in (first, again, after_crash):
        assert TOKEN not in result.stdout + result.stderr
