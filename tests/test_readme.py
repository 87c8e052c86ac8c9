"""The README tells a newcomer the truth: its commands and its tour work as written."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.conftest import CKPTD, Daemon, ckptd_status

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def test_the_test_command_is_the_one_ci_runs() -> None:
    """The README's test command is, verbatim, the last command of .ci/run."""
    readme_command = blocks("sh")[1].strip()
    ci_lines = [line for line in (REPO / ".ci/run").read_text().splitlines() if line.strip()]
    assert ci_lines[-1] == readme_command


def test_first_command_and_tour_work_as_written(
    tmp_path: Path, wandb_env: dict[str, str], start_daemon: Callable[..., Daemon]
) -> None:
    """The first command's daemon, on the embedded default config, publishes the tour's three
    checkpoints with exactly the aliases the README shows, and `ckptd status` says so."""
    setup = blocks("sh")[0].strip()
    assert setup.endswith(".venv/bin/ckptd --config config.example.yaml"), setup
    (tmp_path / "config.example.yaml").write_text((REPO / "config.example.yaml").read_text())
    daemon = start_daemon("--config", str(tmp_path / "config.example.yaml"), env=wandb_env)
    daemon.wait_for_log("ckptd started")

    tour = blocks("sh")[2]
    script = re.search(r"<<'EOF'\n(.*?)\nEOF", tour, flags=re.DOTALL)
    assert script is not None and tour.startswith(".venv/bin/python - <<'EOF'")
    subprocess.run([sys.executable, "-"], input=script[1], text=True, cwd=tmp_path, check=True,
                   env=wandb_env, timeout=60)  # fmt: skip

    shown = re.findall(r"published (\S+) as (\S+) \(.*\) with aliases (.*)", README)
    assert len(shown) == 3
    for path, version, aliases in shown:
        daemon.wait_for_log(f"{tmp_path / path} as {version}", timeout=60)
        line = next(x for x in daemon.log().splitlines() if f"{tmp_path / path} as" in x)
        assert line.endswith(f"with aliases {aliases}"), line
    running = ckptd_status(tmp_path / "config.example.yaml", wandb_env)
    assert "3 logged offline but unconfirmed, 0 pending" in running  # W&B holds them in memory
    assert daemon.stop() == 0
    assert "3 published, 0 pending" in ckptd_status(tmp_path / "config.example.yaml", wandb_env)
    assert list((tmp_path / ".ckptd" / "wandb").glob("offline-run-*"))


def test_every_command_shown_exists() -> None:
    """Each `ckptd <command>` the README shows is a command the CLI accepts."""
    code = "\n".join(blocks("sh") + blocks(""))
    shown = set(re.findall(r"^ckptd ([a-z]+)\b", code, flags=re.MULTILINE))
    help_text = subprocess.run([*CKPTD, "--help"], capture_output=True, text=True).stdout
    assert shown, "no commands found"
    for command in shown - {"run"}:
        assert command in help_text, command
