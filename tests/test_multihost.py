"""Multi-node jobs: three ckptd daemons on one machine stand in for three hosts (separate
state dirs, separate watch dirs, one config with the rank from the environment), each holding
only its own ranks' files; every step ends as one committed version holding the union of the
hosts' files, through the real SDK's distributed artifacts against the loopback server."""

from __future__ import annotations

import os
import random
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Daemon, ckptd_status, wait_until
from tests.support.fake_wandb import FakeWandbServer, VersionInfo
from tests.support.multihost import LAYOUTS, md5_hex, write_part

HOSTS = 3
PROJECT = "multi"
COLLECTION = {"dcp": "dcp-model", "ds": "ds-model"}
CONFIG = """\
state_dir: state-${{HOST_RANK}}
wandb: {{mode: online, project: {project}, base_url: "{url}"}}
metrics: {{listen: {listen}}}
upload: {{workers: 2, retry: {{initial_delay: 200ms, max_delay: 1s}}, shutdown_timeout: 5s}}
watch:
"""
ENTRY = """\
  - path: hosts/${{HOST_RANK}}/{layout}
    artifact: {collection}
    format: {format}
    settle: 500ms
    distributed: {{rank: "${{HOST_RANK}}", timeout: {timeout}{rendezvous}}}
    aliases:
      templates: ["step-{{step}}"]
      best: [{{metric: val_loss, mode: min, alias: best}}]
"""
FORMAT = {"dcp": "torch-dcp", "ds": "deepspeed"}


def write_config(
    tmp_path: Path,
    url: str,
    layouts: tuple[str, ...],
    timeout: str,
    listen: str = "null",
    rendezvous: str | None = None,
) -> Path:
    text = CONFIG.format(project=PROJECT, url=url, listen=listen)
    for layout in layouts:
        text += ENTRY.format(
            layout=layout, collection=COLLECTION[layout], format=FORMAT[layout], timeout=timeout,
            rendezvous=f", rendezvous: {rendezvous}" if rendezvous else "",
        )  # fmt: skip
    config = tmp_path / "ckptd.yaml"
    config.write_text(text.replace("{{", "{").replace("}}", "}"))
    for host in range(HOSTS):
        for layout in layouts:
            (tmp_path / "hosts" / str(host) / layout).mkdir(parents=True, exist_ok=True)
    return config


def host_env(online_env: dict[str, str], host: int) -> dict[str, str]:
    """The environment of host `host`: group and host count as SLURM sets them, the rank
    through the config's `${HOST_RANK}`."""
    return {**online_env, "HOST_RANK": str(host), "SLURM_JOB_ID": "4242", "SLURM_NNODES": "3"}


def committed(server: FakeWandbServer, layout: str) -> list[VersionInfo]:
    return [
        v for v in server.versions(COLLECTION[layout], PROJECT) if v.state == "COMMITTED"
    ]  # fmt: skip


def check_versions(
    server: FakeWandbServer,
    layout: str,
    sources: dict[int, list[Path]],
    losses: dict[int, float],
    steps: list[int],
) -> None:
    """Each step in `steps` is one committed version of the layout's collection, holding
    exactly the union of every host's files with their md5s; `latest` is on the highest
    step, `best` on the first lowest val_loss, `step-N` on each."""
    versions = committed(server, layout)
    by_step = {v.metadata["step"]: v for v in versions}
    assert sorted(v.metadata["step"] for v in versions) == steps, [v.metadata for v in versions]
    for step in steps:
        version = by_step[step]
        files = {path.name: path for path in sources[step]}
        assert version.manifest is not None
        assert set(version.manifest["contents"]) == set(files), (step, version.manifest)
        for name, path in files.items():
            assert version.file_md5(name) == md5_hex(path), (step, name)
        assert f"step-{step}" in version.aliases
        assert version.metadata["metrics"]["val_loss"] == losses[step]  # from another host
    assert "latest" in by_step[max(steps)].aliases
    best = min(steps, key=lambda s: (losses[s], s))
    holders = [v.metadata["step"] for v in versions if "best" in v.aliases]
    assert holders == [best], (holders, losses)


