"""`ckptd restore` against the loopback W&B server: fallback chain, digests, first start."""

from __future__ import annotations

import os
import subprocess
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ckptd import sidecar
from ckptd.config import load_config
from ckptd.restore import has_checkpoint, version_ref
from ckptd.sinks.factory import restore_config
from tests.conftest import CKPTD
from tests.support.fake_wandb import FakeWandbServer

PROJECT = "restore-tests"
CONFIG = """\
state_dir: state
wandb: {{mode: online, project: {project}, base_url: "{url}"}}
metrics: {{listen: null}}
upload: {{retry: {{initial_delay: 200ms, max_delay: 2s}}}}
watch:
  - path: ck
    artifact: model-checkpoint
    settle: 500ms
    sidecar: {{wait: 5s}}
    aliases:
      best: [{{metric: val_loss, mode: min, alias: best}}]
"""
LOSSES = {1: 0.9, 2: 0.2, 3: 0.5}  # best is step 2 (v1); latest is step 3 (v2)


def sdk_env(root: Path, server: FakeWandbServer) -> dict[str, str]:
    """The environment of a ckptd process that can reach `server` and nothing else."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(server.env(root / "wandb"), HOME=str(root))
    return env


@dataclass
class Published:
    """A server holding three versions of model-checkpoint, published by the real daemon."""

    server: FakeWandbServer
    env: dict[str, str]
    config: Path
    checkpoints: dict[int, bytes]


def publish_three(root: Path, server: FakeWandbServer) -> Published:
    """Write ckpt_1..3 with sidecars and publish them with `ckptd --once`."""
    config = root / "ckptd.yaml"
    config.write_text(CONFIG.format(project=PROJECT, url=server.url))
    ck = root / "ck"
    ck.mkdir()
    payloads = {}
    for step, loss in LOSSES.items():
        payloads[step] = os.urandom(30_000)
        sidecar.write(ck / f"ckpt_{step}.pt", step=step, metrics={"val_loss": loss})
        with zipfile.ZipFile(ck / f"ckpt_{step}.pt.tmp", "w") as z:
            z.writestr("data.pkl", payloads[step])
        (ck / f"ckpt_{step}.pt.tmp").replace(ck / f"ckpt_{step}.pt")
        payloads[step] = (ck / f"ckpt_{step}.pt").read_bytes()
    env = sdk_env(root, server)
    result = subprocess.run(
        [*CKPTD, "--config", str(config), "--once"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert [v.version for v in server.versions("model-checkpoint", PROJECT)] == ["v0", "v1", "v2"]
    assert server.alias_holder("model-checkpoint", "best", PROJECT) == "v1"
    assert server.alias_holder("model-checkpoint", "latest", PROJECT) == "v2"
    return Published(server, env, config, payloads)


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Published]:
    """One server with three published versions, shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("published")
    with FakeWandbServer(storage_dir=root / "server") as server:
        yield publish_three(root, server)


