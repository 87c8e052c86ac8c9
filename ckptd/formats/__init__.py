"""Checkpoint formats: what a checkpoint unit is for each framework, and when it is finished.

A format answers three questions, all cheap and free of side effects:
- `unit_for(root, path)`: which checkpoint (a file or a directory) a changed path belongs to;
- `scan(root)`: every candidate unit under a watched root (start-up and periodic rescans);
- `check(unit)`: is the unit finished by the format's own rules (commit marker, structure)?

The detector adds what no format knows: the settle window, rename hints and snapshots.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ckptd import sidecar
from ckptd.checkpoint import CheckpointInfo, FileState, stat_files
from ckptd.config import WatchConfig
from ckptd.formats.checks import check_file
from ckptd.inputs import regular_problem

__all__ = [
    "CheckpointFormat",
    "FileFormat",
    "Verdict",
    "format_for",
    "is_temp_name",
    "step_from_name",
]

# Names that are never a checkpoint: editors', rsync's and the frameworks' own temp and
# marker names (see framework-write-patterns.md).
_TEMP_GLOBS = (
    ".*", "*.tmp", "*.tmp.*", "*.partial", "*~", "*.swp", "*.part",
    "*.orbax-checkpoint-tmp*", "tmp-checkpoint-*", "checkpoint.tmp*", "*_temp",
    "checkpoint_tmp", "*-unfinished", "todelete_subdir", "tmp*",
)  # fmt: skip
_TEMP_NAME = re.compile("|".join(fnmatch.translate(glob) for glob in _TEMP_GLOBS))
_LIGHTNING_FIELD = re.compile(r"(?:^|[-_])([A-Za-z_][\w./]*)=(-?\d+(?:\.\d+)?(?:e-?\d+)?)")
_STEP_WORD = re.compile(r"(?:step|iter|global_step|checkpoint|ckpt)[-_=]?(\d+)", re.IGNORECASE)
_NUMBER = re.compile(r"\d+")
_MAX_STEP = 2**63 - 1


def is_temp_name(name: str) -> bool:
    """True for names that a writer uses before its commit (never a checkpoint)."""
    return _TEMP_NAME.match(name) is not None  # one regex: called per file per format


def step_from_name(name: str) -> CheckpointInfo:
    """What a checkpoint's name says: Lightning's `epoch=3-step=1200-val_loss=0.23.ckpt`
    fields, else the number after step/iter/checkpoint, else the last number in the name."""
    stem = name
    for suffix in (".ckpt", ".pt", ".pth", ".safetensors", ".bin", ".keras", ".h5", ".nemo"):
        stem = stem.removesuffix(suffix)
    fields = {key: value for key, value in _LIGHTNING_FIELD.findall(stem)}
    if fields:
        step = fields.pop("step", None)
        epoch = fields.pop("epoch", None)
        return CheckpointInfo(
            step=_whole(step),
            epoch=_whole(epoch),
            metrics={k: float(v) for k, v in fields.items() if math.isfinite(float(v))},
            source="name",
        )
    match = _STEP_WORD.search(stem)
    if match:
        return CheckpointInfo(step=_whole(match[1]), source="name")
    numbers = _NUMBER.findall(stem)
    if numbers:
        return CheckpointInfo(step=_whole(numbers[-1]), source="name")
    return CheckpointInfo()


def _whole(text: str | None) -> int | None:
    """A number from a name as a step the journal can hold (0..2**63-1), else None."""
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:  # Lightning's `step=1.2e3`
        number = float(text)
        if not math.isfinite(number):
            return None
        value = int(number)
    return value if 0 <= value <= _MAX_STEP else None


@dataclass(frozen=True)
class Verdict:
    """The outcome of checking a unit once.

    `ready`: finished by the format's rules. `committed`: the format's own commit signal
    (a marker, a rename) proves it finished, so no settle window is needed. `files`: what
    to publish, as stat'ed during the check. `signals`: files outside the unit that told
    the format it may be finished (a tracker such as Megatron's, named relative to the
    root), as stat'ed during the check: never published, but a change to one restarts the
    settle window like a change to `files` does. `unrecognised`: no format knows the unit's
    layout (the detector reports it once it stays so). `conclusive`: `ready` proves every
    file is written once each is closed after its last write (inotify's evidence may then
    end the settle window early); False where the rule can pass while files still land.
    `refused`: why the unit will never be published (not a regular file, a symlink leaving
    the root), naming the file.
    """

    ready: bool
    reason: str = ""
    committed: bool = False
    files: tuple[FileState, ...] = ()
    signals: tuple[FileState, ...] = ()
    unrecognised: bool = False
    conclusive: bool = True
    refused: str | None = None


class CheckpointFormat(ABC):
    """One framework's checkpoint layout and commit rules."""

    name: str

    def __init__(self, watch: WatchConfig) -> None:
        self.watch = watch

    @abstractmethod
    def unit_for(self, root: Path, path: Path) -> Path | None:
        """The checkpoint unit that `path` (a changed path under `root`) belongs to."""

    @abstractmethod
    def scan(self, root: Path) -> Iterator[Path]:
        """Every candidate unit under `root`, finished or not."""

    @abstractmethod
    def check(self, unit: Path) -> Verdict:
        """Is `unit` finished? Raises FileNotFoundError if it vanished."""

    def info(self, unit: Path) -> CheckpointInfo:
        """What the framework's own files and the name say (step, epoch, metrics)."""
        return step_from_name(unit.name)


class FileFormat(CheckpointFormat):
    """Single-file checkpoints matching `patterns`: torch.save, safetensors, Keras, h5, ...

    Finished when a structural check passes and either the file arrived by rename or it
    kept its identity for the settle window (the detector's part).
    """

    name = "file"

    def matches(self, name: str) -> bool:
        if is_temp_name(name) or name.endswith(sidecar.SUFFIX):
            return False
        return any(fnmatch.fnmatch(name, pattern) for pattern in self.watch.patterns)

    def unit_for(self, root: Path, path: Path) -> Path | None:
        try:
            relative = path.relative_to(root)
        except ValueError:
            return None
        if len(relative.parts) != 1 and not self.watch.recursive:
            return None
        if any(is_temp_name(part) for part in relative.parts[:-1]):
            return None
        return path if self.matches(path.name) else None

    def scan(self, root: Path) -> Iterator[Path]:
        if self.watch.recursive:
            for path in root.rglob("*"):
                if self.unit_for(root, path) is not None and path.is_file():
                    yield path
            return
        with os.scandir(root) as entries:  # is_file() from the directory entry: no stat
            files = [e.name for e in entries if e.is_file() and self.matches(e.name)]
        yield from (root / name for name in sorted(files))

    def check(self, unit: Path) -> Verdict:
        if unit.is_dir():
            return Verdict(False, "a directory, not a checkpoint file")
        refused = regular_problem(unit)  # a FIFO named ckpt.pt would block the reader
        if refused is not None:
            return Verdict(False, refused, refused=refused)
        # Read, then stat: the identity kept with a "whole" verdict is never older than the
        # bytes judged (a write finishing in between would fail the hold's comparison).
        problem = check_file(unit)
        files = stat_files(unit)
        if problem is not None:
            return Verdict(False, problem, files=files)
        return Verdict(True, files=files)


def format_for(watch: WatchConfig) -> CheckpointFormat:
    """The format object for a watch entry (`auto` becomes the detector of every format)."""
    # Imported here: the format modules build on the base classes of this module.
    from ckptd.formats.auto import build

    return build(watch)