def write_step(
    tmp_path: Path,
    step: int,
    loss: float,
    rng: random.Random,
    layouts: tuple[str, ...],
    sources: dict[str, dict[int, list[Path]]],
    hosts: tuple[int, ...] = (0, 1, 2),
) -> None:
    for layout in layouts:
        for host in hosts:
            root = tmp_path / "hosts" / str(host) / layout
            written = write_part(root, layout, host, HOSTS, step, loss, rng)
            sources[layout].setdefault(step, []).extend(written)


LOSSES = {1: 0.5, 2: 0.3, 3: 0.4, 4: 0.3, 5: 0.35, 6: 0.1, 7: 0.45}


def test_three_hosts_commit_one_version_per_step_for_dcp_and_deepspeed(
    tmp_path: Path,
    wandb_server: FakeWandbServer,
    online_env: dict[str, str],
    start_daemon: Callable[..., Daemon],
) -> None:
    """Three daemons, each with its own ranks' DCP shards (`.metadata` on rank 0's host
    only) and DeepSpeed ZeRO shards (model states and `latest` on rank 0's host only), five
    steps: exactly five committed versions per layout, each the union of the three hosts'
    files with their md5s, `latest` on step 5, `best` on the first lowest val_loss (given
    by a host that is not the finisher), `step-N` on each."""
    config = write_config(tmp_path, wandb_server.url, LAYOUTS, timeout="20s")
    rng = random.Random(16)
    sources: dict[str, dict[int, list[Path]]] = {layout: {} for layout in LAYOUTS}
    daemons = [
        start_daemon("--config", str(config), env=host_env(online_env, host))
        for host in range(HOSTS)
    ]
    for step in range(1, 6):
        write_step(tmp_path, step, LOSSES[step], rng, LAYOUTS, sources)
        time.sleep(0.3)

    def all_in() -> bool:
        return all(len(committed(wandb_server, layout)) >= 5 for layout in LAYOUTS)

    wait_until(all_in, 90, "five committed versions per layout")
    for host, daemon in enumerate(daemons):  # the others see the commits and settle too

        def settled(host: int = host) -> bool:
            status = ckptd_status(config, host_env(online_env, host))
            return all(f"{COLLECTION[x]}: 5 published, 0 pending" in status for x in LAYOUTS)

        wait_until(settled, 30, f"host {host}'s queue")
        assert daemon.stop() == 0, daemon.log()
    for layout in LAYOUTS:
        check_versions(wandb_server, layout, sources[layout], LOSSES, [1, 2, 3, 4, 5])
        assert len(wandb_server.versions(COLLECTION[layout], PROJECT)) == 5  # nothing pending
    assert wandb_server.created_versions == 10
    # Every host's record run is in the job's group, and recorded each step's part.
    records = [r for r in wandb_server.runs() if r.job_type == "ckptd-parts"]
    assert len(records) == HOSTS * len(LAYOUTS)
    assert {r.group for r in records} == {"slurm-4242"}
    for host in range(HOSTS):
        status = ckptd_status(config, host_env(online_env, host))
        for layout in LAYOUTS:
            assert f"{COLLECTION[layout]}: 5 published, 0 pending, 0 failed" in status, status


