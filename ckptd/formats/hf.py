"""Hugging Face: the Trainer's `checkpoint-N/` written in place (transformers 4.40+), weights
first, `trainer_state.json` last from rank 0, with no barrier after the other ranks'
`rng_state_R`; and plain `save_pretrained()` directories (a model's `config.json` and weights,
or a PEFT adapter's `adapter_config.json` and `adapter_model.*`), also written in place."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, TypeGuard

from ckptd.checkpoint import CheckpointInfo, FileState
from ckptd.formats import step_from_name
from ckptd.formats.dcp import dcp_problem
from ckptd.formats.deepspeed import deepspeed_problem, read_tag
from ckptd.formats.layout import DirectoryFormat, Memo, direct_files, read_json

__all__ = ["HfPretrainedFormat", "HfTrainerFormat"]

_STATE = "trainer_state.json"
_NAME = re.compile(r"checkpoint-\d+")
_RNG = re.compile(r"rng_state_(\d+)\.pth")
_SHARD = re.compile(r"(.+)-(\d{5})-of-(\d{5})\.(safetensors|bin)")
_BEST = ("best_metric", "best_global_step", "best_model_checkpoint")
_CONFIG = "config.json"
_ADAPTER_CONFIG = "adapter_config.json"
# save_pretrained's weights, unsharded or by their index (transformers, peft).
_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class HfTrainerFormat(DirectoryFormat):
    """`format: hf-trainer`. Ready when trainer_state.json is there, every weight shard an
    index names (or a `-0000k-of-0000N` name implies) is there, and `rng_state_R.pth` runs
    0..N-1; in place without a commit signal, so the settle window applies."""

    name = "hf-trainer"

    def owns(self, entry: Path) -> bool:
        return bool(_NAME.fullmatch(entry.name)) or (entry / _STATE).is_file()

    def judge(self, unit: Path, files: tuple[FileState, ...]) -> tuple[str | None, bool]:
        top = direct_files(files)
        if _STATE not in top:
            return f"no {_STATE} yet (the Trainer writes it last)", False
        problem = (
            _index_problem(unit, top, self.memo)
            or _shard_problem(top)
            or _rng_problem(top)
            or self._nested_problem(unit, files)
        )
        return problem, False

    def _nested_problem(self, unit: Path, files: tuple[FileState, ...]) -> str | None:
        """DeepSpeed (`global_stepN/` + `latest`), FSDP (`pytorch_model_fsdp_0/`) and
        `save_pretrained()` directories saved inside the checkpoint (part of it, not units)."""
        tag = read_tag(unit)
        if tag is not None:
            problem = deepspeed_problem(unit / tag, direct_files(files, tag), self.memo)
            if problem is not None:
                return problem
        subdirs = sorted({f.name.split("/")[0] for f in files if "/" in f.name})
        for subdir in subdirs:
            inner = direct_files(files, subdir)
            problem = None
            if any(name.endswith(".distcp") for name in inner):
                problem = dcp_problem(unit / subdir, inner, self.memo)
            elif _CONFIG in inner or _ADAPTER_CONFIG in inner:
                problem = pretrained_problem(unit / subdir, inner, self.memo)
            if problem is not None:
                return f"{subdir}/: {problem}"
        return None

    def info(self, unit: Path) -> CheckpointInfo:
        """Step, epoch, the latest evaluation's metrics and the best-model fields from
        trainer_state.json; the name's number if that file is missing or malformed."""
        named = step_from_name(unit.name)
        state = read_json(unit / _STATE).value
        if not isinstance(state, dict):
            return named
        step, epoch = state.get("global_step"), state.get("epoch")
        return CheckpointInfo(
            step=step if _is_int(step) else named.step,
            epoch=float(epoch) if _is_number(epoch) and math.isfinite(epoch) else None,
            metrics=_latest_eval(state.get("log_history")),
            metadata={k: state[k] for k in _BEST if state.get(k) is not None},
            source=str(unit / _STATE),
        )


