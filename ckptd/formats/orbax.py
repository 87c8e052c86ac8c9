"""Orbax (JAX, Flax): `<step>/` directories, built as `<step>.orbax-checkpoint-tmp` and renamed
into place, or written in place with `commit_success.txt` last (the commit-file variant)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ckptd.checkpoint import CheckpointInfo, FileState
from ckptd.formats import step_from_name
from ckptd.formats.layout import DirectoryFormat, direct_files, read_json

__all__ = ["OrbaxFormat"]

_COMMIT = "commit_success.txt"
_METADATA = "_CHECKPOINT_METADATA"
_METRICS = "metrics/metrics"


class OrbaxFormat(DirectoryFormat):
    """`format: orbax`. Committed when `commit_success.txt` is in a directory with its final
    name (temp names are never units). Orbax releases that wrote no commit file on local
    disks are ready once `_CHECKPOINT_METADATA` has its commit timestamp, after the settle
    window."""

    name = "orbax"

    def owns(self, entry: Path) -> bool:
        return (entry / _METADATA).is_file() or (entry / _COMMIT).is_file()

    def judge(self, unit: Path, files: tuple[FileState, ...]) -> tuple[str | None, bool]:
        top = direct_files(files)
        meta: Any = None
        if _METADATA in top:
            parsed = self.memo.get("json", unit / _METADATA, top[_METADATA], read_json)
            if not parsed.ok:
                return f"{_METADATA} is not valid JSON yet", False
            meta = parsed.value
        for f in files:
            if f.name == _METRICS and not self.memo.get("json", unit / f.name, f, read_json).ok:
                return f"{_METRICS} is not valid JSON yet", False
        problem = _missing_item(meta, files)
        if problem is not None:
            return problem, False
        if _COMMIT in top:
            # Written in place (open, write, close) on the commit-file path: an empty file is
            # a commit still being written. Orbax always writes a line of text into it.
            if top[_COMMIT].size == 0:
                return f"{_COMMIT} is still being written", False
            return None, True
        if isinstance(meta, dict) and meta.get("commit_timestamp_nsecs") is not None:
            return None, False
        return f"no {_COMMIT} yet", False

    def conclusive(self, unit: Path, files: tuple[FileState, ...]) -> bool:
        """Only the commit file proves an in-place save complete; a commit timestamp alone
        is followed by commit_success.txt on the commit-file path."""
        return _COMMIT in direct_files(files)

    def info(self, unit: Path) -> CheckpointInfo:
        """The step in the name and the metrics of `metrics/metrics` (else the metrics
        recorded in `_CHECKPOINT_METADATA`)."""
        named = step_from_name(unit.name)
        for path, key in ((unit / _METRICS, None), (unit / _METADATA, "metrics")):
            value = read_json(path).value
            if key is not None:
                value = value.get(key) if isinstance(value, dict) else None
            if isinstance(value, dict) and value:
                numbers = {
                    str(k): v
                    for k, v in value.items()
                    if isinstance(v, int | float) and not isinstance(v, bool)
                }
                return CheckpointInfo(step=named.step, metrics=numbers, source=str(path))
        return named


def _missing_item(meta: Any, files: tuple[FileState, ...]) -> str | None:
    """Every item `_CHECKPOINT_METADATA` lists a handler for has files of its own."""
    handlers = meta.get("item_handlers") if isinstance(meta, dict) else None
    if not isinstance(handlers, dict):
        return None
    present = {f.name.split("/")[0] for f in files if "/" in f.name}
    for item in sorted(str(k) for k in handlers):
        if item not in present:
            return f"item {item}/ missing"
    return None
