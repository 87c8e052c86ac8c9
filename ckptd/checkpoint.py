"""What a checkpoint is, as the pipeline passes it along."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CheckpointInfo", "FileState", "base_of", "content_digest", "fingerprint", "stat_files"]


@dataclass(frozen=True)
class FileState:
    """One file of a checkpoint at one moment: its name inside the checkpoint and its identity.

    Two FileStates with equal fields are the same bytes for every purpose ckptd has: a
    rewrite in place changes mtime_ns or ctime_ns, a replacement changes ino.
    """

    name: str
    size: int
    ino: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, name: str, path: Path) -> FileState:
        """Stat `path` (not following a final symlink's absence: it must exist)."""
        return cls.from_stat(name, path.stat())

    @classmethod
    def from_stat(cls, name: str, st: os.stat_result) -> FileState:
        return cls(name, st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)

    @property
    def identity(self) -> str:
        """What makes these the same bytes at this name. ctime is left out: ckptd's own
        hard-link snapshot changes it (the link count is part of the inode), and every real
        rewrite changes mtime or the inode anyway."""
        return f"{self.name}:{self.size}:{self.ino}:{self.mtime_ns}"

    def same_bytes(self, other: FileState, *, same_inode: bool = True) -> bool:
        """Is `other` the same content as this, by size and mtime (and inode, where the
        file should be the very same one: a link, not a copy)?"""
        if same_inode and self.ino != other.ino:
            return False
        return (self.size, self.mtime_ns) == (other.size, other.mtime_ns)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "size": self.size,
            "ino": self.ino,
            "mtime_ns": self.mtime_ns,
            "ctime_ns": self.ctime_ns,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FileState:
        return cls(
            str(data["name"]),
            int(data["size"]),
            int(data["ino"]),
            int(data["mtime_ns"]),
            int(data["ctime_ns"]),
        )


def base_of(unit: Path) -> Path:
    """The directory a checkpoint unit's file names are relative to: the unit itself for a
    directory, its parent for a single file (see `stat_files`)."""
    return unit if unit.is_dir() else unit.parent


def fingerprint(files: tuple[FileState, ...]) -> str:
    """The identities of a checkpoint's files in one string; a rewrite of any changes it."""
    return ";".join(f.identity for f in files)


def stat_files(unit: Path) -> tuple[FileState, ...]:
    """The files of a checkpoint unit (a file, or every regular file under a directory).

    Names are relative to the unit for a directory; a single file is named by its basename
    (relative to its parent). Symlinked files inside a directory are stat'ed as what they
    point to. Raises FileNotFoundError if the unit vanished.
    """
    if not unit.is_dir():
        return (FileState.of(unit.name, unit),)
    states = []
    for dirpath, dirnames, filenames in os.walk(unit):
        dirnames.sort()
        for filename in sorted(filenames):
            path = Path(dirpath) / filename
            states.append(FileState.of(path.relative_to(unit).as_posix(), path))
    return tuple(states)


def content_digest(md5s: dict[str, str]) -> str:
    """A digest of a checkpoint's content: its file names and their md5s, order-free."""
    h = hashlib.sha256()
    for name in sorted(md5s):
        h.update(name.encode())
        h.update(b"\0")
        h.update(md5s[name].encode())
        h.update(b"\n")
    return h.hexdigest()


@dataclass(frozen=True)
class CheckpointInfo:
    """What the sidecar, the framework's own state files and the name say about a checkpoint."""

    step: int | None = None
    epoch: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    run_path: str | None = None
    description: str | None = None
    source: str | None = None  # the file the information came from, for logs and metadata

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "metrics": self.metrics,
            "aliases": list(self.aliases),
            "metadata": self.metadata,
            "run_path": self.run_path,
            "description": self.description,
            "source": self.source,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CheckpointInfo:
        return cls(
            step=data.get("step"),
            epoch=data.get("epoch"),
            metrics=dict(data.get("metrics") or {}),
            aliases=tuple(data.get("aliases") or ()),
            metadata=dict(data.get("metadata") or {}),
            run_path=data.get("run_path"),
            description=data.get("description"),
            source=data.get("source"),
        )
