"""The Kubernetes examples: valid manifests (offline schemas), the invariants an operator
relies on, configs that ckptd accepts, a Job handshake that works, and a sane Dockerfile."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml

from ckptd import sidecar
from ckptd.config import Config, load_config
from tests.conftest import CKPTD, wait_until
from tests.support.checkpoints import renamed_in

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "kubernetes"
MANIFESTS = ("pod-sidecar.yaml", "job.yaml")
# 1.29 is the first release with native sidecars on by default; the newest bundled is latest.
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
CLOSE_RUN_SECONDS = 30  # the W&B sink waits this long per collection to finish its run


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def of_kind(name: str, kind: str) -> dict[str, Any]:
    (found,) = [d for d in documents(name) if d["kind"] == kind]
    return found


def pod_spec(name: str) -> dict[str, Any]:
    if name == "job.yaml":
        spec: dict[str, Any] = of_kind(name, "Job")["spec"]["template"]["spec"]
        return spec
    pod: dict[str, Any] = of_kind(name, "Pod")["spec"]
    return pod


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == name]
    return found


def ckptd_config(name: str, tmp_path: Path) -> tuple[Path, Config]:
    """The ckptd.yaml of the manifest's ConfigMap, written out and loaded."""
    path = tmp_path / f"{name}.ckptd.yaml"
    path.write_text(of_kind(name, "ConfigMap")["data"]["ckptd.yaml"])
    return path, load_config(path)


def mount_of(c: dict[str, Any], path: PurePosixPath) -> tuple[str, PurePosixPath] | None:
    """(volume, mount path) of the mount that holds `path` in container `c`, if any."""
    best: tuple[str, PurePosixPath] | None = None
    for m in c.get("volumeMounts", []):
        mount = PurePosixPath(m["mountPath"])
        if (path == mount or mount in path.parents) and (
            best is None or len(mount.parts) > len(best[1].parts)
        ):
            best = (m["name"], mount)
    return best


@pytest.mark.parametrize("name", MANIFESTS)
@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_validate_strictly(name: str, version: str) -> None:
    """Every document validates against the bundled Kubernetes schemas, unknown fields
    rejected (a typo such as `restartpolicy` fails)."""
    for document in documents(name):
        kubernetes_validate.validate(document, version, strict=True)


