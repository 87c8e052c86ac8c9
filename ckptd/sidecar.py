"""Sidecar metrics files: the one-line helper for training scripts, and ckptd's reader.

A training script calls `ckptd.sidecar.write(path, step=..., metrics=...)` right after it
saves a checkpoint. The helper depends on nothing outside the standard library so that it
can be imported in any training environment, and it writes atomically (temp file, then
rename), so ckptd never reads half a sidecar.

Reading accepts the nested form (`{"step": 5, "metrics": {...}, "aliases": [...]}`) and the
flat form (`{"step": 5, "val_loss": 0.2}`: every other numeric key is a metric). Sidecars are
written by whoever can write into the watched directory, so reading trusts nothing: it
opens only regular files inside the root and turns every problem into a SidecarError.
"""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "INSIDE",
    "MAX_DEPTH",
    "MAX_SIDECAR_BYTES",
    "MAX_STEP",
    "RUN_PATH_SHAPE",
    "SUFFIX",
    "candidates",
    "parse",
    "read",
    "valid_run_path",
    "write",
]

SUFFIX = ".metrics.json"  # the sidecar beside a checkpoint: `ckpt_500.pt.metrics.json`
INSIDE = "metrics.json"  # the sidecar inside a directory checkpoint: read, never published
MAX_SIDECAR_BYTES = 1 << 20
MAX_DEPTH = 32  # levels of nesting a sidecar may have
MAX_STEP = 2**63 - 1  # the journal's INTEGER
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
    paths.append(unit / INSIDE)
    return paths


def read(
    unit: Path, root: Path | None = None, *, flat_metadata: bool = False
) -> tuple[dict[str, Any], Path] | None:
    """Find and parse the sidecar of `unit`. None if there is none yet.

    Raises SidecarError (naming the file) if one exists but cannot be used: unreadable, not
    a regular file (a FIFO would block), or, given the watched `root`, resolving outside it.
    `flat_metadata`: see `parse`.
    """
    from ckptd.errors import SidecarError
    from ckptd.inputs import open_regular

    for path in candidates(unit):
        try:
            with open_regular(path, root) as f:
                data = f.read(MAX_SIDECAR_BYTES + 1)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:  # a 255-byte checkpoint name's sidecar
                continue  # cannot exist
            raise SidecarError(f"{path}: refused: {exc.strerror or exc}") from None
        if len(data) > MAX_SIDECAR_BYTES:
            raise SidecarError(
                f"{path}: the sidecar is larger than {MAX_SIDECAR_BYTES} bytes; ignored"
            )
        return parse(data, path, flat_metadata=flat_metadata), path
    return None


def parse(data: bytes, path: Path, *, flat_metadata: bool = False) -> dict[str, Any]:
    """Validate a sidecar's bytes into the nested form. Raises SidecarError naming `path`
    (and the key) on anything else, never another exception.

    Steps are whole numbers in 0..2**63-1; a metric that is not a finite number is left
    out, named in the result's `ignored` (NaN never competes for best); every string is
    valid Unicode and nothing nests deeper than MAX_DEPTH. In the flat form, keys other
    than the documented ones that hold numbers are metrics; others are ignored, or kept as
    metadata when `flat_metadata` is set (the watch entry's `sidecar.flat_metadata`).
    """
    from ckptd.errors import SidecarError

    try:
        raw = json.loads(data.decode("utf-8"))
        _check_document(raw)
        return _validated(raw, flat_metadata)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SidecarError(f"{path}: not valid JSON ({exc})") from None
    except _Invalid as exc:
        raise SidecarError(f"{path}: {exc}") from None
    except (ValueError, RecursionError, MemoryError) as exc:
        # json's own limits: nesting past the interpreter's recursion limit, integers of
        # more than 4300 digits.
        raise SidecarError(f"{path}: not usable JSON ({type(exc).__name__}: {exc})") from None


class _Invalid(ValueError):
    """A problem with one key of a sidecar (parse adds the file's name)."""


def _check_document(raw: Any) -> None:
    """`_check_values` over the whole sidecar, except that a metric may be NaN or infinite:
    such a metric is left out on its own (see `_validated`), the rest of the sidecar stands."""
    if not isinstance(raw, dict):
        return  # _validated says what it should be
    nested = isinstance(raw.get("metrics"), dict)
    for key, item in raw.items():
        _check_text(key, key)
        if nested and key == "metrics":
            for name, value in item.items():
                _check_text(name, f"metrics.{name}")
                _check_values(value, f"metrics.{name}", 2, finite=False)
        else:
            _check_values(item, key, 1, finite=nested or key in _KNOWN)


