"""What directory checkpoints share: listing a unit's files safely, remembering file checks,
reading small framework files, and the base class of directory formats.

A directory format's unit is an entry directly under the watched root (`checkpoint-500/`,
`global_step500/`, `iter_0000500/`, ...). Only the service's coordinator thread calls
formats, so the memo below needs no lock.
"""

from __future__ import annotations

import fnmatch
import json
import os
from abc import abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from ckptd import sidecar
from ckptd.checkpoint import FileState
from ckptd.config import WatchConfig
from ckptd.formats import CheckpointFormat, Verdict, is_temp_name
from ckptd.formats.checks import check_file
from ckptd.inputs import OutsideRoot, open_regular

__all__ = [
    "DirectoryFormat",
    "Listing",
    "Memo",
    "Parsed",
    "direct_files",
    "list_unit",
    "read_json",
    "read_text",
    "top_entry",
]

T = TypeVar("T")

# Files inside a unit that mean a write is still in flight (safetensors' `.tmpXXXXXX`, DCP's
# `.metadata.tmp`, Orbax item temp dirs); `.nfs*` are deleted-but-open files and not content.
_IN_FLIGHT = ("*.tmp", "*.tmp.*", ".tmp*", "*.partial", "*.part", "*.orbax-checkpoint-tmp*")
_NOT_CONTENT = (".nfs*",)
_SMALL = 4096  # bytes: trackers such as `latest`
_JSON_LIMIT = 64 << 20


def top_entry(root: Path, path: Path) -> tuple[Path, int] | None:
    """The entry directly under `root` that `path` is or lies in, and how deep `path` is."""
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        return None
    if not parts:
        return None
    return root / parts[0], len(parts)


@dataclass(frozen=True)
class Listing:
    """A directory unit's files (names relative to it, sorted), or why they cannot be used."""

    files: tuple[FileState, ...]
    problem: str | None = None
    refused: str | None = None  # a file ckptd must never read: a symlink leaving the root


def list_unit(unit: Path, root: Path) -> Listing:
    """Every regular file under the directory `unit`, following symlinks that stay inside
    `root` and refusing those that leave it. Raises FileNotFoundError if `unit` is gone."""
    if not unit.is_dir():
        if unit.exists():
            return Listing((), f"{unit} is not a directory")
        raise FileNotFoundError(unit)
    out: list[FileState] = []
    try:
        problem = _walk(unit, "", os.path.realpath(root), (os.path.realpath(unit),), out)
    except OutsideRoot as exc:
        return Listing((), str(exc), refused=str(exc))
    except (FileNotFoundError, NotADirectoryError):
        if not unit.is_dir():
            raise FileNotFoundError(unit) from None
        problem = "files changed while they were listed"
    return Listing(tuple(sorted(out, key=lambda f: f.name)), problem)


def _walk(
    directory: Path, prefix: str, real_root: str, ancestors: tuple[str, ...], out: list[FileState]
) -> str | None:
    with os.scandir(directory) as entries:
        ordered = sorted(entries, key=lambda e: e.name)
    for entry in ordered:
        if any(fnmatch.fnmatchcase(entry.name, glob) for glob in _NOT_CONTENT):
            continue
        path, name = Path(entry.path), prefix + entry.name
        if entry.is_symlink():
            target = os.path.realpath(path)
            if not Path(target).is_relative_to(real_root):
                raise OutsideRoot(f"{path} is a symlink to {target}, outside the watched root")
            if not Path(target).exists():
                return f"{path} is a dangling symlink"
        if entry.is_dir():
            real = os.path.realpath(path)
            if real in ancestors:
                return f"{path} links back into the checkpoint (a cycle)"
            problem = _walk(path, name + "/", real_root, (*ancestors, real), out)
            if problem is not None:
                return problem
        elif entry.is_file():
            out.append(FileState.of(name, path))
    return None


def direct_files(files: tuple[FileState, ...], subdir: str = "") -> dict[str, FileState]:
    """The files directly in `subdir` of a unit (the unit itself by default), by base name."""
    prefix = f"{subdir.rstrip('/')}/" if subdir else ""
    return {
        f.name[len(prefix) :]: f
        for f in files
        if f.name.startswith(prefix) and "/" not in f.name[len(prefix) :]
    }


class Memo:
    """Results of reading files, remembered by each file's identity (a re-check of an
    unchanged file costs nothing). Bounded; only the coordinator thread uses it."""

    def __init__(self, limit: int = 4096) -> None:
        self._values: dict[tuple[str, str, FileState], object] = {}
        self._limit = limit

    def get(self, kind: str, path: Path, state: FileState, compute: Callable[[Path], T]) -> T:
        key = (kind, str(path), state)
        if key not in self._values:
            if len(self._values) >= self._limit:
                self._values.clear()
            self._values[key] = compute(path)
        return cast(T, self._values[key])


