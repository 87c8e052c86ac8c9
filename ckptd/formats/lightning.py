"""PyTorch Lightning: `epoch=3-step=1200.ckpt` files (torch.save, moved into place from
$TMPDIR), and the `.ckpt/` directories of sharded strategies: DCP shards with `meta.pt`
written last (FSDP, ModelParallel) or a DeepSpeed tag with its `latest` (DeepSpeed)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ckptd.checkpoint import CheckpointInfo, FileState
from ckptd.config import WatchConfig
from ckptd.formats import FileFormat, Verdict, step_from_name
from ckptd.formats.checks import torch_saved_ints
from ckptd.formats.dcp import dcp_problem
from ckptd.formats.deepspeed import deepspeed_problem, read_tag
from ckptd.formats.layout import DirectoryFormat, direct_files, top_entry

__all__ = ["LightningFormat"]

_SUFFIX = ".ckpt"


class LightningFormat(DirectoryFormat):
    """`format: lightning`. A `.ckpt` file is ready when its zip is complete and it settled
    (or was renamed in); a sharded `.ckpt/` when `.metadata` and `meta.pt` are both no
    older than every shard (committed), or its DeepSpeed tag is complete (settle window)."""

    name = "lightning"

    def __init__(self, watch: WatchConfig) -> None:
        super().__init__(watch)
        self._files = FileFormat(watch.model_copy(update={"patterns": (f"*{_SUFFIX}",)}))

    def owns(self, entry: Path) -> bool:
        return entry.name.endswith(_SUFFIX)

    def unit_for(self, root: Path, path: Path) -> Path | None:
        located = top_entry(root, path)
        if located is not None and located[0].is_dir():
            return super().unit_for(root, path)
        return self._files.unit_for(root, path)

    def scan(self, root: Path) -> Iterator[Path]:
        yield from super().scan(root)
        yield from self._files.scan(root)

    def check(self, unit: Path) -> Verdict:
        return super().check(unit) if unit.is_dir() else self._files.check(unit)

    def judge(self, unit: Path, files: tuple[FileState, ...]) -> tuple[str | None, bool]:
        tag = read_tag(unit)
        if tag is not None:  # DeepSpeed strategy: `<name>.ckpt/checkpoint/` + `latest`
            return deepspeed_problem(unit / tag, direct_files(files, tag), self.memo), False
        return dcp_problem(unit, direct_files(files), self.memo, markers=("meta.pt",)), True

    def info(self, unit: Path) -> CheckpointInfo:
        """The name's fields (`epoch=3-step=1200-val_loss=0.23`); for names without a step
        (`last.ckpt`) the `global_step` and `epoch` stored in the checkpoint itself."""
        named = step_from_name(unit.name)
        if named.step is not None:
            return named
        source = unit / "meta.pt" if unit.is_dir() else unit
        stored = torch_saved_ints(source, ("global_step", "epoch"))
        step, epoch = stored.get("global_step"), stored.get("epoch")
        if step is None:
            return named
        return CheckpointInfo(
            step=step,
            epoch=float(epoch) if epoch is not None else named.epoch,
            metrics=named.metrics,
            source=str(source),
        )
