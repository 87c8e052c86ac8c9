"""The promotion-target contract (ckptd/sinks/promotion.py), run against every target: the
W&B Registry on the loopback W&B server, the Hugging Face Hub on the loopback Hub server.

Each target, driven in its own process (the wandb SDK's services stay out of the test):
promoting the same version twice changes nothing the second time; a version that does not
exist is refused for that version alone (`PromotionRefused`); bad credentials are a
permanent error; a server error is a transient one (Hub; the wandb SDK retries those
itself first); and the credentials never appear in an error."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from tests.conftest import CKPTD
from tests.support.fake_hub import TOKEN, FakeHubServer
from tests.support.fake_wandb import API_KEY, FakeWandbServer

DRIVER = """
import json, sys
from ckptd.config import load_config
from ckptd.errors import PromotionRefused, PublishError
from ckptd.sinks import factory
from ckptd.sinks.promotion import Promotion

config = load_config(sys.argv[1])
target = factory.promotion_target(config, sys.argv[2], factory.api_key(config))
answer = {}
try:
    answer["result"] = target.promote(Promotion(
        collection="model-checkpoint", type="model", version=sys.argv[3],
        step=int(sys.argv[3].removeprefix("v")),
        aliases=("candidate",) if sys.argv[2].startswith("registry:") else (),
    ))
except PublishError as exc:
    answer = {"error": str(exc), "transient": exc.transient,
              "refused": isinstance(exc, PromotionRefused)}
finally:
    target.close()
print("ANSWER " + json.dumps(answer))
"""


@pytest.fixture
def hub() -> Iterator[FakeHubServer]:
    with FakeHubServer() as server:
        yield server


@pytest.fixture
def published(
    tmp_path: Path, wandb_server: FakeWandbServer, online_env: dict[str, str], hub: FakeHubServer
) -> tuple[Path, dict[str, str]]:
    """One `save_pretrained()`-shaped checkpoint published as model-checkpoint:v0; the
    config and the environment that reach both loopback servers."""
    model = tmp_path / "ckpts" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    save_file({"wte": np.arange(64, dtype=np.float32).reshape(8, 8)}, model / "model.safetensors")
    config = tmp_path / "ckptd.yaml"
    config.write_text(
        "state_dir: state\n"
        f'wandb: {{mode: online, project: contract, base_url: "{wandb_server.url}"}}\n'
        f'huggingface: {{endpoint: "{hub.url}"}}\n'
        "metrics: {listen: null}\n"
        "watch:\n"
        f"  - {{path: {tmp_path / 'ckpts'}, format: hf-pretrained, settle: 1s, "
        "sidecar: {expect: never}}\n"
    )
    env = {**online_env, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(tmp_path / "hf-home")}  # fmt: skip
    run = subprocess.run([*CKPTD, "run", "--config", str(config), "--once"], env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert wandb_server.version("model-checkpoint", "v0") is not None
    return config, env


def promote(config: Path, env: dict[str, str], spec: str, version: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, str(config), spec, version], env=env,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    lines = [x for x in done.stdout.splitlines() if x.startswith("ANSWER ")]
    assert done.returncode == 0 and lines, done.stdout + done.stderr
    answer: dict[str, Any] = json.loads(lines[-1].removeprefix("ANSWER "))
    for secret in (API_KEY, TOKEN):
        assert secret not in done.stdout + done.stderr
    return answer


@pytest.mark.parametrize("spec", ["registry:wandb-registry-model/demo", "huggingface:org/demo"])
def test_every_target_keeps_the_promotion_contract(
    spec: str,
    published: tuple[Path, dict[str, str]],
    wandb_server: FakeWandbServer,
    hub: FakeHubServer,
) -> None:
    """Idempotent; a refusal per version; bad credentials permanent; 5xx transient."""
    config, env = published
    first = promote(config, env, spec, "v0")
    assert "result" in first, first
    again = promote(config, env, spec, "v0")
    assert "already" in again["result"], again
    if spec.startswith("registry:"):
        assert len(wandb_server.registry("wandb-registry-model/demo")) == 1
    else:
        repo = hub.repo("org/demo")
        assert repo is not None and len(repo.commits) == 1

    missing = promote(config, env, spec, "v9")
    assert (missing["refused"], missing["transient"]) == (True, False), missing
    assert "does not exist" in missing["error"]

    bad = {"registry": {"WANDB_API_KEY": "x" * 40}, "huggingface": {"HF_TOKEN": "hf_wrong"}}
    denied = promote(config, {**env, **bad[spec.partition(":")[0]]}, spec, "v0")
    assert (denied["refused"], denied["transient"]) == (False, False), denied

    if spec.startswith("huggingface:"):
        # (The wandb SDK retries a 5xx itself for about a minute before the target sees
        # it, then as a transient error: measured, too slow to repeat here.)
        hub.fail("GET", "/api/models/org/demo/refs", 503, times=50)
        failing = promote(config, env, spec, "v0")
        assert (failing["refused"], failing["transient"]) == (False, True), failing
