"""Hostile and broken input: one bad file never stops, hangs or leaks (issue 14).

Probed as an attacker with write access to a watched directory would, and as a buggy
training script would. The daemon tests drop several bad files into one running daemon,
then a good checkpoint, and check that the daemon is still up, the good checkpoint is
published, each bad file is named once with its reason, and nothing from outside the root
reached the journal or the W&B records.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import resource
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptd import sidecar
from ckptd.checkpoint import CheckpointInfo, FileState
from ckptd.config import Config, load_config
from ckptd.detect import Detector, ReadyCheckpoint
from ckptd.drops import DropLog
from ckptd.errors import ConfigError, SidecarError
from ckptd.formats import Verdict
from ckptd.inputs import open_regular
from ckptd.journal import Journal, NewRow, Row
from ckptd.metrics import HealthServer, Metrics
from ckptd.publish import Publisher
from ckptd.restore import RestoreError, refuse_references
from ckptd.service import Service
from ckptd.sinks import StoredFile
from ckptd.sinks.metadata import unpublishable
from ckptd.sinks.wandb import WandbSink
from tests.conftest import CKPTD, Daemon, wait_until
from tests.support.checkpoints import renamed_in
from tests.support.fake_wandb import FakeWandbServer
from tests.support.mounts import tmpfs

SECRET = "hunter2-outside-the-root"


def _zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("data.pkl", b"x" * 100)
    return buffer.getvalue()


ZIP = _zip()
DEEP = b'{"a":' * 100_000 + b"1" + b"}" * 100_000

OFFLINE = """\
state_dir: state
wandb: {{mode: offline, project: hostile}}
metrics: {{listen: "127.0.0.1:0", stall_after: 5m}}
watch:
  - path: ck
    artifact: hostile
    format: auto
    settle: 1s
    sidecar: {{wait: {wait}}}
    aliases: {{templates: ["step-{{step}}"], best: [{{metric: val_loss, mode: min}}]}}