class HfPretrainedFormat(DirectoryFormat):
    """`format: hf-pretrained`. A directory that `save_pretrained()` wrote: `config.json` with
    `model.safetensors` or `pytorch_model.bin` (or an index and every shard it names), or a
    PEFT adapter's `adapter_config.json` with `adapter_model.safetensors` or `.bin`. Written
    in place without a commit signal, so the settle window applies. A Trainer checkpoint is
    never one of these, even though it holds the same files: it is `hf-trainer`'s."""

    name = "hf-pretrained"

    def owns(self, entry: Path) -> bool:
        """An adapter's config or weights (peft writes the weights first); or a model's
        config.json with weights, an index or a shard beside it (transformers writes the
        config first). A config.json alone is not a checkpoint, nor are bare weights."""
        if _NAME.fullmatch(entry.name) or (entry / _STATE).is_file():
            return False
        if any((entry / name).is_file() for name in (_ADAPTER_CONFIG, *_ADAPTER_WEIGHTS)):
            return True
        if not (entry / _CONFIG).is_file():
            return False
        try:
            names = [path.name for path in entry.iterdir()]
        except OSError:
            return False
        weights = (*_WEIGHTS, *_INDEXES)
        return any(name in weights or _SHARD.fullmatch(name) for name in names)

    def judge(self, unit: Path, files: tuple[FileState, ...]) -> tuple[str | None, bool]:
        return pretrained_problem(unit, direct_files(files), self.memo), False

    def conclusive(self, unit: Path, files: tuple[FileState, ...]) -> bool:
        """Never: save_pretrained() writes no last file of its own, and scripts commonly save
        the tokenizer or processor into the same directory right after the weights."""
        return False


def pretrained_problem(directory: Path, top: dict[str, FileState], memo: Memo) -> str | None:
    """Why the `save_pretrained()` files in `directory` (by name: `top`) are not a whole
    model or adapter yet, or None."""
    if _ADAPTER_CONFIG in top or any(name in top for name in _ADAPTER_WEIGHTS):
        if not any(name in top for name in _ADAPTER_WEIGHTS):
            return f"no adapter weights yet ({' or '.join(_ADAPTER_WEIGHTS)})"
        if _ADAPTER_CONFIG not in top:
            return f"no {_ADAPTER_CONFIG} yet (peft writes it after the weights)"
        return None
    if _CONFIG not in top:
        return f"no {_CONFIG} yet"
    indexed = any(name in top for name in _INDEXES)
    if not indexed and not any(name in top for name in _WEIGHTS):
        if any(_SHARD.fullmatch(name) for name in top):
            return _shard_problem(top) or "weight shards without their index"
        return f"no weights yet ({', '.join((*_WEIGHTS, *_INDEXES))})"
    return _index_problem(directory, top, memo) or _shard_problem(top)


def _index_problem(directory: Path, top: dict[str, FileState], memo: Memo) -> str | None:
    """Every `*.index.json` parses and every shard its weight_map names is there."""
    for name in sorted(n for n in top if n.endswith(".index.json")):
        parsed = memo.get("json", directory / name, top[name], read_json)
        weight_map = parsed.value.get("weight_map") if isinstance(parsed.value, dict) else None
        if not isinstance(weight_map, dict):
            return f"{name} has no weight_map"
        for shard in sorted({str(v) for v in weight_map.values()}):
            if shard not in top:
                return f"{name} names {shard}, which is missing"
    return None


def _shard_problem(top: dict[str, FileState]) -> str | None:
    """`model-0000k-of-0000N` shards: all N present, and the index that names them."""
    groups: dict[tuple[str, int, str], set[int]] = {}
    for name in top:
        if match := _SHARD.fullmatch(name):
            groups.setdefault((match[1], int(match[3]), match[4]), set()).add(int(match[2]))
    for (stem, total, ext), present in sorted(groups.items()):
        missing = sorted(set(range(1, total + 1)) - present)
        if missing:
            return f"{stem}-{missing[0]:05d}-of-{total:05d}.{ext} missing"
        if f"{stem}.{ext}.index.json" not in top:
            return f"{stem}.{ext}.index.json missing for {total} shards"
    return None


def _rng_problem(top: dict[str, FileState]) -> str | None:
    """Each rank writes `rng_state_R.pth` when there is more than one: 0..N-1, N >= 2."""
    ranks = sorted(int(m[1]) for name in top if (m := _RNG.fullmatch(name)))
    if not ranks:
        return None
    gaps = sorted(set(range(max(ranks) + 1)) - set(ranks))
    if gaps:
        return f"rng_state_{gaps[0]}.pth missing"
    if len(ranks) == 1:
        return "only rng_state_0.pth: the other ranks' rng_state files have not landed yet"
    return None


def _latest_eval(history: Any) -> dict[str, Any]:
    """The numbers of the last log_history entry that holds evaluation metrics."""
    if not isinstance(history, list):
        return {}
    for entry in reversed(history):
        if isinstance(entry, dict) and any(str(k).startswith("eval_") for k in entry):
            return {
                str(k): v for k, v in entry.items() if k not in ("step", "epoch") and _is_number(v)
            }
    return {}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)
