"""Promotion to the W&B Registry, end to end: the real daemon, the real wandb SDK, the
loopback W&B server's `LinkArtifact` and registry collections; and a kill -9 between the
publish and the link."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.conftest import Daemon, ckptd_status, wait_until
from tests.support.checkpoints import renamed_in
from tests.support.fake_wandb import DEFAULT_ORG, FakeWandbServer
from tests.test_fake_wandb_server import run_sdk

REGISTRY = "wandb-registry-model/demo"
# step -> val_loss: best lands on steps 1, 2, 4, 6 and 9.
LOSSES = {1: 0.9, 2: 0.8, 3: 0.85, 4: 0.7, 5: 0.75, 6: 0.6, 7: 0.65, 8: 0.66, 9: 0.5, 10: 0.55}
EVER_BEST = [1, 2, 4, 6, 9]


def config(tmp_path: Path, server: FakeWandbServer) -> Path:
    (tmp_path / "ckpts").mkdir()
    path = tmp_path / "ckptd.yaml"
    path.write_text(
        "state_dir: state\n"
        f'wandb: {{mode: online, project: promo, base_url: "{server.url}"}}\n'
        "upload: {retry: {initial_delay: 1s, max_delay: 5s}}\n"
        "metrics: {listen: null}\n"
        "watch:\n"
        "  - path: ckpts\n"
        "    artifact: model-checkpoint\n"
        "    settle: 1s\n"
        "    sidecar: {wait: 5s, expect: always}\n"
        "    aliases: {best: [{metric: val_loss, mode: min, alias: best}]}\n"
        "    promote:\n"
        f"      - {{when: {{alias: best}}, to: 'registry:{REGISTRY}', aliases: [candidate]}}\n"
    )
    return path


def write(root: Path, step: int) -> None:
    renamed_in(root, f"ckpt_{step}.pt", 1000, step=step, metrics={"val_loss": LOSSES[step]})


def links_of(server: FakeWandbServer) -> int:
    return server.operations().count("LinkArtifact")


def test_every_best_version_is_linked_once_even_across_a_kill(
    tmp_path: Path,
    wandb_server: FakeWandbServer,
    online_env: dict[str, str],
    start_daemon: Callable[..., Daemon],
) -> None:
    """Ten checkpoints with a rule "when best lands, link with alias candidate": the registry
    collection holds exactly the versions that were ever best, in order, `candidate` on the
    last (as the fake's state and as the SDK lists the registry collection); ckptd killed -9
    after the server took a link but before it answered links that version once, not
    twice, after the restart."""
    path, root = config(tmp_path, wandb_server), tmp_path / "ckpts"
    first = start_daemon("--config", str(path), env=online_env)
    first.wait_for_log("ckptd started")
    for step in range(1, 6):
        write(root, step)
    first.wait_for_log("promoted model-checkpoint:v3 to registry", timeout=60)  # step 4
    assert links_of(wandb_server) == 3

    # The server links step 6, then holds its answer: ckptd dies waiting for it.
    stall = wandb_server.inject("LinkArtifact", delay=120, after=True)
    write(root, 6)
    wait_until(lambda: stall.hits >= 1, 60, "the link of step 6 to reach the server")
    wait_until(lambda: len(wandb_server.registry(REGISTRY)) == 4, 10, "step 6 linked")
    first.kill()
    wandb_server.clear_faults()
    assert "pending model-checkpoint:v5 (step 6)" in ckptd_status(path, online_env)

    second = start_daemon("--config", str(path), env=online_env)
    second.wait_for_log("model-checkpoint:v5 is linked to")  # found linked: not again
    for step in range(7, 11):
        write(root, step)
    second.wait_for_log("promoted model-checkpoint:v8 to registry", timeout=60)  # step 9
    second.wait_for_log("ckpt_10.pt as model-checkpoint:v9")
    assert second.stop() == 0

    members = wandb_server.registry(REGISTRY)
    assert [m.metadata["step"] for m in members] == EVER_BEST
    assert [m.version for m in members] == [f"v{i}" for i in range(len(EVER_BEST))]
    assert [m.source for m in members] == [f"model-checkpoint:v{s - 1}" for s in EVER_BEST]
    holders = {alias: m.metadata["step"] for m in members for alias in m.aliases}
    assert holders == {"candidate": 9, "latest": 9}
    assert links_of(wandb_server) == len(EVER_BEST)  # the killed one was sent once
    listed = run_sdk(tmp_path, f"""
        import wandb
        registry = wandb.Api().artifact_collection("model", "{DEFAULT_ORG}/{REGISTRY}")
        arts = list(registry.artifacts())
        emit(steps=[a.metadata["step"] for a in arts], aliases=[sorted(a.aliases) for a in arts])
    """, **online_env)  # fmt: skip
    assert listed["steps"] == EVER_BEST[::-1]  # as the SDK lists them: newest first
    assert listed["aliases"] == [["candidate", "latest"]] + [[]] * (len(EVER_BEST) - 1)
    assert wandb_server.unknown_operations == []
    status = ckptd_status(path, online_env)
    assert f"promote registry:{REGISTRY}: 5 done, 0 pending, 0 failed" in status
