"""TensorFlow `tf.train.Checkpoint`: a prefix `ckpt-N` whose files `ckpt-N.index` and
`ckpt-N.data-0000k-of-0000N` sit in the root, merged from `ckpt-N_temp/` and then recorded in
the `checkpoint` state file (written to a temp name and renamed).

A unit is the path root/"ckpt-N", which does not exist; its files are named relative to the
root, where the detector's `ReadyCheckpoint.base` puts them (the unit's parent).
"""

from __future__ import annotations

import errno
import re
from collections.abc import Iterator
from pathlib import Path

from ckptd.checkpoint import FileState
from ckptd.config import WatchConfig
from ckptd.formats import CheckpointFormat, Verdict, is_temp_name
from ckptd.formats.checks import check_tf_index, guarded
from ckptd.formats.layout import Memo, read_text

__all__ = ["STATE_FILE", "TensorFlowFormat", "named_prefixes"]

STATE_FILE = "checkpoint"
_STATE_LIMIT = 1 << 20
_TEMP = "_temp"
_DATA = re.compile(r"(.+)\.data-(\d{5})-of-(\d{5})")
_STATE_LINE = re.compile(r'^\s*(model_checkpoint_path|all_model_checkpoint_paths):\s*"(.*)"\s*$')


def prefix_of(name: str) -> str | None:
    """The prefix a root-level file name belongs to (`ckpt-3.index` -> `ckpt-3`)."""
    if name.endswith(".index"):
        return name.removesuffix(".index") or None
    match = _DATA.fullmatch(name)
    return match[1] if match else None


def named_prefixes(root: Path) -> list[str]:
    """The prefixes the `checkpoint` state file records, the newest first (empty if none)."""
    text = read_text(root / STATE_FILE, _STATE_LIMIT) or ""
    named: list[str] = []
    for line in text.splitlines():
        match = _STATE_LINE.match(line)
        if match is None:
            continue
        recorded = Path(match[2])
        if recorded.is_absolute() and recorded.parent != root:
            continue
        name = recorded.name if recorded.is_absolute() else match[2]
        if name and "/" not in name and name not in named:
            named.append(name)
    return named


class TensorFlowFormat(CheckpointFormat):
    """`format: tensorflow`. Committed when the `checkpoint` state file names the prefix,
    its `.index` is complete, every data shard 0..N-1 is there and `<prefix>_temp/` is gone."""

    name = "tensorflow"

    def __init__(self, watch: WatchConfig) -> None:
        super().__init__(watch)
        self.memo = Memo()

    def unit_for(self, root: Path, path: Path) -> Path | None:
        if path.parent != root:
            return None  # TensorFlow writes into the root; `_temp/` parts are not units
        if path.name == STATE_FILE:
            named = named_prefixes(root)
            return root / named[0] if named else None
        if path.name.endswith(_TEMP):  # its removal is the merge finishing
            prefix = path.name.removesuffix(_TEMP)
            return root / prefix if prefix and not is_temp_name(prefix) else None
        if is_temp_name(path.name):
            return None
        owner = prefix_of(path.name)
        if owner is None:  # the unit itself: a prefix whose files exist
            merging = _is_dir(root / f"{path.name}{_TEMP}")
            found = not path.exists() and (merging or bool(_members(root, path.name)))
            return path if found else None
        return root / owner if not is_temp_name(owner) else None

    def scan(self, root: Path) -> Iterator[Path]:
        prefixes = {prefix_of(entry.name) for entry in root.iterdir() if entry.is_file()}
        for prefix in sorted(p for p in prefixes if p is not None and not is_temp_name(p)):
            yield root / prefix

    def check(self, unit: Path) -> Verdict:
        root, prefix = unit.parent, unit.name
        names = _members(root, prefix)
        temp = _is_dir(root / f"{prefix}{_TEMP}")
        if not names and not temp:
            raise FileNotFoundError(unit)
        try:
            files = tuple(FileState.of(n, root / n) for n in names)
        except FileNotFoundError:
            return Verdict(False, "files changed while they were listed")
        problem = self._problem(root, prefix, files, temp)
        if problem is not None:
            return Verdict(False, problem, files=files)
        return Verdict(True, committed=True, files=files)

    def _problem(
        self, root: Path, prefix: str, files: tuple[FileState, ...], temp: bool
    ) -> str | None:
        if temp:
            return f"{prefix}{_TEMP}/ still there: the shards are being merged"
        by_name = {f.name: f for f in files}
        index = by_name.get(f"{prefix}.index")
        if index is None:
            return f"no {prefix}.index yet"
        shards = [m for n in by_name if (m := _DATA.fullmatch(n)) is not None]
        totals = {int(m[3]) for m in shards}
        if len(totals) != 1:
            return "no data shards yet" if not totals else "data shards disagree on their count"
        (total,) = totals
        missing = sorted(set(range(total)) - {int(m[2]) for m in shards})
        if missing:
            return f"{prefix}.data-{missing[0]:05d}-of-{total:05d} missing"
        problem = self.memo.get("index", root / index.name, index, _index_problem)
        if problem is not None:
            return f"{index.name}: {problem}"
        if prefix not in named_prefixes(root):
            return f"the {STATE_FILE} state file does not name {prefix} yet"
        return None


def _is_dir(path: Path) -> bool:
    """Whether the directory exists. A name one `_temp` too long for the filesystem (a
    255-byte file name plus the suffix) cannot exist: that is no, not an error."""
    try:
        return path.is_dir()
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            return False
        raise


def _members(root: Path, prefix: str) -> list[str]:
    """The names of a prefix's files in the root, sorted."""
    return sorted(p.name for p in root.iterdir() if prefix_of(p.name) == prefix)


def _index_problem(path: Path) -> str | None:
    return guarded(check_tf_index, path)
