"""Megatron-LM: `iter_NNNNNNN/` (or `release/`) directories and the root tracker
`latest_checkpointed_iteration.txt`, written once the iteration is saved. Tokenizer assets
are written into the directory *after* the tracker, so the settle window always applies."""

from __future__ import annotations

import re
from pathlib import Path

from ckptd.checkpoint import FileState
from ckptd.formats.dcp import dcp_problem
from ckptd.formats.layout import DirectoryFormat, direct_files, read_text

__all__ = ["TRACKER", "MegatronFormat"]

TRACKER = "latest_checkpointed_iteration.txt"
_RELEASE = "release"
_ITER = re.compile(r"iter_(\d+)")
_LEGACY = re.compile(r"mp_rank_\d+(?:_\d+)*/model_optim_rng\.pt")


class MegatronFormat(DirectoryFormat):
    """`format: megatron`. Ready when the tracker names this iteration (or a later one) and
    the directory is complete: `metadata.json` plus a committed DCP for torch_dist, or the
    per-rank `model_optim_rng.pt` files of the legacy format."""

    name = "megatron"

    def owns(self, entry: Path) -> bool:
        return bool(_ITER.fullmatch(entry.name)) or entry.name == _RELEASE

    def unit_for(self, root: Path, path: Path) -> Path | None:
        if path.parent == root and path.name == TRACKER:
            tracked = read_text(root / TRACKER)
            if tracked == _RELEASE:
                return root / _RELEASE
            return root / f"iter_{int(tracked):07d}" if tracked and tracked.isdigit() else None
        return super().unit_for(root, path)

    def trackers(self, unit: Path) -> tuple[Path, ...]:
        # Tokenizer assets land after the tracker: the settle window counts from its write.
        return (unit.parent / TRACKER,)

    def conclusive(self, unit: Path, files: tuple[FileState, ...]) -> bool:
        """Never: tokenizer assets land in `iter_*/` after the tracker (settle decides)."""
        return False

    def judge(self, unit: Path, files: tuple[FileState, ...]) -> tuple[str | None, bool]:
        problem = _tracker_problem(unit)
        if problem is not None:
            return problem, False
        top = direct_files(files)
        if "metadata.json" in top:  # torch_dist (or another dist_checkpointing backend)
            if any(name.endswith(".distcp") for name in top):
                return dcp_problem(unit, top, self.memo), False
            return None, False
        if any(_LEGACY.fullmatch(f.name) for f in files):
            return None, False
        return "no metadata.json (torch_dist) nor mp_rank_*/model_optim_rng.pt yet", False


def _tracker_problem(unit: Path) -> str | None:
    """The tracker must name this iteration, or a later one (saved after this one)."""
    tracked = read_text(unit.parent / TRACKER)
    if tracked is None:
        return f"{TRACKER} does not exist yet"
    if unit.name == _RELEASE:
        return None if tracked == _RELEASE else f"{TRACKER} says {tracked!r}, not release"
    match = _ITER.fullmatch(unit.name)
    if not tracked:
        return f"{TRACKER} is empty or being rewritten"
    if not tracked.isdigit() or match is None:
        return f"{TRACKER} is {tracked!r}"
    if int(tracked) < int(match[1]):
        return f"{TRACKER} names iteration {int(tracked)}, not {int(match[1])} yet"
    return None