def restore(published: Published, *args: str) -> subprocess.CompletedProcess[str]:
    """`ckptd restore ARGS...` with the publishing daemon's config and environment."""
    return subprocess.run(
        [*CKPTD, "restore", *args, "--config", str(published.config)],
        env=published.env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def files_in(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_best_then_latest_restores_the_best_checkpoint(
    published: Published, tmp_path: Path
) -> None:
    """`--alias best --alias latest` into an empty dir writes exactly the best checkpoint's
    bytes (step 2, v1), and no staging directory is left behind."""
    dest = tmp_path / "resume"
    result = restore(
        published, "model-checkpoint", "--to", str(dest), "--alias", "best", "--alias", "latest"
    )
    assert result.returncode == 0, result.stderr
    assert "model-checkpoint:v1 (best)" in result.stdout
    assert files_in(dest) == ["ckpt_2.pt"]
    assert (dest / "ckpt_2.pt").read_bytes() == published.checkpoints[2]


def test_a_missing_alias_falls_back_to_the_next(published: Published, tmp_path: Path) -> None:
    """An alias no version holds is skipped and the next one (latest, step 3) is restored."""
    dest = tmp_path / "resume"
    result = restore(
        published, "model-checkpoint", "--to", str(dest), "--alias", "production",
        "--alias", "latest",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "model-checkpoint:v2 (latest)" in result.stdout
    assert files_in(dest) == ["ckpt_3.pt"]
    assert (dest / "ckpt_3.pt").read_bytes() == published.checkpoints[3]


def test_version_restores_that_version(published: Published, tmp_path: Path) -> None:
    """`--version v0` restores the first checkpoint, replacing a same-named file in DIR."""
    dest = tmp_path / "resume"
    dest.mkdir()
    (dest / "ckpt_1.pt").write_bytes(b"stale")
    (dest / "notes.txt").write_text("kept")
    result = restore(published, "model-checkpoint", "--to", str(dest), "--version", "v0")
    assert result.returncode == 0, result.stderr
    assert (dest / "ckpt_1.pt").read_bytes() == published.checkpoints[1]
    assert (dest / "notes.txt").read_text() == "kept"
    assert files_in(dest) == ["ckpt_1.pt", "notes.txt"]


def test_nothing_published_yet_exits_0_and_writes_nothing(
    published: Published, tmp_path: Path
) -> None:
    """A collection with no version (a job's first start) exits 0, says so, and does not even
    create DIR."""
    dest = tmp_path / "resume"
    result = restore(
        published, "never-published", "--to", str(dest), "--alias", "best", "--alias", "latest"
    )
    assert result.returncode == 0, result.stderr
    assert "nothing to restore" in result.stdout
    assert not dest.exists()


def test_aliases_missing_while_versions_exist_is_an_error(
    published: Published, tmp_path: Path
) -> None:
    """When versions exist but none under the names asked for, exit 1 naming latest: training
    must not silently start from scratch over existing checkpoints."""
    dest = tmp_path / "resume"
    result = restore(published, "model-checkpoint", "--to", str(dest), "--alias", "production")
    assert result.returncode == 1
    assert "latest is v2" in result.stderr and "end with --alias latest" in result.stderr
    assert not dest.exists() or files_in(dest) == []


def test_if_missing_skips_a_directory_with_a_checkpoint(
    published: Published, tmp_path: Path
) -> None:
    """--if-missing leaves a DIR that holds any checkpoint file alone (exit 0), but restores
    into one that holds only hidden files."""
    dest = tmp_path / "resume"
    (dest / "sub").mkdir(parents=True)
    (dest / "sub" / "mine.pt").write_bytes(b"mine")
    result = restore(published, "model-checkpoint", "--to", str(dest), "--if-missing")
    assert result.returncode == 0, result.stderr
    assert "already holds a checkpoint" in result.stdout
    assert files_in(dest) == ["sub", "sub/mine.pt"]

    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / ".done").write_text("")
    result = restore(published, "model-checkpoint", "--to", str(hidden), "--if-missing")
    assert result.returncode == 0, result.stderr
    assert (hidden / "ckpt_3.pt").read_bytes() == published.checkpoints[3]


def test_restoring_into_a_watched_directory_is_refused(
    published: Published, tmp_path: Path
) -> None:
    """The restored files would be published again as new versions: exit 1 naming the watch
    entry, nothing downloaded or written, and no version added."""
    watched = published.config.parent / "ck"
    for dest in (watched, watched / "resume"):
        result = restore(published, "model-checkpoint", "--to", str(dest))
        assert result.returncode == 1, result.stdout + result.stderr
        assert f"refusing to restore into {dest}: it is inside watch[0].path" in result.stderr
    assert not (watched / "resume").exists()
    assert len(published.server.versions("model-checkpoint", PROJECT)) == 3


def test_bad_key_exits_1_without_writing(tmp_path: Path, wandb_server: FakeWandbServer) -> None:
    """A rejected key is a real error: exit 1, a message, nothing written, the key not shown."""
    config = tmp_path / "ckptd.yaml"
    config.write_text(CONFIG.format(project=PROJECT, url=wandb_server.url))
    env = sdk_env(tmp_path, wandb_server)
    wandb_server.set_auth_failure()
    dest = tmp_path / "resume"
    result = subprocess.run(
        [*CKPTD, "restore", "model-checkpoint", "--to", str(dest), "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "connecting to W&B" in result.stderr and "invalid API key" in result.stderr
    assert env["WANDB_API_KEY"] not in result.stderr + result.stdout
    assert not dest.exists()


def test_corrupt_download_is_rejected(tmp_path: Path, wandb_server: FakeWandbServer) -> None:
    """Bytes that no longer match the manifest's md5 make restore exit 1 naming the file, and
    leave nothing behind: no staging directory, no DIR."""
    published = publish_three(tmp_path, wandb_server)
    stored = wandb_server.version("model-checkpoint", "latest", PROJECT)
    assert stored is not None
    path = stored.files["ckpt_3.pt"]
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    dest = tmp_path / "resume"
    result = restore(published, "model-checkpoint", "--to", str(dest))
    assert result.returncode == 1
    assert "model-checkpoint:v2: ckpt_3.pt: md5 does not match" in result.stderr
    assert not dest.exists()


def test_no_key_is_a_clear_error(tmp_path: Path, wandb_env: dict[str, str]) -> None:
    """Without any API key restore exits 1 and says where a key can come from."""
    result = subprocess.run(
        [*CKPTD, "restore", "model-checkpoint", "--to", str(tmp_path / "d")],
        env=wandb_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "WANDB_API_KEY" in result.stderr


def test_alias_and_version_are_exclusive_and_checked(tmp_path: Path) -> None:
    """--alias with --version, a malformed version or an alias with ':' are usage errors."""
    for args in (
        ["--alias", "best", "--version", "v1"],
        ["--version", "latest"],
        ["--alias", "a:b"],
    ):
        result = subprocess.run(
            [*CKPTD, "restore", "m", "--to", str(tmp_path / "d"), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2, (args, result.stderr)


def test_target_precedence(tmp_path: Path) -> None:
    """Flags beat the config file, the config file beats WANDB_* variables; without an
    explicit config the variables beat the embedded default's project."""
    path = tmp_path / "c.yaml"
    path.write_text(
        "wandb: {project: from-config, entity: team, base_url: 'http://cfg'}\nwatch: [{path: ck}]\n"
    )
    config = load_config(path)
    env = {"WANDB_PROJECT": "from-env", "WANDB_ENTITY": "env-team", "WANDB_BASE_URL": "http://e"}
    explicit = restore_config(
        config, explicit_config=True, project=None, entity=None, environ=env
    ).wandb
    assert (explicit.project, explicit.entity, explicit.base_url) == (
        "from-config",
        "team",
        "http://cfg",
    )
    flags = restore_config(config, explicit_config=True, project="p", entity="e", environ=env)
    assert (flags.wandb.project, flags.wandb.entity) == ("p", "e")
    default = load_config(None)
    implicit = restore_config(
        default, explicit_config=False, project=None, entity=None, environ=env
    ).wandb
    assert (implicit.project, implicit.entity, implicit.base_url) == (
        "from-env",
        "env-team",
        "http://e",
    )
    assert implicit.mode == "online"  # restore reads from W&B whatever the daemon's mode


def test_has_checkpoint_ignores_hidden_names(tmp_path: Path) -> None:
    """Only non-hidden files count as a checkpoint: staging dirs, dotfiles and empty
    directories (lost+found) do not."""
    assert not has_checkpoint(tmp_path / "missing")
    (tmp_path / ".ckptd-restore-x").mkdir()
    (tmp_path / ".ckptd-restore-x" / "ckpt.pt").write_bytes(b"x")
    (tmp_path / ".done").write_text("")
    (tmp_path / "lost+found").mkdir()
    assert not has_checkpoint(tmp_path)
    (tmp_path / "lost+found" / "ckpt.pt").write_bytes(b"x")
    assert has_checkpoint(tmp_path)


def test_version_ref() -> None:
    """`3` and `v3` both name v3; anything else is refused."""
    assert version_ref("3") == version_ref("v3") == "v3"
    with pytest.raises(ValueError, match="expected a version"):
        version_ref("latest")


def test_install_replaces_directories_whole(tmp_path: Path) -> None:
    """A restored checkpoint directory replaces an existing one of the same name whole (no
    stale file survives inside it), a file replaces a directory, other entries stay."""
    from ckptd.restore import _install

    dest, staging = tmp_path / "dest", tmp_path / "dest" / ".ckptd-restore-x"
    (dest / "checkpoint-500").mkdir(parents=True)
    (dest / "checkpoint-500" / "stale.bin").write_bytes(b"old")
    (dest / "latest").mkdir()
    (dest / "other.pt").write_bytes(b"other")
    (staging / "checkpoint-500").mkdir(parents=True)
    (staging / "checkpoint-500" / "model.safetensors").write_bytes(b"new")
    (staging / "latest").write_text("checkpoint-500")
    _install(staging, dest)
    assert sorted(p.name for p in (dest / "checkpoint-500").iterdir()) == ["model.safetensors"]
    assert (dest / "latest").read_text() == "checkpoint-500"
    assert (dest / "other.pt").read_bytes() == b"other"


def _restore_cli(
    args: list[str], env: dict[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CKPTD, "restore", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_if_missing_is_checked_before_a_key_or_the_network_is_needed(
    tmp_path: Path, wandb_env: dict[str, str]
) -> None:
    """A container restarted in the same pod: its DIR holds a checkpoint, so `--if-missing`
    exits 0 without asking for a key it may not have."""
    dest = tmp_path / "resume"
    dest.mkdir()
    (dest / "ckpt_5.pt").write_bytes(b"x")
    env = {k: v for k, v in wandb_env.items() if k != "WANDB_API_KEY"}
    result = _restore_cli(["model-checkpoint", "--to", str(dest), "--if-missing"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "already holds a checkpoint; nothing restored" in result.stdout


def test_restore_in_offline_mode_says_it_needs_wandb_online(
    tmp_path: Path, wandb_env: dict[str, str]
) -> None:
    """The example config (offline) and no key: the message says restore needs W&B online,
    not that a key failed to authenticate."""
    config = tmp_path / "ckptd.yaml"
    config.write_text("wandb: {mode: offline}\nwatch: [{path: ck}]\n")
    env = {k: v for k, v in wandb_env.items() if k != "WANDB_API_KEY"}
    result = _restore_cli(
        ["model-checkpoint", "--to", str(tmp_path / "resume"), "--config", str(config)],
        env, tmp_path,
    )  # fmt: skip
    assert result.returncode == 1
    assert "offline mode: restore needs W&B online" in result.stderr
    assert "AuthenticationError" not in result.stderr


def test_restore_without_a_network_says_it_cannot_reach_the_host(
    tmp_path: Path, wandb_env: dict[str, str]
) -> None:
    """No server at the base URL: one line saying it cannot be reached, in seconds, not an
    AuthenticationError after the SDK's long wait."""
    import socket
    import time

    with socket.socket() as s:  # a loopback port that nothing listens on
        s.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{s.getsockname()[1]}"
    env = {**wandb_env, "WANDB_API_KEY": "k" * 40, "WANDB_BASE_URL": nowhere}
    started = time.monotonic()
    result = _restore_cli(["model-checkpoint", "--to", str(tmp_path / "resume")], env, tmp_path)
    assert result.returncode == 1
    assert f"cannot reach {nowhere}: " in result.stderr, result.stderr
    assert "AuthenticationError" not in result.stderr
    assert time.monotonic() - started < 30
    assert not (tmp_path / "resume").exists()
