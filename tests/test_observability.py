"""Metrics, health and logs: what an operator sees of a running daemon."""

from __future__ import annotations

import json
import logging
import socket
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Daemon, ckptd_status, wait_until
from tests.support.checkpoints import renamed_in
from tests.support.fake_wandb import FakeWandbServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:  # noqa: S310 - loopback http
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (fails if it is absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        metric_name, _, rest = sample.partition("{")
        if metric_name == name and ",".join(sorted(rest.rstrip("}").split(","))) == wanted:
            return float(value)
    raise AssertionError(f"{name}{{{wanted}}} not exported")


def start(
    tmp_path: Path, server: FakeWandbServer, env: dict[str, str], run: Callable[..., Daemon],
    *, log_format: str = "text", base_url: str | None = None,
) -> tuple[Daemon, str]:  # fmt: skip
    port = free_port()
    (tmp_path / "ck").mkdir()
    config = tmp_path / "ckptd.yaml"
    config.write_text(
        "state_dir: state\n"
        f'wandb: {{mode: online, project: ops, base_url: "{base_url or server.url}"}}\n'
        f'metrics: {{listen: "127.0.0.1:{port}"}}\nlog: {{format: {log_format}}}\n'
        "upload: {retry: {initial_delay: 200ms, max_delay: 1s}}\n"
        "watch: [{path: ck, artifact: model, settle: 1s, sidecar: {wait: 0s}}]\n"
    )
    daemon = run("--config", str(config), env=env)
    daemon.wait_for_log("ckptd started")
    return daemon, f"http://127.0.0.1:{port}"


def test_metrics_and_health_endpoints(
    tmp_path: Path,
    wandb_server: FakeWandbServer,
    online_env: dict[str, str],
    start_daemon: Callable[..., Daemon],
) -> None:
    """/metrics counts what was detected, published, uploaded and retried; /healthz and
    /readyz answer 200; a parked collection makes /readyz answer 503 with the reason."""
    daemon, url = start(tmp_path, wandb_server, online_env, start_daemon)
    assert get(f"{url}/healthz") == (200, "ok\n")
    assert get(f"{url}/readyz") == (200, "ready\n")
    wandb_server.inject("CreateArtifact", status=500, times=2)
    path = renamed_in(tmp_path / "ck", "ckpt_1.pt", 10_000, step=1, metrics={"val_loss": 1.0})
    daemon.wait_for_log("ckpt_1.pt as model:v", timeout=60)
    # The version is logged as published just before its counters move (on its aliasing).
    scraped: list[str] = []

    def counted() -> bool:
        scraped.append(get(f"{url}/metrics")[1])
        return "ckptd_checkpoints_published_total{" in scraped[-1]

    wait_until(counted, 10, "the publish to be counted")
    text = scraped[-1]
    assert metric(text, "ckptd_checkpoints_detected_total", collection="model") == 1
    assert metric(text, "ckptd_checkpoints_published_total", collection="model") == 1
    assert metric(text, "ckptd_uploaded_bytes_total", collection="model") == path.stat().st_size
    assert metric(text, "ckptd_publish_seconds_count", collection="model") == 1
    assert metric(text, "ckptd_retries_total", collection="model", kind="transient") >= 1
    assert metric(text, "ckptd_last_success_timestamp_seconds", collection="model") > 0
    wait_until(
        lambda: metric(get(f"{url}/metrics")[1], "ckptd_queue_depth", collection="model") == 0,
        10, "the queue gauge to drop",
    )  # fmt: skip

    wandb_server.set_auth_failure(True)
    renamed_in(tmp_path / "ck", "ckpt_2.pt", 1_000, step=2, metrics={"val_loss": 0.5})
    daemon.wait_for_log("model is parked", timeout=60)
    status, body = get(f"{url}/readyz")
    assert status == 503 and "parked: model" in body
    _, text = get(f"{url}/metrics")
    assert metric(text, "ckptd_collection_parked", collection="model") == 1
    assert metric(text, "ckptd_retries_total", collection="model", kind="permanent") == 1
    assert online_env["WANDB_API_KEY"] not in text
    assert daemon.stop() == 0


def test_readyz_reports_an_unreachable_wandb(
    tmp_path: Path,
    wandb_server: FakeWandbServer,
    online_env: dict[str, str],
    start_daemon: Callable[..., Daemon],
) -> None:
    """Online, /readyz answers 503 naming the server when W&B does not answer at all, while
    /healthz (the process and its watcher) stays 200."""
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    daemon, url = start(tmp_path, wandb_server, online_env, start_daemon, base_url=nowhere)
    status, body = get(f"{url}/readyz")
    assert status == 503 and f"cannot reach {nowhere}" in body
    assert get(f"{url}/healthz") == (200, "ok\n")
    assert daemon.stop() == 0


def test_json_logs_are_one_object_per_line(
    tmp_path: Path,
    wandb_server: FakeWandbServer,
    online_env: dict[str, str],
    start_daemon: Callable[..., Daemon],
) -> None:
    """`log.format: json` writes one JSON object per line with time, level and event, and the
    API key appears in none of them."""
    daemon, _ = start(tmp_path, wandb_server, online_env, start_daemon, log_format="json")
    renamed_in(tmp_path / "ck", "ckpt_1.pt", 1_000, step=1, metrics={"val_loss": 1.0})
    daemon.wait_for_log("ckpt_1.pt as model:v0", timeout=60)
    assert daemon.stop() == 0
    lines = [line for line in daemon.log().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]
    assert all({"time", "level", "event"} <= record.keys() for record in records)
    assert any(r["event"].startswith("published ") and r["level"] == "info" for r in records)
    assert online_env["WANDB_API_KEY"] not in daemon.log()


def test_two_daemons_on_one_host_with_the_default_metrics_setting(
    tmp_path: Path, wandb_env: dict[str, str], start_daemon: Callable[..., Daemon]
) -> None:
    """`metrics.listen` left at its default (auto): a second daemon on the host takes the
    next free port instead of dying; each logs and records the address it took, and
    `ckptd status` shows it."""
    daemons, addresses = [], []
    for name in ("a", "b"):
        (tmp_path / name / "ck").mkdir(parents=True)
        config = tmp_path / name / "ckptd.yaml"
        config.write_text("state_dir: state\nwatch: [{path: ck}]\n")
        daemon = start_daemon("--config", str(config), env=wandb_env)
        daemon.wait_for_log("ckptd started")
        address = (tmp_path / name / "state" / "metrics.address").read_text().strip()
        assert f"metrics and health on http://{address}/metrics" in daemon.log()
        assert get(f"http://{address}/healthz")[0] == 200
        assert f"metrics: http://{address}/metrics" in ckptd_status(config, wandb_env)
        daemons.append(daemon)
        addresses.append(address)
    assert addresses[0] != addresses[1]
    assert all(a.startswith("127.0.0.1:94") for a in addresses)
    for name, daemon in zip(("a", "b"), daemons, strict=True):
        assert daemon.stop() == 0
        assert not (tmp_path / name / "state" / "metrics.address").exists()


def test_a_port_clash_is_reported_before_anything_is_watched(
    tmp_path: Path, wandb_env: dict[str, str], start_daemon: Callable[..., Daemon]
) -> None:
    """An explicit port that is taken: ckptd exits 1 naming metrics.listen and the port,
    and has watched nothing."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (tmp_path / "ck").mkdir()
        config = tmp_path / "ckptd.yaml"
        config.write_text(f"state_dir: state\nmetrics: {{listen: '127.0.0.1:{port}'}}\n"
                          "watch: [{path: ck}]\n")  # fmt: skip
        daemon = start_daemon("--config", str(config), env=wandb_env)
        assert daemon.proc.wait(60) == 1
    log = daemon.log()
    assert f"metrics.listen: cannot listen on 127.0.0.1:{port}: Address already in use" in log
    assert "watching" not in log


def test_readyz_asks_the_host_the_sdk_talks_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The host /readyz probes is the SDK's own choice: `wandb.base_url`, else
    WANDB_BASE_URL, else the pinned SDK's default (not a host of ckptd's own). Nothing is
    probed here: offline mode has nothing to reach."""
    import wandb

    from ckptd.config import load_config
    from ckptd.sinks.wandb import WandbSink

    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    config = tmp_path / "ckptd.yaml"
    config.write_text("watch: [{path: ck}]\n")
    default = WandbSink(load_config(config)).base_url
    assert default == str(wandb.Settings().base_url) and default.startswith("https://")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:1")
    assert WandbSink(load_config(config)).base_url == "http://127.0.0.1:1"
    config.write_text('wandb: {base_url: "http://127.0.0.1:2"}\nwatch: [{path: ck}]\n')
    sink = WandbSink(load_config(config))
    assert sink.base_url == "http://127.0.0.1:2"
    assert sink.problem(0.0) is None  # offline


def test_the_sdks_terminal_lines_go_to_ckptds_log_not_stderr(
    tmp_path: Path,
    wandb_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Once the sink started the SDK, a `wandb: WARNING ...` line the SDK prints is a ckptd
    log record instead (so JSON logs stay JSON), and nothing reaches stderr."""
    import wandb

    from ckptd.config import load_config
    from ckptd.sinks.wandb import WandbSink

    for key, value in wandb_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WANDB_SILENT", raising=False)
    config = tmp_path / "ckptd.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\nwatch: [{{path: ck}}]\n")
    sink = WandbSink(load_config(config))
    try:
        sink._run("probe")  # starts the SDK (offline), as the first publish does
        capfd.readouterr()
        with caplog.at_level(logging.INFO, logger="ckptd.sinks.wandb.sdk"):
            wandb.termwarn("disk is getting full")
    finally:
        sink.close()
    assert [r.getMessage() for r in caplog.records if r.name == "ckptd.sinks.wandb.sdk"] == [
        "disk is getting full"
    ]
    assert "disk is getting full" not in capfd.readouterr().err