def _check_values(value: Any, where: str, depth: int, *, finite: bool = True) -> None:
    """Refuse what no JSON consumer downstream can carry: NaN and infinities (json reads
    them, strict JSON and W&B do not) unless `finite` is off (a metric's own value), lone
    surrogates in strings (the journal and W&B need UTF-8), and nesting deeper than
    MAX_DEPTH."""
    if depth > MAX_DEPTH:
        raise _Invalid(f"{where or 'the document'} nests deeper than {MAX_DEPTH} levels")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, f"{where}.{key}" if where else key)
            _check_values(item, f"{where}.{key}" if where else key, depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_values(item, f"{where}[{index}]", depth + 1)
    elif isinstance(value, str):
        _check_text(value, where)
    elif finite and isinstance(value, float) and not math.isfinite(value):
        raise _Invalid(f"{where!r} must be a finite number, got {value!r}")


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _Invalid(f"{where!r} holds text that is not valid Unicode") from None


def _finite(value: Any) -> bool:
    """A finite int or float (not a bool), that fits a float."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _validated(raw: Any, flat_metadata: bool) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise _Invalid(f"expected a JSON object, got {type(raw).__name__}")
    nested = isinstance(raw.get("metrics"), dict)
    if not nested and "metrics" in raw:
        raise _Invalid(f"'metrics' must be an object, got {type(raw['metrics']).__name__}")
    extra = {k: v for k, v in raw.items() if k not in _KNOWN}
    if nested:
        metrics = dict(raw["metrics"])
        extra_metadata: dict[str, Any] = {}
    else:
        metrics = {k: v for k, v in extra.items() if _is_number(v)}
        extra_metadata = {k: v for k, v in extra.items() if k not in metrics}
    ignored = []  # a metric that cannot compete is left out; the rest of the sidecar stands
    for key, value in list(metrics.items()):
        if not _finite(value):
            where = f"metrics.{key}" if nested else key
            ignored.append(f"{where!r} must be a finite number, got {_short(value)}")
            del metrics[key]
    metadata = raw.get("metadata", {})
    if not isinstance(metadata, dict):
        raise _Invalid(f"'metadata' must be an object, got {type(metadata).__name__}")
    out: dict[str, Any] = {
        "metrics": metrics,
        "ignored": ignored,
        "aliases": _aliases(raw.get("aliases", [])),
        "metadata": {**extra_metadata, **metadata} if flat_metadata else metadata,
    }
    step = raw.get("step")
    if step is not None:
        out["step"] = _step(step)
    epoch = raw.get("epoch")
    if epoch is not None:
        if not _finite(epoch):
            raise _Invalid(f"'epoch' must be a number, got {_short(epoch)}")
        out["epoch"] = epoch
    for key in ("run_path", "description"):
        value = raw.get(key)
        if value is not None and not isinstance(value, str):
            raise _Invalid(f"{key!r} must be a string, got {_short(value)}")
        if key == "run_path" and value is not None and not valid_run_path(value):
            raise _Invalid(f"'run_path' must be {RUN_PATH_SHAPE}, got {value!r}")
        out[key] = value
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _step(step: Any) -> int:
    """A whole number the journal can hold (0..2**63-1)."""
    if isinstance(step, bool) or not _finite(step) or step != int(step):
        raise _Invalid(f"'step' must be a whole number, got {_short(step)}")
    if step < 0:
        raise _Invalid(f"'step' cannot be negative, got {step!r}")
    if step > MAX_STEP:
        raise _Invalid(f"'step' must be at most 2**63-1, got {_short(step)}")
    return int(step)


def _aliases(aliases: Any) -> list[str]:
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise _Invalid(f"'aliases' must be a list of strings, got {_short(aliases)}")
    return aliases


def _short(value: Any) -> str:
    """repr of a value for a message, cut short (a hostile value may be megabytes)."""
    try:
        text = repr(value)
    except ValueError:  # an int of more digits than repr allows
        return f"a {type(value).__name__} too large to show"
    return text if len(text) <= 80 else f"{text[:77]}..."
