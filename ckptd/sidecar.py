"""Sidecar metrics files: the one-line helper for training scripts, and ckptd's reader.

A training script calls `ckptd.sidecar.write(path, step=..., metrics=...)` right after it
saves a checkpoint. The helper depends on nothing outside the standard library so that it
can be imported in any training environment, and it writes atomically (temp file, then
rename), so ckptd never reads half a sidecar.

Reading accepts the nested form (`{"step": 5, "metrics": {...}, "aliases": [...]}`) and the
flat form (`{"step": 5, "val_loss": 0.2}`: every other numeric key is a metric).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "MAX_SIDECAR_BYTES",
    "RUN_PATH_SHAPE",
    "SUFFIX",
    "candidates",
    "parse",
    "read",
    "valid_run_path",
    "write",
]

SUFFIX = ".metrics.json"
MAX_SIDECAR_BYTES = 1 << 20
_KNOWN = {"step", "epoch", "metrics", "aliases", "metadata", "run_path", "description"}
RUN_PATH_SHAPE = "entity/project/run_id (three non-empty parts)"


def valid_run_path(run_path: str) -> bool:
    """Whether `run_path` has the shape of a W&B run path, `entity/project/run_id`."""
    parts = run_path.split("/")
    return len(parts) == 3 and all(part and part == part.strip() for part in parts)


def write(
    path: str | os.PathLike[str],
    *,
    step: int | None = None,
    metrics: Mapping[str, float] | None = None,
    epoch: float | None = None,
    aliases: Iterable[str] = (),
    metadata: Mapping[str, Any] | None = None,
    run_path: str | None = None,
    description: str | None = None,
) -> Path:
    """Write the sidecar of checkpoint `path` (`<path>.metrics.json`) atomically; return it.

    Call it after the checkpoint is saved, e.g.
    `torch.save(state, "ckpt/ckpt_500.pt"); ckptd.sidecar.write("ckpt/ckpt_500.pt",
    step=500, metrics={"val_loss": 0.231})`.
    """
    target = Path(os.fspath(path))
    sidecar = target.with_name(target.name + SUFFIX)
    body: dict[str, Any] = {"step": step, "metrics": dict(metrics or {})}
    if epoch is not None:
        body["epoch"] = epoch
    if aliases:
        body["aliases"] = list(aliases)
    if metadata:
        body["metadata"] = dict(metadata)
    if run_path is not None:
        body["run_path"] = run_path
    if description is not None:
        body["description"] = description
    if step is None:
        del body["step"]
    # The temp name starts with '.' so that no watcher takes it for a sidecar or checkpoint.
    fd, tmp = tempfile.mkstemp(prefix=f".{sidecar.name}.", suffix=".tmp", dir=sidecar.parent)
    try:
        # mkstemp makes the file 0600; a sidecar must be as readable as the checkpoint it
        # describes (ckptd may run as another user: systemd's DynamicUser, a pod's fsGroup).
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(body, f, allow_nan=True, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, sidecar)  # noqa: PTH105 - the helper stays plain-os on purpose
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return sidecar


def _umask() -> int:
    """This process's umask, read without changing it where Linux tells it (/proc)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:  # noqa: PTH123 - plain os
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it
    os.umask(mask)
    return mask


def candidates(unit: Path) -> list[Path]:
    """Where the sidecar of a checkpoint file or directory may be, in order of precedence."""
    paths = [unit.with_name(unit.name + SUFFIX)]
    if unit.suffix and not unit.is_dir():
        paths.append(unit.with_name(unit.stem + SUFFIX))
    paths.append(unit / "metrics.json")
    return paths


def read(unit: Path) -> tuple[dict[str, Any], Path] | None:
    """Find and parse the sidecar of `unit`. None if there is none yet.

    Raises SidecarError (naming the file) if one exists but cannot be used.
    """
    from ckptd.errors import SidecarError

    for path in candidates(unit):
        try:
            with path.open("rb") as f:
                data = f.read(MAX_SIDECAR_BYTES + 1)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:
            raise SidecarError(f"{path}: cannot read the sidecar: {exc.strerror or exc}") from None
        if len(data) > MAX_SIDECAR_BYTES:
            raise SidecarError(
                f"{path}: the sidecar is larger than {MAX_SIDECAR_BYTES} bytes; ignored"
            )
        return parse(data, path), path
    return None


def parse(data: bytes, path: Path) -> dict[str, Any]:
    """Validate a sidecar's bytes into the nested form. Raises SidecarError naming `path`."""
    from ckptd.errors import SidecarError

    def fail(problem: str) -> SidecarError:
        return SidecarError(f"{path}: {problem}")

    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise fail(f"not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise fail(f"expected a JSON object, got {type(raw).__name__}")
    nested = isinstance(raw.get("metrics"), dict)
    metrics: dict[str, Any] = dict(raw["metrics"]) if nested else {}
    if not nested:
        if "metrics" in raw:
            raise fail(f"'metrics' must be an object, got {type(raw['metrics']).__name__}")
        metrics = {k: v for k, v in raw.items() if k not in _KNOWN}
    out: dict[str, Any] = {"metrics": metrics}
    step = raw.get("step")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, int | float) or step != int(step):
            raise fail(f"'step' must be a whole number, got {step!r}")
        if step < 0:
            raise fail(f"'step' cannot be negative, got {step!r}")
        out["step"] = int(step)
    epoch = raw.get("epoch")
    if epoch is not None:
        if (
            isinstance(epoch, bool)
            or not isinstance(epoch, int | float)
            or not math.isfinite(epoch)
        ):
            raise fail(f"'epoch' must be a number, got {epoch!r}")
        out["epoch"] = epoch
    aliases = raw.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise fail(f"'aliases' must be a list of strings, got {aliases!r}")
    out["aliases"] = aliases
    metadata = raw.get("metadata", {})
    if not isinstance(metadata, dict):
        raise fail(f"'metadata' must be an object, got {type(metadata).__name__}")
    out["metadata"] = metadata
    for key in ("run_path", "description"):
        value = raw.get(key)
        if value is not None and not isinstance(value, str):
            raise fail(f"{key!r} must be a string, got {value!r}")
        if key == "run_path" and value is not None and not valid_run_path(value):
            raise fail(f"'run_path' must be {RUN_PATH_SHAPE}, got {value!r}")
        out[key] = value
    return out
