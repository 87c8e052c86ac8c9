"""torch.distributed.checkpoint (DCP): a directory of `__R_N.distcp` shards, committed when
the coordinator renames `.metadata` into place after every rank's shards are written."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from ckptd.checkpoint import FileState
from ckptd.formats import is_temp_name
from ckptd.formats.checks import check_pickle, guarded
from ckptd.formats.layout import DirectoryFormat, Memo, direct_files, top_entry
from ckptd.inputs import open_regular

__all__ = ["DcpFormat", "dcp_part_problem", "dcp_problem"]

_MARKERS = (".metadata", ".metadata.tmp", "__0_0.distcp")
_METADATA_LIMIT = 256 << 20
_SHARD = re.compile(rb"__\d+_\d+\.distcp")
# Shards come from other nodes, whose clocks (or their file servers') may run a little
# ahead of the coordinator's: a marker older than a shard by less than this still counts.
# A re-save's rewritten shards come a whole save interval after the old marker.
_CLOCK_SKEW_NS = 1_000_000_000


def _named_shards(path: Path) -> frozenset[str]:
    """The `__R_N.distcp` names a DCP `.metadata` mentions (read as bytes, not unpickled)."""
    try:
        if path.stat().st_size > _METADATA_LIMIT:
            return frozenset()
        with open_regular(path) as f:  # never a FIFO swapped in: it would block
            data = f.read(_METADATA_LIMIT + 1)
    except OSError:
        return frozenset()
    return frozenset(m.decode() for m in _SHARD.findall(data))


def dcp_problem(
    directory: Path, files: Mapping[str, FileState], memo: Memo, markers: tuple[str, ...] = ()
) -> str | None:
    """Why the torch DCP checkpoint in `directory` (its direct `files`) is not committed.

    Committed means: no `.metadata.tmp` in flight; `.metadata` (and each of `markers`, such
    as Lightning's `meta.pt`) present and no older than the newest shard (give or take a
    second of clock skew), since a re-save into the same directory leaves the previous
    save's `.metadata` while it rewrites the shards; a complete pickle; every shard it
    names present.
    """
    if ".metadata.tmp" in files:
        return ".metadata.tmp present: the save is being committed (or crashed while it was)"
    shards = {name: f for name, f in files.items() if name.endswith(".distcp")}
    newest = max(shards.values(), key=lambda f: f.mtime_ns, default=None)
    for marker in (".metadata", *markers):
        state = files.get(marker)
        if state is None:
            return f"no {marker} yet (shards still being written, or a crashed save)"
        if newest is not None and state.mtime_ns + _CLOCK_SKEW_NS < newest.mtime_ns:
            return f"{marker} is older than {newest.name} (left from an earlier save)"
    metadata = files[".metadata"]
    problem = memo.get("pickle", directory / ".metadata", metadata, _pickle_problem)
    if problem is not None:
        return f".metadata: {problem}"
    named = memo.get("dcp-shards", directory / ".metadata", metadata, _named_shards)
    missing = sorted(named - shards.keys())
    if missing:
        return f".metadata names {missing[0]}, which is missing"
    return None


def dcp_part_problem(
    directory: Path, files: Mapping[str, FileState], memo: Memo
) -> tuple[str | None, bool]:
    """Why this host's part of a multi-host DCP save in `directory` is not whole, and
    whether a commit marker proves it is.

    A host holds the shards of its own ranks; only the coordinator's host holds `.metadata`,
    whose rename (after every rank's shards, on every host, were written) commits the save:
    there the usual marker rules apply, except that the shards it names live on other hosts.
    Elsewhere nothing marks the end, so shards present and none in flight is a candidate for
    the settle window (and the detector's check that no file is still open for writing).
    """
    if ".metadata.tmp" in files:
        return ".metadata.tmp present: the save is being committed", False
    shards = {name: f for name, f in files.items() if name.endswith(".distcp")}
    if not shards:
        return "no .distcp shards of this host's ranks yet", False
    metadata = files.get(".metadata")
    if metadata is None:
        return None, False
    newest = max(shards.values(), key=lambda f: f.mtime_ns)
    if metadata.mtime_ns + _CLOCK_SKEW_NS < newest.mtime_ns:
        return f".metadata is older than {newest.name} (left from an earlier save)", False
    problem = memo.get("pickle", directory / ".metadata", metadata, _pickle_problem)
    if problem is not None:
        return f".metadata: {problem}", False
    return None, True


def _has_shard(entry: Path) -> bool:
    try:
        with os.scandir(entry) as entries:
            return any(e.name.endswith(".distcp") for e in entries)
    except OSError:
        return False


def _pickle_problem(path: Path) -> str | None:
    return guarded(check_pickle, path)


class DcpFormat(DirectoryFormat):
    """`format: torch-dcp`. Ready when `.metadata` is present and no older than any shard
    (a re-save into the same directory keeps the old `.metadata` while shards change)."""

    name = "torch-dcp"

    def owns(self, entry: Path) -> bool:
        if any((entry / marker).exists() for marker in _MARKERS):
            return True
        # A host of a multi-node job may hold no rank 0 and no `.metadata`: any shard.
        return self.watch.distributed is not None and _has_shard(entry)

    def conclusive(self, unit: Path, files: tuple[FileState, ...]) -> bool:
        """A host's part without `.metadata` is whole only by the settle window: one of
        its ranks may not have opened its shard yet while the others are closed."""
        return self.watch.distributed is None or ".metadata" in direct_files(files)

    def unit_for(self, root: Path, path: Path) -> Path | None:
        located = top_entry(root, path)
        # Any rank's shard names its directory, not only rank 0's (which `owns` looks for).
        if located is not None and located[1] == 2 and path.suffix == ".distcp":
            entry = located[0]
            return None if is_temp_name(entry.name) else entry
        return super().unit_for(root, path)

    def judge(self, unit: Path, files: tuple[FileState, ...]) -> tuple[str | None, bool]:
        if self.watch.distributed is not None:
            return dcp_part_problem(unit, direct_files(files), self.memo)
        return dcp_problem(unit, direct_files(files), self.memo), True