"""


def sidecar_error(body: bytes, **options: bool) -> str:
    path = Path("/ck/ckpt_1.pt.metrics.json")
    with pytest.raises(SidecarError) as info:
        sidecar.parse(body, path, **options)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    return message


# -- values: steps, metrics, metadata, nesting ----------------------------------------------


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (b'{"step": Infinity}', "'step'"),
        (b'{"step": NaN}', "'step'"),
        (b'{"step": -Infinity}', "'step'"),
        (b'{"step": 1e400}', "'step'"),
        (b'{"step": 1e30}', "'step'"),
        (b'{"step": 9223372036854775808}', "'step'"),
        (b'{"step": true}', "'step'"),
        (b'{"step": 1, "metadata": {"lr": Infinity}}', "'metadata.lr'"),
        (b'{"step": 1, "description": "\\ud800"}', "'description'"),
        (b'{"step": 1, "metadata": {"\\udfff": 1}}', "'metadata.\\udfff'"),
        (b'{"metadata": ' + b'{"a": ' * 40 + b"1" + b"}" * 41, "deeper than"),
    ],
)
def test_values_the_journal_or_wandb_cannot_carry_are_refused_naming_the_key(
    body: bytes, named: str
) -> None:
    """Infinite, NaN, out-of-range and boolean steps, non-finite metadata, lone surrogates
    and deep nesting raise SidecarError naming the key."""
    assert named in sidecar_error(body)


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (b'{"step": 1, "metrics": {"val_loss": -Infinity, "f1": 0.7}}', "'metrics.val_loss'"),
        (b'{"step": 1, "metrics": {"val_loss": 1e400, "f1": 0.7}}', "'metrics.val_loss'"),
        (b'{"step": 1, "metrics": {"val_loss": NaN, "f1": 0.7}}', "'metrics.val_loss'"),
        (b'{"step": 1, "metrics": {"val_loss": "low", "f1": 0.7}}', "'metrics.val_loss'"),
        (b'{"step": 1, "metrics": {"val_loss": true, "f1": 0.7}}', "'metrics.val_loss'"),
        (b'{"step": 1, "val_loss": NaN, "f1": 0.7}', "'val_loss'"),
    ],
)
def test_a_metric_that_cannot_compete_is_left_out_and_the_rest_stands(
    body: bytes, named: str, tmp_path: Path
) -> None:
    """A non-finite or non-numeric metric is left out of the metrics and named in `ignored`
    (NaN never competes for best); the step and the other metrics still count."""
    parsed = sidecar.parse(body, tmp_path)
    assert parsed["step"] == 1 and parsed["metrics"] == {"f1": 0.7}
    (ignored,) = parsed["ignored"]
    assert ignored.startswith(f"{named} must be a finite number")


def test_a_sidecar_nested_100000_levels_is_a_sidecar_error() -> None:
    """100,000 levels of nesting (a RecursionError in json) is a SidecarError, not a crash."""
    assert "not usable JSON" in sidecar_error(DEEP)


def test_a_huge_integer_is_a_sidecar_error() -> None:
    """An integer of 5,000 digits (past Python's conversion limit) is a SidecarError."""
    sidecar_error(b'{"step": ' + b"9" * 5000 + b"}")


def test_the_largest_step_the_journal_holds_is_accepted(tmp_path: Path) -> None:
    """Step 2**63-1 passes (the bound is the journal's, not lower); 5.0 reads as 5."""
    assert sidecar.parse(b'{"step": 9223372036854775807}', tmp_path)["step"] == 2**63 - 1
    assert sidecar.parse(b'{"step": 5.0}', tmp_path)["step"] == 5


def test_flat_form_strings_are_not_metrics_and_are_ignored_unless_opted_in(
    tmp_path: Path,
) -> None:
    """In the flat form only numbers are metrics; other keys are ignored, or are metadata
    with `flat_metadata`, never metrics."""
    body = b'{"step": 2, "val_loss": 0.5, "AWS_SECRET": "xyz", "nested": {"a": 1}}'
    plain = sidecar.parse(body, tmp_path)
    assert plain["metrics"] == {"val_loss": 0.5} and plain["metadata"] == {}
    opted = sidecar.parse(body, tmp_path, flat_metadata=True)
    assert opted["metrics"] == {"val_loss": 0.5}
    assert opted["metadata"] == {"AWS_SECRET": "xyz", "nested": {"a": 1}}


def test_flat_metadata_is_a_per_watch_config_key(tmp_path: Path) -> None:
    """`sidecar: {flat_metadata: true}` loads; it is off by default."""
    path = tmp_path / "c.yaml"
    path.write_text("watch: [{path: ck, sidecar: {wait: 1s, flat_metadata: true}}]\n")
    assert load_config(path).watch[0].sidecar.flat_metadata is True
    path.write_text("watch: [{path: ck}]\n")
    assert load_config(path).watch[0].sidecar.flat_metadata is False


# -- only regular files inside the root -----------------------------------------------------


def test_a_fifo_sidecar_is_refused_without_blocking(tmp_path: Path) -> None:
    """A FIFO named like a sidecar is refused by name at once (opening it would wait for a
    writer forever)."""
    os.mkfifo(tmp_path / "ckpt_1.pt.metrics.json")
    outcome: list[BaseException | object] = []
    reader = threading.Thread(
        target=lambda: outcome.append(_catch(lambda: sidecar.read(tmp_path / "ckpt_1.pt")))
    )
    reader.start()
    reader.join(10)
    assert not reader.is_alive(), "sidecar.read blocked on a FIFO"
    (error,) = outcome
    assert isinstance(error, SidecarError) and "a FIFO, not a regular file" in str(error)


def _catch(action: Callable[[], object]) -> BaseException | object:
    try:
        return action()
    except Exception as exc:
        return exc


def test_a_sidecar_symlinked_out_of_the_root_is_refused(tmp_path: Path) -> None:
    """A sidecar that resolves outside the watched root is refused, naming where it leads."""
    root, outside = tmp_path / "ck", tmp_path / "outside.json"
    root.mkdir()
    outside.write_text(json.dumps({"step": 1, "password": SECRET}))
    (root / "ckpt_1.pt.metrics.json").symlink_to(outside)
    with pytest.raises(SidecarError, match="outside the watched root") as info:
        sidecar.read(root / "ckpt_1.pt", root)
    assert SECRET not in str(info.value)


def test_open_regular_refuses_a_fifo_swapped_in(tmp_path: Path) -> None:
    """open_regular refuses FIFOs and sockets by kind and never blocks on them."""
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(OSError, match="a FIFO"):
        open_regular(tmp_path / "pipe")
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(tmp_path / "sock"))
        with pytest.raises(OSError, match="a socket"):
            open_regular(tmp_path / "sock")
    finally:
        server.close()


