"""NeMo 2: `<name>/` directories (`weights/` as a Megatron dist checkpoint, `context/`),
bracketed by a sibling `<name>-unfinished` marker that rank 0 touches before the first write
and removes after the last (deletion is bracketed the same way); and `.nemo` tar files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ckptd.checkpoint import FileState
from ckptd.config import WatchConfig
from ckptd.formats import FileFormat, Verdict, is_temp_name
from ckptd.formats.dcp import dcp_problem
from ckptd.formats.layout import DirectoryFormat, direct_files

__all__ = ["MARKER_SUFFIX", "NemoFormat"]

MARKER_SUFFIX = "-unfinished"
_TAR = ".nemo"


def marker_of(unit: Path) -> Path:
    """The sibling marker that exists while `unit` is being written or deleted."""
    return unit.with_name(unit.name + MARKER_SUFFIX)


class NemoFormat(DirectoryFormat):
    """`format: nemo`. A directory is committed once its `-unfinished` marker is gone and it
    holds files (its `weights/` DCP must be complete too); `.nemo` tars need a complete end of
    archive and the settle window."""

    name = "nemo"

    def __init__(self, watch: WatchConfig) -> None:
        super().__init__(watch)
        self._tars = FileFormat(watch.model_copy(update={"patterns": (f"*{_TAR}",)}))

    def owns(self, entry: Path) -> bool:
        if marker_of(entry).exists():
            return True
        return (entry / "weights").is_dir() and (entry / "context").is_dir()

    def unit_for(self, root: Path, path: Path) -> Path | None:
        if path.parent == root and path.name.endswith(MARKER_SUFFIX):
            name = path.name.removesuffix(MARKER_SUFFIX)
            return root / name if name and not is_temp_name(name) else None
        if path.suffix == _TAR and not path.is_dir():
            return self._tars.unit_for(root, path)
        return super().unit_for(root, path)

    def scan(self, root: Path) -> Iterator[Path]:
        yield from super().scan(root)
        yield from self._tars.scan(root)

    def check(self, unit: Path) -> Verdict:
        if unit.suffix == _TAR and not unit.is_dir():
            return self._tars.check(unit)
        return super().check(unit)

    def judge(self, unit: Path, files: tuple[FileState, ...]) -> tuple[str | None, bool]:
        if marker_of(unit).exists():
            return f"{marker_of(unit).name} present: a save (or deletion) is in progress", False
        weights = direct_files(files, "weights")
        if any(name.endswith(".distcp") for name in weights):
            problem = dcp_problem(unit / "weights", weights, self.memo)
            if problem is not None:
                return f"weights/: {problem}", False
        return None, True