def read_text(path: Path, limit: int = _SMALL) -> str | None:
    """A small text file's stripped content; None if it is missing, unreadable or too big."""
    try:
        with open_regular(path) as f:
            data = f.read(limit + 1)
    except OSError:
        return None
    if len(data) > limit:
        return None
    return data.decode("utf-8", errors="replace").strip()


@dataclass(frozen=True)
class Parsed:
    """A JSON document read from a file: `ok` is False if it was missing, torn or too big."""

    ok: bool
    value: Any = None


def read_json(path: Path) -> Parsed:
    """Parse a JSON file; never raises."""
    try:
        with open_regular(path) as f:
            data = f.read(_JSON_LIMIT + 1)
        if len(data) > _JSON_LIMIT:
            return Parsed(False)
        return Parsed(True, json.loads(data))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return Parsed(False)


class DirectoryFormat(CheckpointFormat):
    """A format whose checkpoints are directories directly under the watched root.

    Subclasses say which entries are theirs (`owns`) and judge a unit's listed files
    (`judge`); this class lists files, refuses symlinks leaving the root and in-flight temp
    files, and runs the per-file structural checks.
    """

    def __init__(self, watch: WatchConfig) -> None:
        super().__init__(watch)
        self.memo = Memo()

    @abstractmethod
    def owns(self, entry: Path) -> bool:
        """Whether `entry`, directly under the root (perhaps deleted already), is a unit of
        this format, judged by its name and a few cheap stats."""

    @abstractmethod
    def judge(self, unit: Path, files: tuple[FileState, ...]) -> tuple[str | None, bool]:
        """The format's own rules on a listed unit whose files passed their checks:
        (why it is not finished or None, whether a commit signal proves it finished)."""

    def trackers(self, unit: Path) -> tuple[Path, ...]:
        """Files outside `unit` whose writes say it may be finished (see Verdict.signals)."""
        return ()

    def conclusive(self, unit: Path, files: tuple[FileState, ...]) -> bool:
        """Whether passing `judge` proves the unit complete (see Verdict.conclusive)."""
        return True

    def unit_for(self, root: Path, path: Path) -> Path | None:
        located = top_entry(root, path)
        if located is None:
            return None
        entry, _ = located
        if is_temp_name(entry.name) or (entry.exists() and not entry.is_dir()):
            return None
        return entry if self.owns(entry) else None

    def scan(self, root: Path) -> Iterator[Path]:
        with os.scandir(root) as entries:  # is_dir() from the directory entry: no stat
            names = [e.name for e in entries if e.is_dir() and not is_temp_name(e.name)]
        for name in sorted(names):
            if self.owns(root / name):
                yield root / name

    def check(self, unit: Path) -> Verdict:
        signals = _stat_existing(self.trackers(unit), self.watch.path)
        listing = list_unit(unit, self.watch.path)
        files = tuple(f for f in listing.files if f.name != sidecar.INSIDE)
        try:
            problem, committed = self._problem(unit, files, listing.problem)
        except FileNotFoundError:
            if not unit.is_dir():
                raise
            problem, committed = "files changed while they were checked", False
        conclusive = problem is None and self.conclusive(unit, files)
        return Verdict(
            problem is None, problem or "", committed, files, signals,
            conclusive=conclusive, refused=listing.refused,
        )  # fmt: skip

    def _problem(
        self, unit: Path, files: tuple[FileState, ...], listed: str | None
    ) -> tuple[str | None, bool]:
        if listed is not None:
            return listed, False
        if not files:
            return "empty directory", False
        for f in files:
            if any(fnmatch.fnmatchcase(p, g) for p in f.name.split("/") for g in _IN_FLIGHT):
                return f"{f.name} is a temp file: a write is in flight", False
        for f in files:
            problem = self.memo.get("check", unit / f.name, f, check_file)
            if problem is not None:
                return f"{f.name}: {problem}", False
        problem, committed = self.judge(unit, files)
        return problem, committed and problem is None


def _stat_existing(paths: tuple[Path, ...], root: Path) -> tuple[FileState, ...]:
    """Stat the paths that exist, named relative to `root`."""
    states = []
    for path in paths:
        try:
            states.append(FileState.of(path.relative_to(root).as_posix(), path))
        except (FileNotFoundError, ValueError):
            continue
    return tuple(states)