# -- configuration: alias bombs and secrets -------------------------------------------------


def yaml_bomb(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(1, levels):
        refs = ",".join([f"*a{level - 1}"] * 9)
        lines.append(f"a{level}: &a{level} [{refs}]")
    return "\n".join(lines) + "\nwatch: [{path: ck}]\n"


def test_a_yaml_alias_bomb_is_refused_fast_and_small(tmp_path: Path) -> None:
    """`ckptd check` on ~700 bytes of nested aliases (9**9 nodes expanded) exits 2 naming the
    file, under a 1 GiB address-space limit and within seconds."""
    path = tmp_path / "bomb.yaml"
    path.write_text(yaml_bomb())
    assert len(path.read_bytes()) < 1000

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    started = time.monotonic()
    result = subprocess.run(
        [*CKPTD, "check", "--config", str(path)], capture_output=True, text=True, timeout=60,
        preexec_fn=limit_memory,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert str(path) in result.stderr and "expands to more than 100000 nodes" in result.stderr
    assert time.monotonic() - started < 30


def test_a_secret_interpolated_into_a_config_error_is_masked(tmp_path: Path) -> None:
    """A validation error on a value from ${WANDB_API_KEY} shows `${WANDB_API_KEY}`, not the
    key; so does the runtime error for `api_key_file: "${WANDB_API_KEY}"`."""
    key = "local-0123456789abcdef0123456789abcdef01234567"
    path = tmp_path / "c.yaml"
    path.write_text('wandb: {mode: "${WANDB_API_KEY}"}\nwatch: [{path: ck}]\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env={"WANDB_API_KEY": key})
    assert key not in str(info.value) and "${WANDB_API_KEY}" in str(info.value)

    path.write_text(
        'state_dir: state\nwandb: {mode: online, api_key_file: "${WANDB_API_KEY}"}\n'
        "metrics: {listen: null}\nwatch: [{path: ck}]\n"
    )
    env = {**os.environ, "WANDB_API_KEY": key}
    result = subprocess.run(
        [*CKPTD, "--config", str(path), "--once"], capture_output=True, text=True, timeout=60,
        env=env,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr  # a config that cannot run
    assert key not in result.stderr + result.stdout
    assert "cannot read" in result.stderr and "${WANDB_API_KEY}" in result.stderr


# -- least privilege --------------------------------------------------------------------


def test_state_dir_and_journal_are_private_whatever_the_umask(tmp_path: Path) -> None:
    """With umask 000 the state dir is 0700 and the journal with its -wal and -shm 0600."""
    previous = os.umask(0)
    try:
        journal = Journal(tmp_path / "state").open()
        journal.record_drop("c", "p", "refused", "", 1.0)  # a write: -wal and -shm exist
        try:
            modes = {
                p.name: stat.S_IMODE(p.stat().st_mode)
                for p in (tmp_path / "state").iterdir()
                if p.name.startswith("journal")
            }
            assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
        finally:
            journal.close()
    finally:
        os.umask(previous)
    assert set(modes) == {"journal.sqlite3", "journal.sqlite3-wal", "journal.sqlite3-shm"}
    assert set(modes.values()) == {0o600}


def test_a_key_file_readable_by_others_is_warned_about_by_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A 0644 key file is read with one WARNING naming the file, never its content; a 0600
    one without."""
    from ckptd.sinks.wandb import read_api_key

    key_file = tmp_path / "key"
    key_file.write_text("local-secret-key-content\n")
    config_path = tmp_path / "c.yaml"
    config_path.write_text(f"wandb: {{api_key_file: {key_file}}}\nwatch: [{{path: ck}}]\n")
    config = load_config(config_path)
    key_file.chmod(0o600)
    assert read_api_key(config, {}) == "local-secret-key-content"
    assert not caplog.records
    key_file.chmod(0o644)
    assert read_api_key(config, {}) == "local-secret-key-content"
    (record,) = caplog.records
    assert record.levelname == "WARNING" and str(key_file) in record.getMessage()
    assert "local-secret-key-content" not in caplog.text


def test_restore_refuses_file_references_outside_the_allowed_roots(tmp_path: Path) -> None:
    """A manifest entry referencing file:///etc/... (or s3://) is refused by default; one under
    --allow-reference-root is followed, as are http(s) references."""

    def entry(path: str, ref: str | None) -> StoredFile:
        return StoredFile(path, 1, None if ref else "abc", ref)

    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    held = [entry("model.pt", None)]
    refuse_references(held, "x:v0", ())
    with pytest.raises(RestoreError, match="file:///etc/passwd"):
        refuse_references([entry("p", "file:///etc/passwd")], "x:v0", ())
    with pytest.raises(RestoreError, match="outside the prefixes allowed"):
        refuse_references([entry("p", "s3://bucket/key")], "x:v0", (allowed,))
    inside = [entry("p", f"file://{allowed}/sub/w.pt"), entry("h", "https://a/b")]
    refuse_references(inside, "x:v0", (allowed,))
    escape = [entry("p", f"file://{allowed}/../outside.pt")]
    with pytest.raises(RestoreError, match="outside the directories"):
        refuse_references(escape, "x:v0", (allowed,))


PUBLISH_REFERENCE = """\
import sys, wandb
run = wandb.init(project="hostile", job_type="attacker")
artifact = wandb.Artifact("evil", type="model")
artifact.add_reference(f"file://{sys.argv[1]}", name="weights.pt")
run.log_artifact(artifact, aliases=["latest"])
run.finish()
"""


def test_restore_refuses_a_version_referencing_a_local_file(
    tmp_path: Path, wandb_server: FakeWandbServer
) -> None:
    """`ckptd restore` of a version whose entry references file:///...outside exits 1
    naming the reference, and writes nothing: neither the file nor the destination."""
    outside = tmp_path / "outside.txt"
    outside.write_text(SECRET)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(wandb_server.env(tmp_path / "wandb"), HOME=str(tmp_path))
    subprocess.run(
        [sys.executable, "-c", PUBLISH_REFERENCE, str(outside)], env=env, check=True,
        capture_output=True, timeout=120,
    )  # fmt: skip
    dest = tmp_path / "dest"
    result = subprocess.run(
        [*CKPTD, "restore", "evil", "--to", str(dest), "--project", "hostile"], env=env,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert f"references file://{outside}" in result.stderr
    assert "--allow-reference-root" in result.stderr
    assert not dest.exists()


# -- the metrics server: bounded -------------------------------------------------------------


@contextlib.contextmanager
def health_server(read_timeout: float) -> Iterator[HealthServer]:
    server = HealthServer(
        ("127.0.0.1", (0,)), Metrics(), lambda: None, lambda: None,
        max_connections=4, read_timeout=read_timeout,
    )  # fmt: skip
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def health() -> Iterator[HealthServer]:
    with health_server(read_timeout=0.5) as server:
        yield server


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:  # noqa: S310 - loopback
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_a_silent_connection_is_cut_off_after_the_read_timeout(health: HealthServer) -> None:
    """A client that connects and sends nothing is disconnected after read_timeout."""
    with socket.create_connection(("127.0.0.1", health.port), timeout=10) as conn:
        started = time.monotonic()
        assert conn.recv(1) == b""  # closed by the server
        assert time.monotonic() - started < 5


def test_connections_beyond_the_cap_are_closed_at_once() -> None:
    """With max_connections held open by silent clients, one more is closed at once (long
    before the 10 s read timeout would end it); once they are gone, /healthz answers again."""
    with health_server(read_timeout=10) as health:
        port = health.port
        held = [socket.create_connection(("127.0.0.1", port), timeout=20) for _ in range(4)]
        try:
            wait_until(lambda: health.open_connections == 4, 10, "the held connections")
            with socket.create_connection(("127.0.0.1", port), timeout=20) as extra:
                started = time.monotonic()
                assert extra.recv(1) == b""
                assert time.monotonic() - started < 3
            assert health.open_connections == 4  # the held ones were not cut
        finally:
            for conn in held:
                conn.close()
        wait_until(lambda: get(f"http://127.0.0.1:{port}/healthz")[0] == 200, 10, "healthz")


# -- the daemon: one group of bad files, then a good checkpoint ------------------------------


def published_lines(daemon: Daemon) -> list[str]:
    return [line for line in daemon.log().splitlines() if " published " in line]


def warnings_naming(daemon: Daemon, name: str) -> list[str]:
    return [line for line in daemon.log().splitlines() if "WARNING" in line and name in line]


def recorded_bytes(tmp_path: Path) -> bytes:
    """Everything the daemon stored: the journal and the offline run's .wandb records."""
    state = tmp_path / "state"
    files = [p for p in state.rglob("*") if p.is_file() and "staging" not in p.parts]
    return b"".join(p.read_bytes() for p in files)


def test_bad_files_in_a_watched_directory_are_refused_by_name_and_the_daemon_serves_on(
    tmp_path: Path, wandb_env: dict[str, str], start_daemon: Callable[..., Daemon]
) -> None:
    """FIFOs named like a checkpoint or a sidecar, sidecars with hostile values or nesting, a
    sidecar and a checkpoint file symlinked out of the root, a non-UTF-8 and a 255-byte name:
    the daemon stays up, names each bad file once with its reason, publishes a good
    checkpoint written after them, and nothing from outside the root is stored."""
    root, outside = tmp_path / "ck", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secrets.json").write_text(json.dumps({"step": 7, "token": SECRET}))
    (outside / "weights.bin").write_text(SECRET)
    config = tmp_path / "ckptd.yaml"
    config.write_text(OFFLINE.format(wait="5s"))
    daemon = start_daemon("--config", str(config), env=wandb_env)
    daemon.wait_for_log("ckptd started")

    os.mkfifo(root / "fifo_1.pt")  # a checkpoint name: opening it would block
    os.mkfifo(root / "piped_2.pt.metrics.json")  # a sidecar name
    renamed_in(root, "piped_2.pt")
    bad_values = {
        "deep_3.pt": DEEP,
        "inf_4.pt": b'{"step": Infinity}',
        "nan_5.pt": b'{"step": NaN}',
        "huge_6.pt": b'{"step": 1e400}',
        "wide_7.pt": b'{"step": 1e30}',
        "minf_8.pt": b'{"step": 8, "metrics": {"val_loss": -Infinity}}',
    }
    for name, body in bad_values.items():
        (root / f"{name}.metrics.json").write_bytes(body)
        renamed_in(root, name)
    (root / "leak_9.pt.metrics.json").symlink_to(outside / "secrets.json")
    renamed_in(root, "leak_9.pt")
    unit = root / "checkpoint-10"
    unit.mkdir()
    (unit / "trainer_state.json").write_text('{"global_step": 10}')
    (unit / "model.safetensors").symlink_to(outside / "weights.bin")
    undecodable = os.fsdecode(b"bad\xff_11.pt")
    renamed_in(root, undecodable)
    long_name = "l" * 240 + "_12.pt"  # 246 bytes: with TensorFlow's `_temp` still valid
    longest = "m" * 249 + "_13.pt"  # 255 bytes: `_temp` makes it ENAMETOOLONG
    for name in (long_name, longest):  # renamed_in's temp name would be too long
        os.replace(renamed_in(root, ".long"), root / name)

    written = time.monotonic()
    renamed_in(root, "good_100.pt", step=100, metrics={"val_loss": 0.1})
    daemon.wait_for_log(f"published {root / 'good_100.pt'} as hostile", timeout=60)
    latency = time.monotonic() - written
    assert latency < 15, latency  # settle is 1s; a clean checkpoint takes a few seconds
    for name in ("piped_2.pt", *bad_values, "leak_9.pt", long_name, longest):
        daemon.wait_for_log(f"published {root / name} as hostile", timeout=60)
    assert daemon.proc.poll() is None, daemon.log()

    expected = {
        "fifo_1.pt": "a FIFO, not a regular file",
        "piped_2.pt.metrics.json": "a FIFO, not a regular file",
        "deep_3.pt.metrics.json": "not usable JSON",
        "inf_4.pt.metrics.json": "'step' must be a finite number",
        "nan_5.pt.metrics.json": "'step' must be a finite number",
        "huge_6.pt.metrics.json": "'step' must be a finite number",
        "wide_7.pt.metrics.json": "'step' must be at most 2**63-1",
        "minf_8.pt.metrics.json": "'metrics.val_loss' must be a finite number",
        "leak_9.pt.metrics.json": "outside the watched root",
        "checkpoint-10": "outside the watched root",
        repr(undecodable)[1:-1]: "not valid UTF-8",
    }
    for name, reason in expected.items():
        lines = warnings_naming(daemon, name)
        assert len(lines) == 1, (name, lines)
        assert reason in lines[0], (name, lines[0])
    for name in (long_name, longest):  # handled: published, and nothing to warn about
        assert not [line for line in warnings_naming(daemon, name) if "ckptd.publish" not in line]
    assert "Traceback" not in daemon.log()
    assert daemon.stop() == 0
    stored = recorded_bytes(tmp_path)
    assert SECRET.encode() not in stored
    assert b"bad\xff" not in stored


def test_once_exits_after_a_checkpoint_whose_sidecar_holds_infinite_metrics(
    tmp_path: Path, wandb_env: dict[str, str]
) -> None:
    """`--once` with a -Infinity / 1e400 metric beside a checkpoint publishes it (without
    those metrics) and the next one, and exits 0 instead of retrying for give_up_after."""
    config = tmp_path / "ckptd.yaml"
    config.write_text(OFFLINE.format(wait="1s").replace('"127.0.0.1:0"', "null"))
    root = tmp_path / "ck"
    root.mkdir()
    (root / "bad_1.pt.metrics.json").write_bytes(b'{"metrics": {"val_loss": -Infinity}}')
    renamed_in(root, "bad_1.pt")
    (root / "bad_2.pt.metrics.json").write_bytes(b'{"metrics": {"val_loss": 1e400}}')
    renamed_in(root, "bad_2.pt")
    renamed_in(root, "good_3.pt", step=3, metrics={"val_loss": 0.2})
    result = subprocess.run(
        [*CKPTD, "--config", str(config), "--once"], env=wandb_env, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for name in ("bad_1.pt", "bad_2.pt", "good_3.pt"):
        assert f"published {root / name} as hostile" in result.stderr
    assert "'metrics.val_loss' must be a finite number" in result.stderr


# -- isolation and liveness, in process -------------------------------------------------------


def offline_config(tmp_path: Path, *, stall_after: str = "5m", settle: str = "0s") -> Config:
    (tmp_path / "ck").mkdir(exist_ok=True)
    path = tmp_path / "ckptd.yaml"
    path.write_text(
        "state_dir: state\nwandb: {mode: offline, project: hostile}\n"
        f'metrics: {{listen: "127.0.0.1:0", stall_after: {stall_after}}}\n'
        f"watch: [{{path: ck, artifact: hostile, settle: {settle}, sidecar: {{wait: 0s}}}}]\n"
    )
    return load_config(path)


def test_an_unexpected_exception_drops_that_candidate_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A check that raises something unforeseen drops that candidate as `crashed` (naming
    the exception) and the detector still returns the other finished candidate."""
    config = offline_config(tmp_path)
    detector = Detector(config.watch[0])
    root = config.watch[0].path
    bad, good = renamed_in(root, "bad_1.pt"), renamed_in(root, "good_2.pt")
    real_check = detector.fmt.check

    def check(unit: Path) -> Verdict:
        if unit == bad:
            raise RuntimeError("a bug ckptd did not foresee")
        return real_check(unit)

    monkeypatch.setattr(detector.fmt, "check", check)  # the one way to reach the safety net
    now = time.time() + 60
    detector.scan(now)
    assert [r.unit for r in detector.poll(now)] == [good]
    (drop,) = detector.take_drops()
    assert (drop.path, drop.reason) == (bad, "crashed")
    assert drop.detail == "RuntimeError: a bug ckptd did not foresee"


def hashed_row(journal: Journal, tmp_path: Path, step: int, metrics: dict[str, object]) -> Row:
    snap = tmp_path / "state" / "staging" / f"s{step}"
    snap.mkdir(parents=True)
    (snap / f"c_{step}.pt").write_bytes(b"x" * step)
    files = (FileState.of(f"c_{step}.pt", snap / f"c_{step}.pt"),)
    new = NewRow(
        collection="hostile", watch_path=tmp_path / "ck", relpath=f"c_{step}.pt",
        fingerprint=f"f{step}", format="file", step=step, files=files,
        info=CheckpointInfo(step=step, metrics=metrics), snapshot=snap,
    )  # fmt: skip
    row_id = journal.add(new, 1.0)
    assert row_id is not None
    return journal.mark_hashed(row_id, 2.0, md5s={f"c_{step}.pt": "eA=="}, digest=f"d{step}")


def test_a_value_wandb_cannot_take_fails_that_checkpoint_at_once_not_the_queue(
    tmp_path: Path,
) -> None:
    """A row whose metrics hold -Infinity (an older journal's, say) is `failed` with a drop
    `invalid` at its first attempt, the sink is never called, the collection is not parked,
    and the next checkpoint is first in line."""
    config = offline_config(tmp_path)
    metrics = Metrics()
    with Journal(config.state_dir) as journal:
        bad = hashed_row(journal, tmp_path, 1, {"val_loss": -math.inf})
        after = hashed_row(journal, tmp_path, 2, {"val_loss": 0.5})
        publisher = Publisher(
            config, journal, WandbSink(config), metrics, drops=DropLog(journal, metrics)
        )
        publisher.publish(bad)
        failed = journal.get(bad.id)
        assert failed.state == "failed" and (failed.last_error or "").startswith("invalid: ")
        assert [(d.path, d.reason) for d in journal.drops()] == [(str(bad.source), "invalid")]
        assert journal.parked() == {}
        assert [r.id for r in journal.rows(states=("ready", "hashed"))] == [after.id]
        assert not Path(bad.snapshot or "").exists()  # nothing can make it publishable


def test_healthz_fails_within_stall_after_while_the_coordinator_is_stuck(
    tmp_path: Path, wandb_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """/healthz stays 200 while the coordinator loop steps (past stall_after), answers 503
    naming the stall within stall_after of a step that hangs, and 200 once it moves again."""
    for name, value in wandb_env.items():
        monkeypatch.setenv(name, value)
    service = Service(offline_config(tmp_path, stall_after="3s"), WandbSink)
    stop = threading.Event()
    loop = threading.Thread(target=service.run, args=(stop,), name="ckptd-test-loop")
    service.start()
    try:
        assert service.health is not None
        url = f"http://127.0.0.1:{service.health.port}/healthz"
        loop.start()
        green_until = time.monotonic() + 4
        while time.monotonic() < green_until:
            assert get(url) == (200, "ok\n")
        # Hang the next step where a hung disk would: on the journal (a test-only handle).
        with service.journal._lock:
            stuck_at = time.monotonic()
            wait_until(lambda: get(url)[0] == 503, 10, "healthz 503")
            waited = time.monotonic() - stuck_at
            status, body = get(url)
        assert status == 503 and "coordinator stalled" in body and "stall_after is 3s" in body
        assert waited <= 3 + 1.5  # the step started at most one idle wake before the hang
        wait_until(lambda: get(url) == (200, "ok\n"), 10, "healthz 200 again")
    finally:
        stop.set()
        service.wake.set()
        if loop.is_alive():
            loop.join(30)
        service.shutdown()


# -- fuzzing: sidecar bytes and file names through the parser, detector, journal, planner ----

_KEYS = st.sampled_from(
    ["step", "epoch", "metrics", "aliases", "metadata", "run_path", "description", "val_loss"]
)
_TEXT = st.text(max_size=4) | st.sampled_from(["\ud800", "a\udfff", "step-{step}", "a/b/c"])
_NUMBERS = (
    st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([2**63 - 1, 2**63, 1e30, -0.0, 1e308])
)
_JSON = st.recursive(
    st.none() | st.booleans() | _NUMBERS | _TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS | _TEXT, inner, max_size=3),
    max_leaves=8,
)
SIDECAR_BYTES = (
    st.dictionaries(_KEYS, _JSON, max_size=5).map(lambda value: json.dumps(value).encode())
    | _JSON.map(lambda value: json.dumps(value).encode())
    | st.binary(max_size=32)
    | st.integers(min_value=1, max_value=3000).map(lambda n: b'{"step": ' + b"[" * n)
)
FILE_NAMES = st.one_of(
    st.text(st.characters(exclude_characters="/\x00"), min_size=1, max_size=24).map(
        lambda name: name + ".pt"
    ),
    st.binary(min_size=1, max_size=24).map(
        lambda raw: os.fsdecode(raw.replace(b"/", b"_").replace(b"\x00", b"_")) + ".pt"
    ),
    st.integers(min_value=200, max_value=252).map(lambda n: "x" * n + ".pt"),
    st.sampled_from(["ckpt_99999999999999999999999.pt", "epoch=1-step=1e999-v=1e999.ckpt"]),
)
BATCH = 10  # generated inputs per example: hypothesis's own cost per example dominates


def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))


def publishable(data: dict[str, object]) -> None:
    """What parse returns can be planned and published without a further check failing."""
    json.dumps(data, allow_nan=False)
    step = data.get("step")
    assert step is None or (isinstance(step, int) and 0 <= step <= 2**63 - 1)


@fuzz(600)
@given(bodies=st.lists(SIDECAR_BYTES, min_size=BATCH, max_size=BATCH), flat=st.booleans())
def test_fuzz_sidecar_bytes_give_a_sidecar_error_or_publishable_values(
    bodies: list[bytes], flat: bool
) -> None:
    """6,000 generated sidecars: parse returns publishable values or raises SidecarError."""
    for body in bodies:
        try:
            data = sidecar.parse(body, Path("/ck/x.metrics.json"), flat_metadata=flat)
        except SidecarError:
            continue
        publishable(data)


def test_fuzz_names_and_sidecars_through_detector_journal_and_planner(tmp_path: Path) -> None:
    """4,000 generated file names, each with a generated sidecar: the detector, the journal
    and the publisher's planning step give drops or publishable requests, never a crash."""
    config = offline_config(tmp_path)
    watch, root = config.watch[0], config.watch[0].path
    metrics = Metrics()
    with tmpfs(tmp_path / "fast", "256m") as fast, Journal(fast) as journal:
        drops = DropLog(journal, metrics)
        publisher = Publisher(config, journal, WandbSink(config), metrics, drops=drops)

        @fuzz(400)
        @given(pairs=st.lists(st.tuples(FILE_NAMES, SIDECAR_BYTES), min_size=BATCH, max_size=BATCH))
        def one(pairs: list[tuple[str, bytes]]) -> None:
            shutil.rmtree(root)
            root.mkdir()
            for name, body in pairs:
                try:
                    (root / name).write_bytes(ZIP)
                except (OSError, UnicodeEncodeError):
                    continue  # no filesystem takes it (too long, '.', a surrogate of no byte)
                with contextlib.suppress(OSError):
                    (root / f"{name}.metrics.json").write_bytes(body)
            candidates([root / name for name, _ in pairs])

        def candidates(paths: list[Path]) -> None:
            detector = Detector(watch)
            now = time.time() + 3600
            detector.scan(now)
            for path in paths:
                detector.hint(path, now, moved_in=True)
            ready = detector.poll(now)
            for drop in detector.take_drops():
                assert drop.reason != "crashed", drop
                drops.record(drop, now)
            for found in ready:
                plan(found, now)

        def plan(found: ReadyCheckpoint, now: float) -> None:
            assert not journal.known(watch.artifact, root, found.relpath, found.fingerprint)
            new = NewRow(
                collection=watch.artifact,
                watch_path=root,
                relpath=found.relpath,
                fingerprint=found.fingerprint,
                format=found.format,
                step=found.info.step,
                files=found.files,
                info=found.info,
                snapshot=root,  # a hashed row always has a snapshot; nothing here reads it
            )
            row_id = journal.add(new, now)
            assert row_id is not None
            md5s = {f.name: "eA==" for f in found.files}
            row = journal.mark_hashed(row_id, now, md5s=md5s, digest=str(row_id))
            _, request = publisher._prepare(row, watch)
            assert unpublishable(request) is None, request.facts
            journal.supersede(row_id, now, "out of the next plan's way")

        one()
