"""DeepSpeed: `<tag>/` (default `global_stepN`) with model states and one ZeRO optimizer shard
per data-parallel rank, plus a `latest` tracker that rank 0 writes *before* the final barrier,
so other ranks' optimizer shards may still be landing when it names the tag."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from ckptd.checkpoint import FileState
from ckptd.formats import is_temp_name, step_from_name
from ckptd.formats.checks import torch_saved_ints
from ckptd.formats.layout import DirectoryFormat, Memo, direct_files, read_text

__all__ = ["TRACKER", "DeepSpeedFormat", "deepspeed_part_problem", "deepspeed_problem", "read_tag"]

TRACKER = "latest"
_TAG = re.compile(r"global_step\d+")
_MODEL = re.compile(r"(?:zero_pp_rank_\d+_)?mp_rank_\d+_model_states\.pt")
_RANK0_MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
_OPTIM = re.compile(r"(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt")


def read_tag(directory: Path) -> str | None:
    """The tag a `latest` tracker in `directory` names, if it names a plausible one."""
    tag = read_text(directory / TRACKER)
    if not tag or "/" in tag or tag in (".", "..") or is_temp_name(tag):
        return None
    return tag


def _model_states(path: Path) -> dict[str, int | None]:
    # `optimizer` is None in the model states exactly when ZeRO keeps it in the shards.
    return torch_saved_ints(path, ("dp_world_size", "optimizer"))


def deepspeed_problem(tag_dir: Path, files: Mapping[str, FileState], memo: Memo) -> str | None:
    """Why the DeepSpeed tag directory `tag_dir` (its direct `files`) is not complete.

    Complete means: model states present; unless they hold the optimizer state themselves
    (no ZeRO), for each model-parallel rank ZeRO optimizer shards numbered 0..N-1 without
    gaps, the same N for every rank, and N equal to the `dp_world_size` the model states
    record (zero_to_fp32 refuses any other count).
    """
    models = sorted(name for name in files if _MODEL.fullmatch(name))
    if not models:
        return f"no model states in {tag_dir.name}/ yet"
    stored = memo.get("model-states", tag_dir / models[0], files[models[0]], _model_states)
    shards: dict[tuple[str, int], set[int]] = {}
    for name in files:
        if match := _OPTIM.fullmatch(name):
            shards.setdefault((match[1] or "", int(match[3])), set()).add(int(match[2]))
    if not shards:
        zero = "optimizer" in stored  # stored as None: the state is in ZeRO shards
        return "no ZeRO optimizer shards yet" if zero else None
    for (_, mp), ranks in sorted(shards.items()):
        gaps = sorted(set(range(max(ranks) + 1)) - ranks)
        if gaps:
            return f"optimizer shard of dp rank {gaps[0]} (mp rank {mp}) missing"
    counts = {len(ranks) for ranks in shards.values()}
    if len(counts) > 1:
        return f"model-parallel ranks have different optimizer shard counts {sorted(counts)}"
    (count,) = counts
    world = stored.get("dp_world_size")
    if world is not None and count != world:
        return f"{count} optimizer shard(s) per model-parallel rank, dp_world_size is {world}"
    return None


def deepspeed_part_problem(tag_dir: Path, files: Mapping[str, FileState]) -> str | None:
    """Why this host's part of a multi-host DeepSpeed save in `tag_dir` is not there yet.

    A host holds the files of its own ranks (ZeRO optimizer shards, per-rank model states),
    and only rank 0's host the model states and `latest`: the count and gap rules of a whole
    save span hosts and cannot be checked here, so any rank file is a candidate for the
    settle window (and the detector's check that no file is still open for writing).
    """
    if not any(_MODEL.fullmatch(name) or _OPTIM.fullmatch(name) for name in files):
        return f"no model or optimizer states of this host's ranks in {tag_dir.name}/ yet"
    return None


class DeepSpeedFormat(DirectoryFormat):
    """`format: deepspeed`. Ready when the tag is structurally complete and `latest` names it
    (or a later tag); `latest` comes before the last shards, so the settle window applies."""

    name = "deepspeed"

    def owns(self, entry: Path) -> bool:
        # A custom tag is recognised by rank 0's model states, not by `latest` alone: other
        # tools write trackers of that name too.
        if _TAG.fullmatch(entry.name):
            return True
        return any((entry / name).exists() for name in _RANK0_MODEL_STATES)

    def unit_for(self, root: Path, path: Path) -> Path | None:
        if path.parent == root and path.name == TRACKER:
            tag = read_tag(root)
            return root / tag if tag is not None else None
        return super().unit_for(root, path)

    def trackers(self, unit: Path) -> tuple[Path, ...]:
        return (unit.parent / TRACKER,)

    def conclusive(self, unit: Path, files: tuple[FileState, ...]) -> bool:
        """Only with the tracker: a save without `latest` is judged by structure and settle.
        A host's part of a multi-node save is judged by the settle window alone."""
        return self.watch.distributed is None and (unit.parent / TRACKER).exists()

    def judge(self, unit: Path, files: tuple[FileState, ...]) -> tuple[str | None, bool]:
        if self.watch.distributed is not None:
            problem = deepspeed_part_problem(unit, direct_files(files))
        else:
            problem = deepspeed_problem(unit, direct_files(files), self.memo)
        if problem is not None:
            return problem, False
        if not (unit.parent / TRACKER).exists():
            return None, False  # saved without a tracker: structure and the settle window
        tag = read_tag(unit.parent)
        if tag == unit.name:
            return None, False
        if tag is None:
            return f"{TRACKER} is empty or being rewritten", False
        named, own = step_from_name(tag).step, step_from_name(unit.name).step
        if named is not None and own is not None and named > own:
            return None, False  # the tracker moved on to a later save
        return f"{TRACKER} names {tag!r}, not {unit.name!r} yet", False
