"""Keras 3: `.keras` zips and `.h5`/`.weights.h5` HDF5 files written in place, and sharded
weights: `<base>_00000.weights.h5`, ... followed by the `<base>.weights.json` map, last."""

from __future__ import annotations

import glob
import re
from collections.abc import Iterator
from pathlib import Path

from ckptd.checkpoint import FileState
from ckptd.formats import FileFormat, Verdict, is_temp_name
from ckptd.formats.checks import check_file
from ckptd.formats.layout import read_json

__all__ = ["KerasFormat"]

_SUFFIXES = (".keras", ".h5", ".weights.json")
_MAP = ".weights.json"
_SHARD = re.compile(r"(.+)_(\d{5})\.weights\.h5")


class KerasFormat(FileFormat):
    """`format: keras`. A file is ready when its structure is complete (zip end record, HDF5
    end-of-file address) and it settled; a sharded save is one unit, `<base>.weights.json`,
    ready when the map parses and every shard it names is complete."""

    name = "keras"

    def matches(self, name: str) -> bool:
        return name.endswith(_SUFFIXES) and not is_temp_name(name)

    def unit_for(self, root: Path, path: Path) -> Path | None:
        unit = super().unit_for(root, path)
        if unit is None:
            return None
        shard = _SHARD.fullmatch(unit.name)
        if shard is not None:
            # `<base>_00000` always starts a sharded save; epoch-numbered single files
            # (`model_00003.weights.h5`) have no map and no shard zero beside them.
            weights_map = unit.with_name(shard[1] + _MAP)
            if weights_map.exists() or unit.with_name(f"{shard[1]}_00000.weights.h5").exists():
                return weights_map
        return unit

    def scan(self, root: Path) -> Iterator[Path]:
        seen: set[Path] = set()
        for path in super().scan(root):
            unit = self.unit_for(root, path)
            if unit is not None and unit not in seen:
                seen.add(unit)
                yield unit

    def check(self, unit: Path) -> Verdict:
        if not unit.name.endswith(_MAP):
            return super().check(unit)
        if not unit.exists():
            stem = glob.escape(unit.name.removesuffix(_MAP))
            if not any(unit.parent.glob(f"{stem}_[0-9][0-9][0-9][0-9][0-9].weights.h5")):
                raise FileNotFoundError(unit)
            return Verdict(False, f"shards written, {unit.name} not yet")
        files = [FileState.of(unit.name, unit)]
        parsed = read_json(unit)
        weight_map = parsed.value.get("weight_map") if isinstance(parsed.value, dict) else None
        if not isinstance(weight_map, dict):
            return Verdict(False, f"{unit.name} has no weight_map yet", files=tuple(files))
        for shard in sorted({str(v) for v in weight_map.values()}):
            if not shard or "/" in shard or shard in (".", ".."):
                return Verdict(False, f"{unit.name} names {shard!r}, not a file beside it")
            path = unit.with_name(shard)
            try:
                files.append(FileState.of(shard, path))
            except FileNotFoundError:
                reason = f"{unit.name} names {shard}, which is missing"
                return Verdict(False, reason, files=tuple(files))
            problem = check_file(path)
            if problem is not None:
                return Verdict(False, f"{shard}: {problem}", files=tuple(files))
        return Verdict(True, files=tuple(sorted(files, key=lambda f: f.name)))
