"""The systemd units: they verify, they are hardened, and they fit ckptd's own behaviour."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ckptd.config import load_config
from ckptd.sinks.wandb import read_api_key

ROOT = Path(__file__).resolve().parent.parent
UNITS = {
    "ckptd.service": "/etc/ckptd/ckptd.yaml",
    "ckptd@.service": "/etc/ckptd/%i.yaml",
}
EXAMPLE_CONFIG = ROOT / "systemd" / "ckptd.yaml"
MAX_EXPOSURE = 2.0
_EXPOSURE = re.compile(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)")


def systemd_analyze() -> str:
    """The systemd-analyze binary; a missing one fails the test (CI installs it)."""
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.fail(
            "systemd-analyze is not installed, so the unit files cannot be checked: "
            "`apt-get install -y --no-install-recommends systemd` (.ci/run does this)"
        )
    return found


def directives(unit: str) -> dict[str, list[str]]:
    """`Key=value` lines of a unit file, every value of a repeated key, comments dropped."""
    found: dict[str, list[str]] = {}
    for line in (ROOT / "systemd" / unit).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        found.setdefault(key.strip(), []).append(value.strip())
    return found


def one(unit: str, key: str) -> str:
    values = directives(unit)[key]
    assert len(values) == 1, f"{unit}: {key} set {len(values)} times"
    return values[0]


def seconds(span: str) -> float:
    """A systemd time span (`10min`, `150s`) in seconds, as systemd itself reads it."""
    result = subprocess.run(
        [systemd_analyze(), "timespan", span], capture_output=True, text=True, timeout=60
    )
    match = re.search(r"μs: (\d+)", result.stdout)
    assert result.returncode == 0 and match, result.stdout + result.stderr
    return int(match[1]) / 1e6


def verify(path: Path) -> None:
    result = subprocess.run(
        [systemd_analyze(), "verify", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and not result.stdout + result.stderr, (
        f"systemd-analyze verify {path.name}:\n{result.stdout}{result.stderr}"
    )


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_unit_verifies(unit: str, tmp_path: Path) -> None:
    """`systemd-analyze verify` reports nothing for the unit as shipped, for a template
    instance, and for a copy whose ExecStart names the virtualenv's ckptd (the documented
    alternative to `/usr/bin/env ckptd`)."""
    verify(ROOT / "systemd" / unit)
    instance = tmp_path / unit.replace("@.", "@demo.")
    text = (ROOT / "systemd" / unit).read_text()
    venv_ckptd = Path(sys.executable).with_name("ckptd")
    assert venv_ckptd.exists(), venv_ckptd
    text = text.replace("ExecStart=/usr/bin/env ckptd ", f"ExecStart={venv_ckptd} ")
    (tmp_path / unit).write_text(text)
    verify(instance if "@" in unit else tmp_path / unit)


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_exposure_is_at_most_2(unit: str) -> None:
    """`systemd-analyze security --offline=true` rates the unit 2.0 or lower."""
    result = subprocess.run(
        [
            systemd_analyze(),
            "security",
            "--offline=true",
            "--no-pager",
            str(ROOT / "systemd" / unit),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = _EXPOSURE.search(result.stdout)
    assert result.returncode == 0 and match, result.stdout + result.stderr
    score = float(match[1])
    assert score <= MAX_EXPOSURE, f"{unit} exposure {score}:\n{result.stdout}"


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_unit_runs_ckptd_as_a_notify_service(unit: str) -> None:
    """Type=notify for the main process only, a watchdog well above ckptd's one-second loop,
    restart on failure but not on a config error (exit 2), the right config path."""
    assert one(unit, "Type") == "notify"
    assert one(unit, "NotifyAccess") == "main"
    assert seconds(one(unit, "WatchdogSec")) >= 10
    assert one(unit, "Restart") == "on-failure"
    assert one(unit, "RestartPreventExitStatus") == "2"
    assert one(unit, "ExecStart") == f"/usr/bin/env ckptd --config {UNITS[unit]}"


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_unit_stop_outlasts_the_drain(unit: str) -> None:
    """TimeoutStopSec exceeds the example config's shutdown_timeout plus 30 s per watch entry
    (closing a W&B run), and SIGTERM reaches ckptd alone (KillMode=mixed) so that the SDK's
    helper process lives through the drain."""
    config = load_config(EXAMPLE_CONFIG, env={"STATE_DIRECTORY": "/var/lib/ckptd"})
    needed = config.upload.shutdown_timeout + 30 * len(config.watch)
    assert seconds(one(unit, "TimeoutStopSec")) > needed
    assert one(unit, "KillMode") == "mixed"


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_unit_user_state_key_and_network(unit: str) -> None:
    """A dynamic user, a state directory, the key as a credential named as ckptd reads it,
    and network families kept (W&B over TCP, AF_UNIX for NOTIFY_SOCKET)."""
    found = directives(unit)
    assert one(unit, "DynamicUser") == "yes"
    expected_state = "ckptd" if "@" not in unit else "ckptd-%i"
    assert one(unit, "StateDirectory") == expected_state
    assert one(unit, "LoadCredential") == "wandb-api-key:/etc/ckptd/wandb-api-key"
    assert set(one(unit, "RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert "PrivateNetwork" not in found and "IPAddressDeny" not in found
    assert one(unit, "ProtectSystem") == "strict"  # read-only everywhere: reads checkpoints


def test_credential_is_read_where_load_credential_puts_it(tmp_path: Path) -> None:
    """With no api_key_file, ckptd reads `$CREDENTIALS_DIRECTORY/wandb-api-key`, the name the
    units give the credential, before WANDB_API_KEY."""
    credential = one("ckptd.service", "LoadCredential").split(":")[0]
    (tmp_path / credential).write_text("from-systemd\n")
    config = load_config(EXAMPLE_CONFIG, env={})
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path), "WANDB_API_KEY": "from-env"}
    assert read_api_key(config, env) == "from-systemd"


def test_example_config_uses_the_state_directory(tmp_path: Path) -> None:
    """systemd/ckptd.yaml passes `ckptd check` and puts state_dir in systemd's
    $STATE_DIRECTORY (so template instances get one each), /var/lib/ckptd without it."""
    result = subprocess.run(
        [sys.executable, "-m", "ckptd", "check", "--config", str(EXAMPLE_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    instance = load_config(EXAMPLE_CONFIG, env={"STATE_DIRECTORY": "/var/lib/ckptd-train"})
    assert instance.state_dir == Path("/var/lib/ckptd-train")
    assert load_config(EXAMPLE_CONFIG, env={}).state_dir == Path("/var/lib/ckptd")