@pytest.mark.parametrize("name", MANIFESTS)
def test_embedded_config_passes_ckptd_check(name: str, tmp_path: Path) -> None:
    """The ConfigMap's ckptd.yaml passes `ckptd check`."""
    path, _ = ckptd_config(name, tmp_path)
    result = subprocess.run(
        [*CKPTD, "check", "--config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", MANIFESTS)
def test_pod_security_and_shutdown(name: str, tmp_path: Path) -> None:
    """Non-root with the image's uid, no privilege escalation for ckptd's containers, a grace
    period above shutdown_timeout plus closing the runs, and the key mounted from a Secret
    where the config's api_key_file points."""
    spec = pod_spec(name)
    _, config = ckptd_config(name, tmp_path)
    security = spec["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == image_uid() != 0
    needed = config.upload.shutdown_timeout + CLOSE_RUN_SECONDS * len(config.watch)
    assert spec["terminationGracePeriodSeconds"] > needed
    secrets = {v["name"] for v in spec["volumes"] if "secret" in v}
    key_file = config.wandb.api_key_file
    assert key_file is not None
    for name_ in ("restore", "ckptd"):
        c = container(spec, name_)
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        mounted = mount_of(c, PurePosixPath(key_file))
        assert mounted is not None and mounted[0] in secrets, f"{name_}: no key at {key_file}"


@pytest.mark.parametrize("name", MANIFESTS)
def test_restore_runs_first_into_an_unwatched_directory(name: str, tmp_path: Path) -> None:
    """`ckptd restore` is the first init container, falls back best -> latest, skips when the
    directory has a checkpoint, writes to the volume training reads, and not into a watched
    directory (ckptd would publish the restored files again); state_dir shares the
    checkpoints' volume so snapshots are hard links."""
    spec = pod_spec(name)
    restore = spec["initContainers"][0]
    assert restore["name"] == "restore" and restore["args"][0] == "restore"
    args = restore["args"]
    assert args[args.index("--alias") + 1 :][:3] == ["best", "--alias", "latest"]
    assert "--if-missing" in args
    to = PurePosixPath(args[args.index("--to") + 1])
    _, config = ckptd_config(name, tmp_path)
    train, ckptd = container(spec, "train"), container(spec, "ckptd")
    watched = [PurePosixPath(w.path) for w in config.watch]
    assert all(to != w and w not in to.parents and to not in w.parents for w in watched)
    assert mount_of(restore, to) is not None
    assert mount_of(train, to) is not None and mount_of(restore, to) == mount_of(train, to)
    for w in watched:
        assert mount_of(ckptd, w) == mount_of(train, w) is not None
        assert mount_of(ckptd, PurePosixPath(config.state_dir)) == mount_of(ckptd, w)


def test_sidecar_is_native_with_probes() -> None:
    """In the pod, ckptd is an init container with restartPolicy Always after `restore`,
    probed on /healthz (startup, liveness) and /readyz (readiness) at metrics.listen's port."""
    spec = pod_spec("pod-sidecar.yaml")
    names = [c["name"] for c in spec["initContainers"]]
    assert names == ["restore", "ckptd"]
    ckptd = container(spec, "ckptd")
    assert ckptd["restartPolicy"] == "Always"
    assert "restartPolicy" not in container(spec, "restore")
    assert [c["name"] for c in spec["containers"]] == ["train"]
    config = yaml.safe_load(of_kind("pod-sidecar.yaml", "ConfigMap")["data"]["ckptd.yaml"])
    host, _, port = config["metrics"]["listen"].rpartition(":")
    assert host in ("0.0.0.0", "[::]"), "the kubelet probes the pod IP, not loopback"
    ports = {p["name"]: p["containerPort"] for p in ckptd["ports"]}
    probes = {kind: ckptd[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe")}
    probes["readinessProbe"] = ckptd["readinessProbe"]["httpGet"]
    for kind, get in probes.items():
        assert ports[get["port"]] == int(port), kind
    assert probes["startupProbe"]["path"] == probes["livenessProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"


def job_ckptd_args() -> list[str]:
    """The ckptd container's arguments in the Job (the image's entrypoint is ckptd)."""
    ckptd = container(pod_spec("job.yaml"), "ckptd")
    assert "command" not in ckptd, "the Job runs the image's entrypoint: tini, then ckptd"
    return list(ckptd["args"])


def test_job_handshake_is_consistent() -> None:
    """In the Job, ckptd is a regular container (a native sidecar would be stopped when
    training ends, mid-queue), the pod never restarts it in place, and training creates the
    done file that ckptd's --until-file waits for, whatever training's exit status."""
    spec = pod_spec("job.yaml")
    assert spec["restartPolicy"] == "Never"
    assert [c["name"] for c in spec["containers"]] == ["train", "ckptd"]
    assert [c["name"] for c in spec["initContainers"]] == ["restore"]
    args = job_ckptd_args()
    done_file = args[args.index("--until-file") + 1]
    train_script = container(spec, "train")["args"][0]
    lines = [line.strip() for line in train_script.splitlines() if line.strip()]
    assert lines[-2:] == [f"touch {done_file}", 'exit "$status"']
    assert not any(line.startswith("set -e") for line in lines)


def write_checkpoint(ck: Path, name: str) -> None:
    renamed_in(ck, name, 4096)


def start_job_ckptd(
    tmp_path: Path, env: dict[str, str], config_body: str
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """Run ckptd with the Job's arguments, its paths moved under tmp_path."""
    config = tmp_path / "ckptd.yaml"
    config.write_text(config_body)
    done = tmp_path / ".training-done"
    args = job_ckptd_args()
    args[args.index("--config") + 1] = str(config)
    args[args.index("--until-file") + 1] = str(done)
    log = tmp_path / "ckptd-job.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([*CKPTD, *args], env=env, stdout=out, stderr=subprocess.STDOUT)
    return proc, log, config


JOB_CONFIG = """\
state_dir: state
wandb: {mode: offline}
metrics: {listen: null}
watch: [{path: ck, settle: 500ms, sidecar: {wait: 4s}}]
"""


def test_job_ckptd_publishes_everything_then_exits_0(
    tmp_path: Path, wandb_env: dict[str, str]
) -> None:
    """ckptd publishes while training runs; a checkpoint written right before the done file
    (still in its 4 s sidecar wait) is published too, and then ckptd exits 0 by itself."""
    (tmp_path / "ck").mkdir()
    sidecar.write(tmp_path / "ck" / "ckpt_1.pt", step=1, metrics={"val_loss": 1.0})
    write_checkpoint(tmp_path / "ck", "ckpt_1.pt")
    proc, log, config = start_job_ckptd(tmp_path, wandb_env, JOB_CONFIG)
    try:
        wait_until(lambda: "ckpt_1.pt as model-checkpoint" in log.read_text(), 60, "ckpt_1")
        write_checkpoint(tmp_path / "ck", "ckpt_2.pt")
        (tmp_path / ".training-done").touch()
        assert proc.wait(timeout=90) == 0, log.read_text()
        text = log.read_text()
        assert text.index("ckpt_2.pt as model-checkpoint") > text.index("publishing what is left")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    status = subprocess.run(
        [*CKPTD, "status", "--config", str(config)],
        env=wandb_env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "model-checkpoint: 2 published, 0 pending" in status.stdout, (
        status.stdout + log.read_text()
    )


def test_job_ckptd_exits_when_it_cannot_start(tmp_path: Path, wandb_env: dict[str, str]) -> None:
    """A config error ends ckptd with exit 2 at once, not a wait for training."""
    proc, log, _ = start_job_ckptd(tmp_path, wandb_env, "watch: [{path: ck, settle: soon}]\n")
    try:
        assert proc.wait(timeout=60) == 2, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "watch[0].settle" in log.read_text()


def dockerfile_stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuation lines joined), split by FROM."""
    text = re.sub(r"\\\n\s*", " ", (K8S / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    stages: list[list[str]] = []
    for line in instructions:
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def image_uid() -> int:
    (user,) = [line for line in dockerfile_stages()[-1] if line.upper().startswith("USER ")]
    return int(user.split()[1].split(":")[0])


def test_dockerfile_final_stage_is_slim_non_root_without_build_tools() -> None:
    """Multi-stage; the final stage is python:3.11-slim, copies only the virtualenv from the
    build stage, installs no compiler, runs as a numeric non-root user and starts ckptd;
    the build context leaves out everything but the package (no .venv of gigabytes)."""
    text = (K8S / "Dockerfile").read_text()
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in text
    stages = dockerfile_stages()
    assert len(stages) == 2
    assert stages[0][0] == "FROM ${PYTHON_IMAGE} AS build"
    final = stages[-1]
    assert final[0] == "FROM ${PYTHON_IMAGE}"
    copies = [line for line in final if line.upper().startswith("COPY")]
    assert copies == ["COPY --from=build /opt/ckptd /opt/ckptd"]
    body = " ".join(final)
    for tool in ("gcc", "g++", "build-essential", "make ", "python3-dev", "pip install"):
        assert tool not in body, tool
    assert "pip uninstall --yes pip setuptools" in " ".join(stages[0])
    assert image_uid() != 0
    assert final[-2] == 'ENTRYPOINT ["/usr/bin/tini", "--", "ckptd"]'
    ignore = (K8S / "Dockerfile.dockerignore").read_text().splitlines()
    assert ignore[[line.startswith("#") for line in ignore].index(False)] == "*"
