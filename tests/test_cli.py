"""The command line: exit codes, config errors named by key, and signal handling."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import CKPTD, Daemon


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CKPTD, *args], capture_output=True, text=True, cwd=cwd, timeout=60)


def config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "ckptd.yaml"
    path.write_text(f"state_dir: state\nmetrics: {{listen: null}}\n{body}")
    return path


def test_check_accepts_a_valid_config(tmp_path: Path) -> None:
    """`ckptd check` exits 0 and says OK for a valid file."""
    result = run("check", "--config", str(config(tmp_path, "watch: [{path: ck}]\n")))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_check_names_a_typoed_key(tmp_path: Path) -> None:
    """A typo'd key exits 2 and the message names the key path."""
    path = config(tmp_path, "watch:\n  - path: ck\n    patern: ['*.pt']\n")
    result = run("check", "--config", str(path))
    assert result.returncode == 2
    assert "watch[0].patern: unknown key (did you mean 'patterns'?)" in result.stderr


def test_check_names_a_bad_mode(tmp_path: Path) -> None:
    """`mode: lowest` exits 2 naming watch[0].aliases.best[0].mode and the value."""
    path = config(
        tmp_path, "watch: [{path: ck, aliases: {best: [{metric: loss, mode: lowest}]}}]\n"
    )
    result = run("check", "--config", str(path))
    assert result.returncode == 2
    assert "watch[0].aliases.best[0].mode: expected 'min' or 'max'" in result.stderr
    assert "'lowest'" in result.stderr


def test_run_with_bad_config_exits_2(tmp_path: Path) -> None:
    """The daemon refuses to start on an invalid config, with the same message."""
    result = run("--config", str(config(tmp_path, "watch: [{path: ck, settle: soon}]\n")))
    assert result.returncode == 2
    assert "watch[0].settle" in result.stderr


def test_version_and_help() -> None:
    """--version prints the version; --help lists the commands."""
    assert run("--version").stdout.startswith("ckptd ")
    help_text = run("--help").stdout
    assert "check" in help_text and "status" in help_text


def test_sigterm_while_idle_exits_0_within_a_second(
    tmp_path: Path, wandb_env: dict[str, str], start_daemon: Callable[..., Daemon]
) -> None:
    """An idle daemon stops cleanly and promptly on SIGTERM."""
    path = config(tmp_path, "wandb: {mode: offline}\nwatch: [{path: ck}]\n")
    daemon = start_daemon("--config", str(path), env=wandb_env)
    daemon.wait_for_log("ckptd started")
    sent = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    code = daemon.proc.wait(timeout=10)
    elapsed = time.monotonic() - sent
    assert code == 0, daemon.log()
    assert elapsed < 1.0, f"took {elapsed:.2f}s to stop"
    assert (tmp_path / "ck").is_dir()  # the watched directory was created


def test_second_daemon_on_the_same_state_dir_fails(
    tmp_path: Path, wandb_env: dict[str, str], start_daemon: Callable[..., Daemon]
) -> None:
    """Two daemons cannot share a state_dir: the second exits 1 naming the directory."""
    path = config(tmp_path, "watch: [{path: ck}]\n")
    first = start_daemon("--config", str(path), env=wandb_env)
    first.wait_for_log("ckptd started")
    result = subprocess.run(
        [*CKPTD, "--config", str(path)], env=wandb_env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert "is in use by ckptd" in result.stderr and str(tmp_path / "state") in result.stderr
    assert first.stop() == 0


def test_check_states_each_entrys_effective_retention(tmp_path: Path) -> None:
    """`ckptd check` says in one line per entry what it will delete, or that it deletes none."""
    config = tmp_path / "ckptd.yaml"
    config.write_text(
        "watch:\n"
        "  - {path: a}\n"
        "  - path: b\n"
        "    artifact: b\n"
        "    retention:\n"
        "      remote: {keep_last: 3, protect: [best]}\n"
        "      local: {delete_after_upload: true, keep_last: 1}\n"
    )
    result = subprocess.run(
        [*CKPTD, "check", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{config}: OK (2 watch entries)"
    assert lines[2] == (
        "    retention: W&B: keeps every version (retention.remote.keep_last is not set); "
        "disk: deletes nothing"
    )
    assert lines[4] == (
        "    retention: W&B: deletes versions except the newest 3 by step; aliases matching "
        "best; disk: deletes published checkpoints but the newest 1"
    )


def test_a_mistyped_command_is_refused_with_a_suggestion(tmp_path: Path) -> None:
    """`ckptd stauts` exits 2 and suggests `status` instead of running the daemon."""
    result = run("stauts", "--config", "x.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown command 'stauts'; did you mean 'status'?" in result.stderr
    assert run("frobnicate").stderr.startswith("ckptd: unknown command 'frobnicate' (")


def test_online_without_a_key_exits_2_at_start_and_check_says_so(tmp_path: Path) -> None:
    """An online config with no API key: the daemon exits 2 at start (a config error, so
    systemd's RestartPreventExitStatus=2 does not restart it every 5 s); `check`, which may
    run where the key is not visible (systemd hands it over inside the unit), says so."""
    import os

    config = tmp_path / "ckptd.yaml"
    config.write_text("wandb: {mode: online}\nmetrics: null\nwatch: [{path: ck}]\n")
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}

    def ckptd(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CKPTD, *args, "--config", str(config)],
            capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path,
        )  # fmt: skip

    started = ckptd()
    assert started.returncode == 2, started.stderr
    assert "wandb.mode is online but no API key was found" in started.stderr
    checked = ckptd("check")
    assert checked.returncode == 0, checked.stderr
    assert "note: wandb.mode is online but no API key was found" in checked.stdout
    assert "ckptd exits 2" in checked.stdout
    config.write_text("wandb: {mode: online, api_key_file: missing-key}\nwatch: [{path: ck}]\n")
    started = ckptd()
    assert started.returncode == 2
    assert "wandb.api_key_file: cannot read" in started.stderr