@pytest.mark.parametrize("rendezvous", ["wandb", "directory"])
def test_a_host_that_never_writes_a_step_leaves_it_unpublished_and_later_steps_go_on(
    tmp_path: Path,
    wandb_server: FakeWandbServer,
    online_env: dict[str, str],
    start_daemon: Callable[..., Daemon],
    rendezvous: str,
) -> None:
    """Host 2 never writes step 6: after `timeout` the finisher commits nothing for step 6,
    logs one WARNING naming rank 2 and the step, `status` and /metrics show it, and step 7
    is published with `latest`; with the hosts' records in W&B, or in a directory they all
    share (`distributed.rendezvous`)."""
    shared = "shared-rendezvous" if rendezvous == "directory" else None
    config = write_config(
        tmp_path, wandb_server.url, ("dcp",), timeout="4s", listen="auto", rendezvous=shared
    )
    rng = random.Random(6)
    sources: dict[str, dict[int, list[Path]]] = {"dcp": {}}
    daemons = [
        start_daemon("--config", str(config), env=host_env(online_env, host))
        for host in range(HOSTS)
    ]
    write_step(tmp_path, 5, LOSSES[5], rng, ("dcp",), sources)
    wait_until(lambda: len(committed(wandb_server, "dcp")) == 1, 60, "step 5")
    write_step(tmp_path, 6, LOSSES[6], rng, ("dcp",), sources, hosts=(0, 1))
    write_step(tmp_path, 7, LOSSES[7], rng, ("dcp",), sources)
    wait_until(lambda: len(committed(wandb_server, "dcp")) == 2, 60, "step 7")
    check_versions(wandb_server, "dcp", sources["dcp"], LOSSES, [5, 7])

    finisher = daemons[0]
    warnings = [
        line for line in finisher.log().splitlines() if "WARNING" in line and "step 6" in line
    ]
    assert len(warnings) == 1, finisher.log()
    assert "rank 2 of 3 did not arrive" in warnings[0] and "step_6" in warnings[0], warnings
    wait_until(  # the commit landed; the finisher's journal follows a moment later
        lambda: (
            "dcp-model: 2 published, 0 pending, 1 failed"
            in ckptd_status(config, host_env(online_env, 0))
        ),
        30,
        "the finisher's journal",
    )
    status = ckptd_status(config, host_env(online_env, 0))
    assert "step 6: rank 2 of 3 did not arrive" in status, status
    address = (tmp_path / "state-0" / "metrics.address").read_text().strip()
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        exposition = response.read().decode()
    assert (
        'ckptd_checkpoints_dropped_total{collection="dcp-model",reason="partial"} 1.0' in exposition
    )
    # The host that did write step 6 learns it was given up from the finisher's record.
    wait_until(
        lambda: (
            "step 6: the finisher (rank 0) gave it up: rank 2 of 3 did not arrive"
            in ckptd_status(config, host_env(online_env, 1))
        ),
        30,
        "host 1 to give step 6 up",
    )
    records = [r for r in wandb_server.runs() if r.job_type == "ckptd-parts"]
    if shared is not None:
        assert records == []
        (group,) = (tmp_path / shared).iterdir()
        assert sorted(p.name for p in group.iterdir()) == [f"rank-{h}.json" for h in range(3)]
    else:
        assert len(records) == HOSTS
    for daemon in daemons:
        assert daemon.stop() == 0, daemon.log()


def test_kill_9_of_one_host_and_server_faults_still_commit_each_step_once(
    tmp_path: Path,
    wandb_server: FakeWandbServer,
    online_env: dict[str, str],
    start_daemon: Callable[..., Daemon],
) -> None:
    """One host's daemon (a random rank each time) is killed with SIGKILL at six random
    moments and restarted while the hosts write five steps of both layouts and 10% of the
    server's requests fail: still exactly five committed versions per layout, each the union
    of every host's files, nothing committed twice or partially."""
    seed = int(os.environ.get("CKPTD_CHAOS_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    config = write_config(tmp_path, wandb_server.url, LAYOUTS, timeout="30s")
    sources: dict[str, dict[int, list[Path]]] = {layout: {} for layout in LAYOUTS}
    wandb_server.fail_randomly(0.10, seed)
    daemons = {
        host: start_daemon("--config", str(config), env=host_env(online_env, host))
        for host in range(HOSTS)
    }
    kills = 0
    for step in range(1, 7):
        if step <= 5:
            write_step(tmp_path, step, LOSSES[step], rng, LAYOUTS, sources)
        time.sleep(rng.uniform(0.3, 3.0))  # upserting, waiting, committing, restarting...
        victim = rng.randrange(HOSTS)
        daemons[victim].kill()
        kills += 1
        daemons[victim] = start_daemon("--config", str(config), env=host_env(online_env, victim))

    def all_in() -> bool:
        return all(len(committed(wandb_server, layout)) >= 5 for layout in LAYOUTS)

    wait_until(all_in, 150, f"five committed versions per layout (seed {seed})")
    wandb_server.clear_faults()
    for layout in LAYOUTS:
        check_versions(wandb_server, layout, sources[layout], LOSSES, [1, 2, 3, 4, 5])
        versions = wandb_server.versions(COLLECTION[layout], PROJECT)
        assert [v.state for v in versions] == ["COMMITTED"] * 5, f"seed {seed}: {versions}"
    assert wandb_server.created_versions == 10, f"seed {seed}"
    assert kills == 6
    for daemon in daemons.values():
        daemon.stop()
