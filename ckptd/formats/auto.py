"""`format: auto`: recognise each checkpoint by its layout and hand it to its format.

Directory layouts are tried first, most specific first (a Megatron `iter_*/` holds DCP files,
so Megatron must claim it before DCP does; a Trainer's `checkpoint-N/` holds what
`save_pretrained()` writes, so hf-trainer claims it before hf-pretrained does), then
TensorFlow's root-level prefixes, then single files. The owner of a unit is decided again at
every check, because a directory's layout becomes recognisable only as its files land.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

from ckptd.checkpoint import CheckpointInfo
from ckptd.config import WatchConfig
from ckptd.formats import CheckpointFormat, FileFormat, Verdict, step_from_name
from ckptd.formats.dcp import DcpFormat
from ckptd.formats.deepspeed import DeepSpeedFormat
from ckptd.formats.hf import HfPretrainedFormat, HfTrainerFormat
from ckptd.formats.keras import KerasFormat
from ckptd.formats.layout import DirectoryFormat
from ckptd.formats.lightning import LightningFormat
from ckptd.formats.megatron import MegatronFormat
from ckptd.formats.nemo import NemoFormat
from ckptd.formats.orbax import OrbaxFormat
from ckptd.formats.tensorflow import TensorFlowFormat

__all__ = ["FORMATS", "AutoFormat", "build"]

# The order `auto` asks them in: the most specific layout first, a plain file last.
_ORDER: tuple[type[CheckpointFormat], ...] = (
    NemoFormat, HfTrainerFormat, DeepSpeedFormat, MegatronFormat, LightningFormat, DcpFormat,
    OrbaxFormat, HfPretrainedFormat, TensorFlowFormat, KerasFormat, FileFormat,
)  # fmt: skip

FORMATS: dict[str, type[CheckpointFormat]] = {cls.name: cls for cls in _ORDER}
"""Every format by its `format:` name in the config (`auto` is AutoFormat); the config's
`Format` names the same set (tests/test_formats.py holds them to it)."""


class AutoFormat(CheckpointFormat):
    """Every format at once; each unit is owned by the first format that recognises it."""

    name = "auto"

    def __init__(self, watch: WatchConfig) -> None:
        super().__init__(watch)
        self.formats = tuple(cls(watch) for cls in _ORDER)

    def unit_for(self, root: Path, path: Path) -> Path | None:
        for fmt in self.formats:
            unit = fmt.unit_for(root, path)
            if unit is not None:
                return unit
        return None

    def scan(self, root: Path) -> Iterator[Path]:
        seen: set[Path] = set()
        for fmt in self.formats:
            for unit in fmt.scan(root):
                # A recursive file scan also walks into directory checkpoints: keep only
                # what the formats before it do not claim.
                if unit not in seen and self.unit_for(root, unit) == unit:
                    seen.add(unit)
                    yield unit

    def owner(self, unit: Path) -> CheckpointFormat | None:
        """The format that `unit` belongs to now, judged by its name and contents."""
        root = self.watch.path
        for fmt in self.formats:
            if isinstance(fmt, DirectoryFormat) and unit.is_dir() and unit.parent == root:
                if fmt.owns(unit):
                    return fmt
            elif fmt.unit_for(root, unit) == unit:
                return fmt
        return None

    def check(self, unit: Path) -> Verdict:
        fmt = self.owner(unit)
        if fmt is None:
            if not unit.exists():
                raise FileNotFoundError(unit)
            return Verdict(False, "not a checkpoint layout ckptd recognises", unrecognised=True)
        verdict = fmt.check(unit)
        if verdict.ready or not verdict.reason:
            return verdict
        return dataclasses.replace(verdict, reason=f"{fmt.name}: {verdict.reason}")

    def info(self, unit: Path) -> CheckpointInfo:
        fmt = self.owner(unit)
        return fmt.info(unit) if fmt is not None else step_from_name(unit.name)


def build(watch: WatchConfig) -> CheckpointFormat:
    """The format object for a watch entry's `format:` name."""
    if watch.format == "auto":
        return AutoFormat(watch)
    return FORMATS[watch.format](watch)
