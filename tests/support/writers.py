"""A corpus of checkpoint writers that replay each ML framework's on-disk write order.

Every writer is a generator: it performs one filesystem operation (or one chunk of an in-place
write), then yields a ``WriterStep`` describing the state it left behind. A test can stop
between any two steps and check that ckptd has published nothing yet; only the last step of a
writer has ``finished=True``. Orders and names follow /work/shared/framework-write-patterns.md
(and, where the report is silent, the framework source it cites).

Large files (``.pt``/``.pth``/``.ckpt``/``.distcp``/``.safetensors``/``.keras``/data shards) are
built in memory with realistic bytes, then written *in place* in ``chunks`` pieces with a
flush after each, so the intermediate states are genuinely torn files (a zip without its
end-of-central-directory record, a safetensors file shorter than its header says).
``.pt``-style files come from the real ``torch.save`` when torch is importable, otherwise from
``zipfile`` in torch's archive layout; ``.safetensors`` comes from the real ``safetensors``
package (numpy API) when importable, otherwise it is encoded by hand.

Public API:

* one writer function per framework layout (``torch_file``, ``hf_trainer``, ...);
* ``WRITERS``: ckptd format name -> default ``WriterSpec`` (variants in ``spec.variants``);
  ``ALL_SPECS`` flattens defaults and variants for ``pytest.mark.parametrize``;
* ``validate_unit``: a structural oracle saying why a unit is not (yet) a complete checkpoint;
* ``rotate`` (``save_total_limit``-style deletion) and ``write_sidecar`` (``.metrics.json``).
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import itertools
import json
import os
import pickle
import random
import shutil
import stat
import string
import struct
import tempfile
import uuid
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, Literal


def _optional_module(name: str) -> Any:
    """Import ``name`` if it is installed, else return None."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


_torch = _optional_module("torch")  # real torch.save bytes when available
_np = _optional_module("numpy")
# Real safetensors bytes when available (the numpy API avoids needing torch).
_st_numpy = _optional_module("safetensors.numpy") if _np is not None else None

__all__ = [
    "ALL_SPECS",
    "DEFAULT_CHUNKS",
    "DEFAULT_SIZE",
    "FORMATS",
    "MEGATRON_TRACKER",
    "NEMO_UNFINISHED_SUFFIX",
    "STEPS_PER_EPOCH",
    "TF_TABLE_MAGIC",
    "USING_SAFETENSORS",
    "USING_TORCH",
    "WRITERS",
    "Writer",
    "WriterSpec",
    "WriterStep",
    "deepspeed",
    "default_metrics",
    "hf_trainer",
    "hf_trainer_late_rng",
    "keras",
    "keras_best",
    "lightning",
    "lightning_sharded",
    "megatron",
    "nemo",
    "orbax",
    "orbax_commit_file",
    "rotate",
    "run_writer",
    "safetensors_problem",
    "tensorflow",
    "torch_dcp",
    "torch_file",
    "torch_file_rename",
    "validate_unit",
    "write_sidecar",
    "zip_problem",
]

USING_TORCH = _torch is not None
"""True when ``.pt``-style files are produced by the real ``torch.save``."""
USING_SAFETENSORS = _st_numpy is not None
"""True when ``.safetensors`` files are produced by the real ``safetensors`` package."""

DEFAULT_SIZE = 4096
"""Default payload bytes per large file: small enough for fast tests."""
DEFAULT_CHUNKS = 2
"""Default number of in-place write chunks per large file."""
STEPS_PER_EPOCH = 100
"""Writers that name checkpoints by epoch derive it as ``step // STEPS_PER_EPOCH``."""

TF_TABLE_MAGIC = 0xDB4775248B80FB57
"""Magic number closing a TensorFlow tensor-bundle ``.index`` (LevelDB table footer)."""

_ZIP_EOCD = b"PK\x05\x06"
_ZIP_DATE = (2024, 1, 1, 0, 0, 0)
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


# --------------------------------------------------------------------------------------------
# Steps and the registry types
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WriterStep:
    """The filesystem state a writer has just produced.

    ``finished`` is True only on the last step, after which the checkpoint is complete.
    ``path`` is the file or directory the step touched, relative to the writer's root.
    """

    description: str
    finished: bool = False
    path: str = ""


Writer = Callable[..., Iterator[WriterStep]]
"""``writer(root, step, **kwargs)``: yields after every intermediate filesystem state."""


def _nothing(step: int, **_: Any) -> frozenset[str]:
    """Default for ``WriterSpec.outside``: the writer leaves nothing outside the unit."""
    return frozenset()


@dataclasses.dataclass(frozen=True)
class WriterSpec:
    """How to drive one writer and what it must leave behind.

    ``unit(step, **kw)`` is the checkpoint unit relative to the writer root: a file, a
    directory, or (``kind == "prefix"``, TensorFlow) a file-name prefix.
    ``files(step, **kw)`` are the artifact entry names that must be published: paths relative
    to the unit for directories, and the file names themselves (relative to the unit's parent)
    for file and prefix units.
    ``outside(step, **kw)`` are files the writer leaves next to the unit, relative to root
    (trackers such as ``latest``/``checkpoint``); they are not part of the unit.
    ``kwargs`` passed to ``run``/``unit``/``files``/``outside`` must be the same.
    """

    format: str
    variant: str
    writer: Writer
    unit: Callable[..., PurePosixPath]
    files: Callable[..., frozenset[str]]
    kind: Literal["file", "dir", "prefix"]
    description: str
    outside: Callable[..., frozenset[str]] = _nothing
    variants: Mapping[str, WriterSpec] = dataclasses.field(default_factory=dict)

    @property
    def id(self) -> str:
        """``format`` for the default variant, else ``format/variant`` (pytest ids)."""
        return self.format if self.variant == "default" else f"{self.format}/{self.variant}"

    def steps(self, root: Path, step: int, **kwargs: Any) -> Iterator[WriterStep]:
        """Start this writer; advance the returned generator one state at a time."""
        return self.writer(root, step, **kwargs)

    def run(self, root: Path, step: int, **kwargs: Any) -> list[WriterStep]:
        """Run the writer to completion and return all its steps."""
        return run_writer(self.writer(root, step, **kwargs))

    def unit_path(self, root: Path, step: int, **kwargs: Any) -> Path:
        """Absolute path of the unit (for ``prefix`` units: root / prefix)."""
        return root / self.unit(step, **kwargs)

    def all(self) -> tuple[WriterSpec, ...]:
        """This spec followed by its variants."""
        return (self, *self.variants.values())


def run_writer(steps: Iterator[WriterStep]) -> list[WriterStep]:
    """Exhaust a writer generator and return its steps."""
    return list(steps)


# --------------------------------------------------------------------------------------------
# Content builders
# --------------------------------------------------------------------------------------------


def _payload(size: int, seed: str) -> bytes:
    """``size`` deterministic pseudo-random bytes derived from ``seed``."""
    return random.Random(seed).randbytes(size)


@dataclasses.dataclass(frozen=True)
class _Blob:
    """Placeholder for a uint8 tensor of ``size`` deterministic bytes inside a .pt object."""

    size: int
    seed: str


def _materialize(obj: Any, convert: Callable[[_Blob], Any]) -> Any:
    """Replace every ``_Blob`` in a nested dict/list/tuple structure via ``convert``."""
    if isinstance(obj, _Blob):
        return convert(obj)
    if isinstance(obj, dict):
        return {k: _materialize(v, convert) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_materialize(v, convert) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialize(v, convert) for v in obj)
    return obj


def _zip_info(name: str) -> zipfile.ZipInfo:
    """A zip member header with a fixed timestamp, so archives are reproducible."""
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
    info.compress_type = zipfile.ZIP_STORED
    return info


def _pt_bytes(obj: Any) -> bytes:
    """Bytes of ``torch.save(obj)``; ``_Blob``s become uint8 tensors.

    Without torch, an equivalent zip in torch's ``archive/`` layout (``data.pkl``,
    ``byteorder``, ``data/<n>``, ``version``) is produced instead.
    """
    if _torch is not None:
        torch = _torch

        def to_tensor(blob: _Blob) -> Any:
            raw = bytearray(_payload(blob.size, blob.seed))
            if not raw:
                return torch.empty(0, dtype=torch.uint8)
            return torch.frombuffer(raw, dtype=torch.uint8)

        buf = io.BytesIO()
        torch.save(_materialize(obj, to_tensor), buf)
        return buf.getvalue()

    storages: list[bytes] = []

    def to_ref(blob: _Blob) -> tuple[str, str, int]:
        storages.append(_payload(blob.size, blob.seed))
        return ("storage", str(len(storages) - 1), blob.size)

    pickled = pickle.dumps(_materialize(obj, to_ref), protocol=2)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(_zip_info("archive/data.pkl"), pickled)
        zf.writestr(_zip_info("archive/byteorder"), "little")
        for index, data in enumerate(storages):
            zf.writestr(_zip_info(f"archive/data/{index}"), data)
        zf.writestr(_zip_info("archive/version"), "3\n")
    return buf.getvalue()


def _safetensors_bytes(tensors: Mapping[str, _Blob]) -> bytes:
    """A valid safetensors file holding float32 vectors (blob sizes rounded down to 4)."""
    metadata = {"format": "pt"}
    if _st_numpy is not None:
        arrays = {
            name: _np.frombuffer(_payload(b.size - b.size % 4, b.seed), dtype=_np.float32)
            for name, b in tensors.items()
        }
        return bytes(_st_numpy.save(arrays, metadata=metadata))
    header: dict[str, Any] = {"__metadata__": metadata}
    data = bytearray()
    for name in sorted(tensors):
        blob = tensors[name]
        raw = _payload(blob.size - blob.size % 4, blob.seed)
        header[name] = {
            "dtype": "F32",
            "shape": [len(raw) // 4],
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + bytes(data)


def _json_bytes(obj: Any, indent: int | None = 2) -> bytes:
    """JSON as frameworks write it (indented, trailing newline)."""
    return (json.dumps(obj, indent=indent, sort_keys=True) + "\n").encode()


def _tf_index_bytes(entries: Iterable[str], seed: str) -> bytes:
    """A stand-in tensor-bundle index: key blocks then a 48-byte LevelDB table footer."""
    body = b"".join(e.encode() + b"\x00" + _payload(24, seed + e) for e in entries)
    handles = b"\x00" * 40  # metaindex + index block handles (varints), zero-padded
    return body + handles + struct.pack("<Q", TF_TABLE_MAGIC)


def default_metrics(step: int) -> dict[str, float]:
    """The deterministic metrics every writer records for ``step`` (eval_loss falls)."""
    eval_loss = round(0.5 + 100.0 / (step + 50), 4)
    return {"eval_loss": eval_loss, "loss": round(eval_loss * 1.1, 4), "accuracy": 0.5}


# --------------------------------------------------------------------------------------------
# Filesystem step helpers (each yields exactly the states it creates)
# --------------------------------------------------------------------------------------------


def _rel(root: Path, path: Path) -> str:
    """``path`` relative to ``root`` as a posix string (or absolute when outside root)."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _split(data: bytes, chunks: int) -> list[bytes]:
    """Split ``data`` into ``chunks`` non-empty consecutive pieces (fewer if it is tiny)."""
    chunks = max(1, min(chunks, len(data)))
    bounds = [len(data) * i // chunks for i in range(chunks + 1)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def _write_chunked(
    root: Path, path: Path, data: bytes, chunks: int, *, finished: bool = False
) -> Iterator[WriterStep]:
    """Write ``data`` in place: open (truncate), then chunk by chunk with a flush each.

    States: empty file, each partial prefix, complete and closed.
    """
    rel = _rel(root, path)
    pieces = _split(data, chunks)
    with path.open("wb") as fh:
        yield WriterStep(f"{rel} opened for writing (empty)", path=rel)
        for index, piece in enumerate(pieces[:-1], start=1):
            fh.write(piece)
            fh.flush()
            yield WriterStep(f"{rel} partially written ({index}/{len(pieces)})", path=rel)
        fh.write(pieces[-1])
    yield WriterStep(f"{rel} written", finished=finished, path=rel)


def _write_small(
    root: Path, path: Path, data: bytes, *, finished: bool = False, note: str = "written"
) -> Iterator[WriterStep]:
    """Write a small file in place with a single write (one state)."""
    path.write_bytes(data)
    rel = _rel(root, path)
    yield WriterStep(f"{rel} {note}", finished=finished, path=rel)


def _rewrite_tracker(
    root: Path, path: Path, text: str, *, finished: bool = False
) -> Iterator[WriterStep]:
    """Rewrite a tracker file in place the way ``open(path, "w").write(text)`` does."""
    rel = _rel(root, path)
    with path.open("w") as fh:
        yield WriterStep(f"{rel} truncated by open('w')", path=rel)
        fh.write(text)
    yield WriterStep(f"{rel} written: {text.strip()!r}", finished=finished, path=rel)


def _mkdir(root: Path, path: Path) -> Iterator[WriterStep]:
    """Create a directory (and parents), one state."""
    path.mkdir(parents=True, exist_ok=True)
    rel = _rel(root, path)
    yield WriterStep(f"{rel}/ created", path=rel)


def _rename(root: Path, src: Path, dst: Path, *, finished: bool = False) -> Iterator[WriterStep]:
    """``os.replace(src, dst)``: one atomic state change."""
    os.replace(src, dst)
    rel = _rel(root, dst)
    yield WriterStep(f"{_rel(root, src)} renamed to {rel}", finished=finished, path=rel)


def _temp_name(directory: Path, prefix: str = ".tmp", length: int = 6) -> Path:
    """Reserve a fresh ``<prefix>XXXXXX`` file in ``directory`` (like Rust's NamedTempFile)."""
    alphabet = string.ascii_letters + string.digits
    rng = random.SystemRandom()
    while True:
        candidate = directory / (prefix + "".join(rng.choice(alphabet) for _ in range(length)))
        try:
            fd = os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            continue
        os.close(fd)
        return candidate


def _dcp_shards(
    root: Path,
    directory: Path,
    *,
    ranks: int,
    size: int,
    chunks: int,
    seed: str,
) -> Iterator[WriterStep]:
    """Torch DCP: every rank writes ``__{rank}_0.distcp`` in place (torch.save'd items)."""
    for rank in range(ranks):
        items = [
            _pt_bytes(_Blob(size // 2, f"{seed}/rank{rank}/item0")),
            _pt_bytes(_Blob(size - size // 2, f"{seed}/rank{rank}/item1")),
        ]
        yield from _write_chunked(root, directory / f"__{rank}_0.distcp", b"".join(items), chunks)


def _dcp_metadata(
    root: Path, directory: Path, *, ranks: int, seed: str, finished: bool = False
) -> Iterator[WriterStep]:
    """DCP ``finish()``: ``.metadata.tmp`` written, old ``.metadata`` removed, then renamed."""
    metadata = {
        "version": "1.0.0",
        "seed": seed,
        "storage_data": {
            f"model.layers.{rank}.weight": {"relative_path": f"__{rank}_0.distcp", "offset": 0}
            for rank in range(ranks)
        },
        "planner_data": {f"model.layers.{rank}.weight": ["model", rank] for rank in range(ranks)},
    }
    tmp = directory / ".metadata.tmp"
    yield from _write_small(root, tmp, pickle.dumps(metadata, protocol=4))
    final = directory / ".metadata"
    if final.exists():
        final.unlink()
        yield WriterStep(f"old {_rel(root, final)} removed", path=_rel(root, final))
    yield from _rename(root, tmp, final, finished=finished)


def _dcp_files(ranks: int) -> frozenset[str]:
    """File names of a DCP directory written by ``ranks`` ranks."""
    return frozenset({".metadata", *(f"__{rank}_0.distcp" for rank in range(ranks))})


# --------------------------------------------------------------------------------------------
# "file": plain torch.save
# --------------------------------------------------------------------------------------------


def _torch_file_name(step: int, **_: Any) -> PurePosixPath:
    """Unit of the ``file`` writers."""
    return PurePosixPath(f"model-{step}.pt")


def _torch_file_obj(step: int, size: int) -> dict[str, Any]:
    """What a training script typically passes to ``torch.save``."""
    return {
        "step": step,
        "model": {"linear.weight": _Blob(size, f"file/{step}/model")},
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
        "metrics": default_metrics(step),
    }


def torch_file(
    root: Path, step: int, *, size: int = DEFAULT_SIZE, chunks: int = DEFAULT_CHUNKS
) -> Iterator[WriterStep]:
    """``torch.save(obj, root/"model-<step>.pt")``: one zip written in place, EOCD last."""
    root.mkdir(parents=True, exist_ok=True)
    data = _pt_bytes(_torch_file_obj(step, size))
    yield from _write_chunked(root, root / _torch_file_name(step), data, chunks, finished=True)


def torch_file_rename(
    root: Path, step: int, *, size: int = DEFAULT_SIZE, chunks: int = DEFAULT_CHUNKS
) -> Iterator[WriterStep]:
    """``torch.save`` to ``.tmpXXXXXX`` in the same directory, then ``os.replace`` to the name."""
    root.mkdir(parents=True, exist_ok=True)
    data = _pt_bytes(_torch_file_obj(step, size))
    tmp = _temp_name(root)
    yield from _write_chunked(root, tmp, data, chunks)
    yield from _rename(root, tmp, root / _torch_file_name(step), finished=True)


# --------------------------------------------------------------------------------------------
# "lightning"
# --------------------------------------------------------------------------------------------


def _lightning_name(
    step: int, *, steps_per_epoch: int = STEPS_PER_EPOCH, **_: Any
) -> PurePosixPath:
    """``ModelCheckpoint`` default name: ``epoch=E-step=S.ckpt``."""
    return PurePosixPath(f"epoch={step // steps_per_epoch}-step={step}.ckpt")


def _lightning_meta(root: Path, step: int, steps_per_epoch: int) -> dict[str, Any]:
    """The non-tensor part of a Lightning checkpoint, incl. ModelCheckpoint callback state."""
    metrics = default_metrics(step)
    path = str(root / _lightning_name(step, steps_per_epoch=steps_per_epoch))
    callback_key = (
        "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min', 'every_n_train_steps': 0,"
        " 'every_n_epochs': 1, 'train_time_interval': None}"
    )
    return {
        "epoch": step // steps_per_epoch,
        "global_step": step,
        "pytorch-lightning_version": "2.5.1",
        "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": step // 100}}}},
        "callbacks": {
            callback_key: {
                "monitor": "val_loss",
                "best_model_score": metrics["eval_loss"],
                "best_model_path": path,
                "current_score": metrics["eval_loss"],
                "dirpath": str(root),
                "best_k_models": {path: metrics["eval_loss"]},
                "kth_best_model_path": path,
                "kth_value": metrics["eval_loss"],
                "last_model_path": "",
            }
        },
        "hparams_name": "kwargs",
        "hyper_parameters": {"lr": 1e-3},
    }


def lightning(
    root: Path,
    step: int,
    *,
    size: int = DEFAULT_SIZE,
    chunks: int = DEFAULT_CHUNKS,
    steps_per_epoch: int = STEPS_PER_EPOCH,
    tmpdir: Path | None = None,
) -> Iterator[WriterStep]:
    """Lightning ``_atomic_save``: torch.save into ``mkstemp()`` in $TMPDIR, then move.

    ``tmpdir`` stands in for $TMPDIR; it defaults to a sibling of ``root`` (outside the
    watched tree) on the same filesystem, so the final move is an atomic rename that
    inotify reports as a create in ``root``.
    """
    root.mkdir(parents=True, exist_ok=True)
    tmpdir = tmpdir if tmpdir is not None else root.parent / f"{root.name}.TMPDIR"
    tmpdir.mkdir(parents=True, exist_ok=True)
    obj = _lightning_meta(root, step, steps_per_epoch)
    obj["state_dict"] = {"model.weight": _Blob(size, f"lightning/{step}")}
    obj["optimizer_states"] = [{"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]}]
    obj["lr_schedulers"] = []
    fd, tmp_name = tempfile.mkstemp(dir=tmpdir)
    os.close(fd)
    tmp = Path(tmp_name)
    yield from _write_chunked(root, tmp, _pt_bytes(obj), chunks)
    final = root / _lightning_name(step, steps_per_epoch=steps_per_epoch)
    yield from _rename(root, tmp, final, finished=True)


def lightning_sharded(
    root: Path,
    step: int,
    *,
    ranks: int = 2,
    size: int = DEFAULT_SIZE,
    chunks: int = DEFAULT_CHUNKS,
    steps_per_epoch: int = STEPS_PER_EPOCH,
) -> Iterator[WriterStep]:
    """FSDP/ModelParallel strategy: ``epoch=E-step=S.ckpt/`` of DCP files, ``meta.pt`` last."""
    unit = root / _lightning_name(step, steps_per_epoch=steps_per_epoch)
    yield from _mkdir(root, unit)
    seed = f"lightning-sharded/{step}"
    yield from _dcp_shards(root, unit, ranks=ranks, size=size, chunks=chunks, seed=seed)
    yield from _dcp_metadata(root, unit, ranks=ranks, seed=seed)
    meta = _pt_bytes(_lightning_meta(root, step, steps_per_epoch))
    yield from _write_small(root, unit / "meta.pt", meta, finished=True)


# --------------------------------------------------------------------------------------------
# "hf-trainer"
# --------------------------------------------------------------------------------------------


def _hf_name(step: int, **_: Any) -> PurePosixPath:
    """``checkpoint-{global_step}``."""
    return PurePosixPath(f"checkpoint-{step}")


def _hf_shard_names(shards: int) -> list[str]:
    """Weight files written by ``save_pretrained`` for ``shards`` shards."""
    if shards == 1:
        return ["model.safetensors"]
    return [f"model-{k:05d}-of-{shards:05d}.safetensors" for k in range(1, shards + 1)]


def _hf_rng_names(ranks: int) -> list[str]:
    """``rng_state.pth`` for one process, else one ``rng_state_{rank}.pth`` per rank."""
    return ["rng_state.pth"] if ranks == 1 else [f"rng_state_{r}.pth" for r in range(ranks)]


_HF_TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")


def _hf_files(step: int, *, ranks: int = 2, shards: int = 2, **_: Any) -> frozenset[str]:
    """Everything in a finished ``checkpoint-N/``."""
    names = {
        "config.json",
        "generation_config.json",
        *_hf_shard_names(shards),
        *_HF_TOKENIZER_FILES,
        "training_args.bin",
        "optimizer.pt",
        "scheduler.pt",
        *_hf_rng_names(ranks),
        "trainer_state.json",
    }
    if shards > 1:
        names.add("model.safetensors.index.json")
    return frozenset(names)


def _hf_trainer_state(root: Path, step: int) -> dict[str, Any]:
    """A realistic ``trainer_state.json`` (v5 field set) for a save at ``step``."""
    metrics = default_metrics(step)
    log_history: list[dict[str, Any]] = []
    for s in range(10, step + 1, 10):
        log_history.append(
            {
                "epoch": round(s / STEPS_PER_EPOCH, 4),
                "grad_norm": 1.0,
                "learning_rate": 5e-5,
                "loss": default_metrics(s)["loss"],
                "step": s,
            }
        )
    log_history.append(
        {
            "epoch": round(step / STEPS_PER_EPOCH, 4),
            "eval_loss": metrics["eval_loss"],
            "eval_runtime": 1.5,
            "eval_samples_per_second": 100.0,
            "eval_steps_per_second": 12.5,
            "step": step,
        }
    )
    return {
        "best_global_step": step,
        "best_metric": metrics["eval_loss"],
        "best_model_checkpoint": str(root / _hf_name(step)),
        "epoch": round(step / STEPS_PER_EPOCH, 4),
        "eval_steps": step,
        "global_step": step,
        "is_hyper_param_search": False,
        "is_local_process_zero": True,
        "is_world_process_zero": True,
        "log_history": log_history,
        "logging_steps": 10,
        "max_steps": 10 * STEPS_PER_EPOCH,
        "num_input_tokens_seen": 0,
        "num_train_epochs": 10,
        "save_steps": step,
        "stateful_callbacks": {
            "TrainerControl": {
                "args": {
                    "should_epoch_stop": False,
                    "should_evaluate": False,
                    "should_log": False,
                    "should_save": True,
                    "should_training_stop": False,
                },
                "attributes": {},
            }
        },
        "total_flos": float(step) * 1.0e12,
        "train_batch_size": 8,
        "trial_name": None,
        "trial_params": None,
    }


def hf_trainer(
    root: Path,
    step: int,
    *,
    ranks: int = 2,
    shards: int = 2,
    size: int = DEFAULT_SIZE,
    chunks: int = DEFAULT_CHUNKS,
    trainer_state_before_last_rng: bool = False,
) -> Iterator[WriterStep]:
    """HF ``Trainer._save_checkpoint`` (4.40+): ``checkpoint-N/`` written in place.

    Order: config.json, generation_config.json, weight shards then the index, tokenizer
    files, training_args.bin, optimizer.pt, scheduler.pt, each rank's rng_state, then
    trainer_state.json. With ``trainer_state_before_last_rng`` rank 0 writes
    trainer_state.json while the last rank is still saving its RNG state (there is no
    barrier), so the checkpoint only completes with that last rng_state file.
    """
    unit = root / _hf_name(step)
    seed = f"hf/{step}"
    yield from _mkdir(root, unit)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "model_type": "llama",
        "num_hidden_layers": shards,
        "torch_dtype": "float32",
        "transformers_version": "5.24.0",
    }
    yield from _write_small(root, unit / "config.json", _json_bytes(config))
    generation = {"bos_token_id": 1, "eos_token_id": 2, "transformers_version": "5.24.0"}
    yield from _write_small(root, unit / "generation_config.json", _json_bytes(generation))

    weight_map: dict[str, str] = {}
    total = 0
    for index, shard in enumerate(_hf_shard_names(shards)):
        half = size // 2
        tensors = {
            f"model.layers.{index}.mlp.weight": _Blob(half, f"{seed}/{shard}/mlp"),
            f"model.layers.{index}.self_attn.weight": _Blob(size - half, f"{seed}/{shard}/attn"),
        }
        for name, blob in tensors.items():
            weight_map[name] = shard
            total += blob.size - blob.size % 4
        yield from _write_chunked(root, unit / shard, _safetensors_bytes(tensors), chunks)
    if shards > 1:
        index_doc = {
            "metadata": {"total_parameters": total // 4, "total_size": total},
            "weight_map": dict(sorted(weight_map.items())),
        }
        yield from _write_small(root, unit / "model.safetensors.index.json", _json_bytes(index_doc))

    tokenizer_docs = {
        "tokenizer_config.json": {"model_max_length": 2048, "tokenizer_class": "LlamaTokenizer"},
        "special_tokens_map.json": {"bos_token": "<s>", "eos_token": "</s>"},
        "tokenizer.json": {"version": "1.0", "model": {"type": "BPE", "vocab": {"<s>": 1}}},
    }
    for name in _HF_TOKENIZER_FILES:
        yield from _write_small(root, unit / name, _json_bytes(tokenizer_docs[name]))
    args = {"output_dir": str(root), "save_steps": step, "save_total_limit": 2, "seed": 42}
    yield from _write_small(root, unit / "training_args.bin", _pt_bytes(args))

    optimizer = {
        "state": {0: {"step": step, "exp_avg": _Blob(size, f"{seed}/exp_avg")}},
        "param_groups": [{"lr": 5e-5, "betas": (0.9, 0.999), "params": [0]}],
    }
    yield from _write_chunked(root, unit / "optimizer.pt", _pt_bytes(optimizer), chunks)
    scheduler = {"base_lrs": [5e-5], "last_epoch": step, "_step_count": step + 1}
    yield from _write_small(root, unit / "scheduler.pt", _pt_bytes(scheduler))

    state = _json_bytes(_hf_trainer_state(root, step))
    rng_names = _hf_rng_names(ranks)
    late = rng_names[-1:] if trainer_state_before_last_rng and ranks > 1 else []
    for name in rng_names:
        if name in late:
            continue
        rng = {"python": [3, step], "numpy": ["MT19937", step], "cpu": _Blob(5056, seed + name)}
        yield from _write_chunked(root, unit / name, _pt_bytes(rng), chunks)
    yield from _write_small(root, unit / "trainer_state.json", state, finished=not late)
    for name in late:
        rng = {"python": [3, step], "numpy": ["MT19937", step], "cpu": _Blob(5056, seed + name)}
        yield from _write_chunked(root, unit / name, _pt_bytes(rng), chunks, finished=True)


def hf_trainer_late_rng(
    root: Path,
    step: int,
    *,
    ranks: int = 2,
    shards: int = 2,
    size: int = DEFAULT_SIZE,
    chunks: int = DEFAULT_CHUNKS,
) -> Iterator[WriterStep]:
    """``hf_trainer`` where trainer_state.json lands before the last rank's rng_state."""
    return hf_trainer(
        root,
        step,
        ranks=ranks,
        shards=shards,
        size=size,
        chunks=chunks,
        trainer_state_before_last_rng=True,
    )


# --------------------------------------------------------------------------------------------
# "deepspeed"
# --------------------------------------------------------------------------------------------


def _ds_tag(step: int, **_: Any) -> PurePosixPath:
    """Default DeepSpeed tag ``global_step{N}``."""
    return PurePosixPath(f"global_step{step}")


def _ds_optim_name(dp: int) -> str:
    """ZeRO optimizer shard of one data-parallel rank."""
    return f"zero_pp_rank_{dp}_mp_rank_00_optim_states.pt"


def _ds_files(step: int, *, ranks: int = 2, **_: Any) -> frozenset[str]:
    """``global_stepN/`` contents: model states plus one optimizer shard per DP rank."""
    return frozenset({"mp_rank_00_model_states.pt", *(_ds_optim_name(d) for d in range(ranks))})


def _ds_outside(step: int, **_: Any) -> frozenset[str]:
    """DeepSpeed writes ``latest`` and copies ``zero_to_fp32.py`` into the save dir."""
    return frozenset({"latest", "zero_to_fp32.py"})


_ZERO_TO_FP32 = '''#!/usr/bin/env python
"""Stand-in for DeepSpeed's zero_to_fp32.py recovery script."""
import sys

if __name__ == "__main__":
    sys.exit("run the real deepspeed/utils/zero_to_fp32.py")
'''


def deepspeed(
    root: Path,
    step: int,
    *,
    ranks: int = 2,
    size: int = DEFAULT_SIZE,
    chunks: int = DEFAULT_CHUNKS,
    late_ranks: int = 1,
) -> Iterator[WriterStep]:
    """DeepSpeed ``save_checkpoint`` (ZeRO-1/2) into ``global_stepN/`` with ``ranks`` DP ranks.

    Rank 0 writes the model states and its optimizer shard, copies ``zero_to_fp32.py`` into
    the save dir and writes ``latest`` (the tag) *before* the final barrier, so the last
    ``late_ranks`` DP ranks' optimizer shards land after ``latest``.
    """
    unit = root / _ds_tag(step)
    tag = unit.name
    seed = f"ds/{step}"
    late_ranks = max(0, min(late_ranks, ranks - 1))
    yield from _mkdir(root, unit)
    model: dict[str, Any] = {
        "module": {"linear.weight": _Blob(size, f"{seed}/module")},
        "buffer_names": [],
        "optimizer": None,
        "lr_scheduler": {"last_epoch": step},
        "dp_world_size": ranks,
        "mp_world_size": 1,
        "ds_config": {"zero_optimization": {"stage": 2}},
        "ds_version": "0.17.0",
        "global_steps": step,
        "global_samples": step * 8,
        "skipped_steps": 0,
    }
    yield from _write_chunked(root, unit / "mp_rank_00_model_states.pt", _pt_bytes(model), chunks)

    def optim(dp: int, *, finished: bool = False) -> Iterator[WriterStep]:
        state = {
            "optimizer_state_dict": {
                "zero_stage": 2,
                "partition_count": ranks,
                "loss_scaler": None,
                "base_optimizer_state": {"state": {}, "param_groups": [{"lr": 1e-4}]},
                "single_partition_of_fp32_groups": [_Blob(size, f"{seed}/optim{dp}")],
            },
            "ds_config": {"zero_optimization": {"stage": 2}},
            "ds_version": "0.17.0",
        }
        path = unit / _ds_optim_name(dp)
        yield from _write_chunked(root, path, _pt_bytes(state), chunks, finished=finished)

    on_time = ranks - late_ranks
    for dp in range(on_time):
        yield from optim(dp)
    script = root / "zero_to_fp32.py"
    yield from _write_small(root, script, _ZERO_TO_FP32.encode())
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    yield from _rewrite_tracker(root, root / "latest", tag, finished=late_ranks == 0)
    for dp in range(on_time, ranks):
        yield from optim(dp, finished=dp == ranks - 1)


# --------------------------------------------------------------------------------------------
# "torch-dcp"
# --------------------------------------------------------------------------------------------


def _dcp_name(step: int, *, name: str | None = None, **_: Any) -> PurePosixPath:
    """DCP checkpoint directory (``step_N`` unless ``name`` overrides it)."""
    return PurePosixPath(name if name is not None else f"step_{step}")


def _dcp_unit_files(step: int, *, ranks: int = 2, **_: Any) -> frozenset[str]:
    """DCP directory contents."""
    return _dcp_files(ranks)


def torch_dcp(
    root: Path,
    step: int,
    *,
    ranks: int = 2,
    size: int = DEFAULT_SIZE,
    chunks: int = DEFAULT_CHUNKS,
    name: str | None = None,
) -> Iterator[WriterStep]:
    """``torch.distributed.checkpoint.save``: shards in place, ``.metadata`` renamed in last.

    With a fixed ``name`` a second save rewrites the shards in place while the previous
    ``.metadata`` is still there (``overwrite=True``); it is removed just before the rename.
    """
    unit = root / _dcp_name(step, name=name)
    yield from _mkdir(root, unit)
    seed = f"dcp/{step}"
    yield from _dcp_shards(root, unit, ranks=ranks, size=size, chunks=chunks, seed=seed)
    yield from _dcp_metadata(root, unit, ranks=ranks, seed=seed, finished=True)


# --------------------------------------------------------------------------------------------
# "orbax"
# --------------------------------------------------------------------------------------------


def _orbax_name(step: int, **_: Any) -> PurePosixPath:
    """Orbax ``CheckpointManager`` step directory."""
    return PurePosixPath(str(step))


def _orbax_files(step: int, *, ranks: int = 1, **_: Any) -> frozenset[str]:
    """Files of a finalized Orbax step with a ``state`` (OCDBT) and a ``metrics`` item."""
    names = {
        "_CHECKPOINT_METADATA",
        "state/_METADATA",
        "state/_sharding",
        "state/manifest.ocdbt",
        "metrics/metrics",
        "commit_success.txt",
    }
    for process in range(ranks):
        names |= {
            f"state/ocdbt.process_{process}/manifest.ocdbt",
            f"state/ocdbt.process_{process}/d/{_orbax_data_name(step, process)}",
            f"state/array_metadatas/process_{process}",
        }
    return frozenset(names)


def _orbax_data_name(step: int, process: int) -> str:
    """OCDBT data files are named by a 32-hex-digit id."""
    return random.Random(f"orbax/{step}/{process}").randbytes(16).hex()


def _orbax_steps(
    root: Path, directory: Path, step: int, *, ranks: int, size: int, chunks: int
) -> Iterator[WriterStep]:
    """Everything Orbax writes into a step directory up to (excluding) commit_success.txt."""
    init_ns = 1_700_000_000_000_000_000 + step * 1_000_000_000
    metrics = default_metrics(step)
    meta = {
        "item_handlers": {
            "state": "orbax.checkpoint._src.handlers.pytree_checkpoint_handler."
            "PyTreeCheckpointHandler",
            "metrics": "orbax.checkpoint._src.handlers.json_checkpoint_handler."
            "JsonCheckpointHandler",
        },
        "metrics": metrics,
        "performance_metrics": {},
        "init_timestamp_nsecs": init_ns,
        "commit_timestamp_nsecs": None,
        "custom_metadata": {},
    }
    yield from _write_small(root, directory / "_CHECKPOINT_METADATA", _json_bytes(meta, None))
    state = directory / "state"
    for process in range(ranks):
        data_dir = state / f"ocdbt.process_{process}" / "d"
        yield from _mkdir(root, data_dir)
        blob = _payload(size, f"orbax/{step}/{process}/data")
        data_path = data_dir / _orbax_data_name(step, process)
        yield from _write_chunked(root, data_path, blob, chunks)
        manifest = state / f"ocdbt.process_{process}" / "manifest.ocdbt"
        yield from _write_small(root, manifest, b"OCDBT\x00" + _payload(64, str(manifest)))
    yield from _write_small(root, state / "manifest.ocdbt", b"OCDBT\x00" + _payload(64, "root"))
    yield from _write_small(root, state / "_sharding", _json_bytes({"params.w": "replicated"}))
    tree = {"tree_metadata": {"('params', 'w')": {"value_type": "jax.Array"}}}
    yield from _write_small(root, state / "_METADATA", _json_bytes(tree, None))
    (state / "array_metadatas").mkdir(exist_ok=True)
    for process in range(ranks):
        array_meta = {"array_metadatas": [{"array_metadata": {"param_name": "params.w"}}]}
        path = state / "array_metadatas" / f"process_{process}"
        yield from _write_small(root, path, _json_bytes(array_meta, None))
    yield from _mkdir(root, directory / "metrics")
    yield from _write_small(root, directory / "metrics" / "metrics", _json_bytes(metrics, None))
    meta["commit_timestamp_nsecs"] = init_ns + 500_000_000
    yield from _write_small(
        root,
        directory / "_CHECKPOINT_METADATA",
        _json_bytes(meta, None),
        note="rewritten with commit_timestamp_nsecs",
    )


def _orbax_commit_text(path: Path) -> bytes:
    """Content of ``commit_success.txt``."""
    return f"Checkpoint commit was successful to {path}".encode()


def orbax(
    root: Path,
    step: int,
    *,
    ranks: int = 1,
    size: int = DEFAULT_SIZE,
    chunks: int = DEFAULT_CHUNKS,
) -> Iterator[WriterStep]:
    """Orbax ``AtomicRenameTemporaryPath``: build ``<step>.orbax-checkpoint-tmp/``, rename.

    ``_CHECKPOINT_METADATA`` comes first, then the items; finalize rewrites the metadata
    with ``commit_timestamp_nsecs``, writes ``commit_success.txt``, renames the directory.
    """
    final = root / _orbax_name(step)
    tmp = root / f"{step}.orbax-checkpoint-tmp"
    yield from _mkdir(root, tmp)
    yield from _orbax_steps(root, tmp, step, ranks=ranks, size=size, chunks=chunks)
    yield from _write_small(root, tmp / "commit_success.txt", _orbax_commit_text(final))
    yield from _rename(root, tmp, final, finished=True)


def orbax_commit_file(
    root: Path,
    step: int,
    *,
    ranks: int = 1,
    size: int = DEFAULT_SIZE,
    chunks: int = DEFAULT_CHUNKS,
) -> Iterator[WriterStep]:
    """Orbax ``CommitFileTemporaryPath`` (GCS default): in place, commit_success.txt last."""
    final = root / _orbax_name(step)
    yield from _mkdir(root, final)
    yield from _orbax_steps(root, final, step, ranks=ranks, size=size, chunks=chunks)
    commit = _orbax_commit_text(final)
    yield from _write_small(root, final / "commit_success.txt", commit, finished=True)


# --------------------------------------------------------------------------------------------
# "megatron"
# --------------------------------------------------------------------------------------------

MEGATRON_TRACKER = "latest_checkpointed_iteration.txt"
_MEGATRON_TOKENIZER = ("tokenizer/tokenizer_config.json", "tokenizer/tokenizer.json")


def _megatron_name(step: int, **_: Any) -> PurePosixPath:
    """``iter_{:07d}``."""
    return PurePosixPath(f"iter_{step:07d}")


def _megatron_files(step: int, *, ranks: int = 2, **_: Any) -> frozenset[str]:
    """torch_dist iteration directory contents, tokenizer assets included."""
    return _dcp_files(ranks) | {"common.pt", "metadata.json", *_MEGATRON_TOKENIZER}


def _megatron_outside(step: int, **_: Any) -> frozenset[str]:
    """The tracker file in the save dir."""
    return frozenset({MEGATRON_TRACKER})


def _megatron_dist_save(
    root: Path, directory: Path, step: int, *, ranks: int, size: int, chunks: int
) -> Iterator[WriterStep]:
    """Megatron-core ``dist_checkpointing.save`` (torch_dist): common.pt, DCP, metadata.json."""
    common = {
        "checkpoint_version": 3.0,
        "iteration": step,
        "args": {"tensor_model_parallel_size": 1, "ckpt_format": "torch_dist"},
        "opt_param_scheduler": {"num_steps": step},
        "num_floating_point_operations_so_far": step * 1e12,
    }
    yield from _write_small(root, directory / "common.pt", _pt_bytes(common))
    seed = f"megatron/{directory.name}/{step}"
    yield from _dcp_shards(root, directory, ranks=ranks, size=size, chunks=chunks, seed=seed)
    yield from _dcp_metadata(root, directory, ranks=ranks, seed=seed)
    config = {
        "sharded_backend": "torch_dist",
        "sharded_backend_version": 1,
        "common_backend": "torch",
        "common_backend_version": 1,
    }
    yield from _write_small(root, directory / "metadata.json", _json_bytes(config, None))


def megatron(
    root: Path,
    step: int,
    *,
    ranks: int = 2,
    size: int = DEFAULT_SIZE,
    chunks: int = DEFAULT_CHUNKS,
) -> Iterator[WriterStep]:
    """Megatron-LM ``save_checkpoint`` with ``ckpt_format=torch_dist``.

    ``iter_NNNNNNN/``: common.pt, every rank's ``__R_0.distcp``, DCP ``.metadata`` (tmp +
    rename), ``metadata.json`` by rank 0 after all shards; then ``iter_finalize_fn`` rewrites
    ``latest_checkpointed_iteration.txt`` in place; *then* rank 0 saves tokenizer assets into
    ``iter_NNNNNNN/tokenizer/``, so the tracker is not the last write.
    """
    unit = root / _megatron_name(step)
    yield from _mkdir(root, unit)
    yield from _megatron_dist_save(root, unit, step, ranks=ranks, size=size, chunks=chunks)
    yield from _rewrite_tracker(root, root / MEGATRON_TRACKER, str(step))
    yield from _mkdir(root, unit / "tokenizer")
    docs = {
        "tokenizer/tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast"},
        "tokenizer/tokenizer.json": {"version": "1.0", "model": {"type": "BPE"}},
    }
    for index, name in enumerate(_MEGATRON_TOKENIZER):
        last = index == len(_MEGATRON_TOKENIZER) - 1
        yield from _write_small(root, unit / name, _json_bytes(docs[name]), finished=last)


# --------------------------------------------------------------------------------------------
# "nemo"
# --------------------------------------------------------------------------------------------

NEMO_UNFINISHED_SUFFIX = "-unfinished"


def _nemo_name(step: int, **_: Any) -> PurePosixPath:
    """NeMo 2 ``ModelCheckpoint`` name, e.g. ``megatron_gpt--val_loss=1.17-step=100-...``."""
    loss = default_metrics(step)["eval_loss"]
    return PurePosixPath(
        f"megatron_gpt--val_loss={loss:.2f}-step={step}-consumed_samples={step * 8}.0"
    )


def _nemo_files(step: int, *, ranks: int = 2, **_: Any) -> frozenset[str]:
    """``weights/`` (Megatron dist checkpoint) plus ``context/``."""
    weights = _dcp_files(ranks) | {"common.pt", "metadata.json"}
    return frozenset({*(f"weights/{n}" for n in weights), "context/io.json", "context/model.yaml"})


def nemo(
    root: Path,
    step: int,
    *,
    ranks: int = 2,
    size: int = DEFAULT_SIZE,
    chunks: int = DEFAULT_CHUNKS,
) -> Iterator[WriterStep]:
    """NeMo 2: touch ``<name>-unfinished``, write ``<name>/weights`` + ``context``, unmark."""
    root.mkdir(parents=True, exist_ok=True)
    unit = root / _nemo_name(step)
    marker = root / f"{unit.name}{NEMO_UNFINISHED_SUFFIX}"
    marker.touch()
    yield WriterStep(f"{_rel(root, marker)} touched", path=_rel(root, marker))
    yield from _mkdir(root, unit / "weights")
    weights = unit / "weights"
    yield from _megatron_dist_save(root, weights, step, ranks=ranks, size=size, chunks=chunks)
    yield from _mkdir(root, unit / "context")
    io_doc = {"root": {"type": "ref", "key": "trainer_context_1"}, "objects": {}}
    yield from _write_small(root, unit / "context" / "io.json", _json_bytes(io_doc))
    model_yaml = (
        b"_target_: nemo.collections.llm.gpt.model.base.GPTModel\nconfig:\n  num_layers: 2\n"
    )
    yield from _write_small(root, unit / "context" / "model.yaml", model_yaml)
    marker.unlink()
    yield WriterStep(f"{_rel(root, marker)} removed", finished=True, path=_rel(root, marker))


# --------------------------------------------------------------------------------------------
# "keras"
# --------------------------------------------------------------------------------------------

_KERAS_MEMBERS = ("metadata.json", "config.json", "model.weights.h5")


def _keras_name(step: int, **_: Any) -> PurePosixPath:
    """``ModelCheckpoint(filepath="model-{epoch:04d}.keras")``."""
    return PurePosixPath(f"model-{step:04d}.keras")


def _keras_best_name(step: int, **_: Any) -> PurePosixPath:
    """``ModelCheckpoint("best.keras", save_best_only=True)``: one fixed name."""
    return PurePosixPath("best.keras")


def _keras_bytes(step: int, size: int) -> bytes:
    """A Keras 3 ``.keras`` zip: metadata.json, config.json, model.weights.h5."""
    saved = 1_700_000_000 + step * 60
    metadata = {"keras_version": "3.10.0", "date_saved": f"{saved}"}
    config = {
        "module": "keras",
        "class_name": "Sequential",
        "config": {"name": "sequential", "layers": [{"class_name": "Dense"}]},
        "compile_config": {"loss": "mse"},
        "build_config": {"input_shape": [None, 8]},
    }
    weights = _HDF5_SIGNATURE + _payload(max(0, size - len(_HDF5_SIGNATURE)), f"keras/{step}")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(_zip_info("metadata.json"), json.dumps(metadata))
        zf.writestr(_zip_info("config.json"), json.dumps(config))
        zf.writestr(_zip_info("model.weights.h5"), weights)
    return buf.getvalue()


def keras(
    root: Path, step: int, *, size: int = DEFAULT_SIZE, chunks: int = DEFAULT_CHUNKS
) -> Iterator[WriterStep]:
    """Keras 3 ``model.save("model-NNNN.keras")``: a zip written in place."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / _keras_name(step)
    yield from _write_chunked(root, path, _keras_bytes(step, size), chunks, finished=True)


def keras_best(
    root: Path, step: int, *, size: int = DEFAULT_SIZE, chunks: int = DEFAULT_CHUNKS
) -> Iterator[WriterStep]:
    """``save_best_only``: rewrite ``best.keras`` in place (run it again for each new best).

    If ``best.keras`` exists, the first state is the old file truncated to zero bytes.
    """
    root.mkdir(parents=True, exist_ok=True)
    path = root / _keras_best_name(step)
    yield from _write_chunked(root, path, _keras_bytes(step, size), chunks, finished=True)


def _keras_files(step: int, **_: Any) -> frozenset[str]:
    """A file unit publishes itself."""
    return frozenset({_keras_name(step).name})


# --------------------------------------------------------------------------------------------
# "tensorflow"
# --------------------------------------------------------------------------------------------


def _tf_prefix(step: int, **_: Any) -> PurePosixPath:
    """``CheckpointManager`` prefix ``ckpt-N``."""
    return PurePosixPath(f"ckpt-{step}")


def _tf_data_names(step: int, shards: int) -> list[str]:
    """Final data shard names of ``ckpt-N``."""
    return [f"ckpt-{step}.data-{k:05d}-of-{shards:05d}" for k in range(shards)]


def _tf_files(step: int, *, shards: int = 2, **_: Any) -> frozenset[str]:
    """``ckpt-N.index`` and every ``ckpt-N.data-*`` shard (names relative to root)."""
    return frozenset({f"ckpt-{step}.index", *_tf_data_names(step, shards)})


def _tf_outside(step: int, **_: Any) -> frozenset[str]:
    """The ``checkpoint`` state file."""
    return frozenset({"checkpoint"})


def _tf_state_text(root: Path, newest: str) -> str:
    """``checkpoint`` state proto (text format) listing every prefix with an index."""
    prefixes = sorted(
        {p.name.removesuffix(".index") for p in root.glob("ckpt-*.index")} | {newest},
        key=lambda name: int(name.split("-")[1]),
    )
    lines = [f'model_checkpoint_path: "{newest}"']
    lines += [f'all_model_checkpoint_paths: "{p}"' for p in prefixes]
    lines += ["all_model_checkpoint_timestamps: 1700000000.0" for _ in prefixes]
    lines.append("last_preserved_timestamp: 1699999999.0")
    return "\n".join(lines) + "\n"


def tensorflow(
    root: Path,
    step: int,
    *,
    shards: int = 2,
    size: int = DEFAULT_SIZE,
    chunks: int = DEFAULT_CHUNKS,
) -> Iterator[WriterStep]:
    """``tf.train.CheckpointManager.save``: temp shards, MergeBundles, ``checkpoint`` file.

    ``ckpt-N_temp/part-K-of-S.{data-00000-of-00001,index}`` per shard; MergeBundles renames
    each data file to ``ckpt-N.data-K-of-S``, writes ``ckpt-N.index`` in place and removes
    ``_temp``; then ``checkpoint`` is written as ``checkpoint.tmp<uuid>`` and renamed.
    """
    root.mkdir(parents=True, exist_ok=True)
    prefix = _tf_prefix(step).name
    temp = root / f"{prefix}_temp"
    yield from _mkdir(root, temp)
    parts: list[Path] = []
    for k in range(shards):
        part = f"part-{k:05d}-of-{shards:05d}"
        data_path = temp / f"{part}.data-00000-of-00001"
        yield from _write_chunked(root, data_path, _payload(size, f"tf/{step}/{k}"), chunks)
        index = _tf_index_bytes([f"layer/{k}/.ATTRIBUTES/VARIABLE_VALUE"], f"tf/{step}/{k}")
        yield from _write_small(root, temp / f"{part}.index", index)
        parts.append(data_path)
    for data_path, final in zip(parts, _tf_data_names(step, shards), strict=True):
        yield from _rename(root, data_path, root / final)
    keys = [
        "_CHECKPOINTABLE_OBJECT_GRAPH",
        *(f"layer/{k}/.ATTRIBUTES/VARIABLE_VALUE" for k in range(shards)),
    ]
    yield from _write_chunked(root, root / f"{prefix}.index", _tf_index_bytes(keys, prefix), 1)
    shutil.rmtree(temp)
    yield WriterStep(f"{_rel(root, temp)}/ removed", path=_rel(root, temp))
    tmp_state = root / f"checkpoint.tmp{uuid.uuid4().hex}"
    yield from _write_small(root, tmp_state, _tf_state_text(root, prefix).encode())
    yield from _rename(root, tmp_state, root / "checkpoint", finished=True)


# --------------------------------------------------------------------------------------------
# Rotation and sidecars
# --------------------------------------------------------------------------------------------


def _natural_key(path: Path) -> tuple[Any, ...]:
    """Sort key treating digit runs numerically (``checkpoint-9`` < ``checkpoint-10``)."""
    parts: list[Any] = []
    number = ""
    for char in path.name:
        if char.isdigit():
            number += char
            continue
        if number:
            parts.append((0, int(number)))
            number = ""
        parts.append((1, char))
    if number:
        parts.append((0, int(number)))
    return tuple(parts)


def rotate(
    root: Path,
    keep: int,
    unit_glob: str,
    *,
    by: Literal["mtime", "name"] = "mtime",
    protect: Iterable[Path] = (),
) -> list[Path]:
    """Delete the oldest units matching ``unit_glob`` so that ``keep`` remain (HF style).

    Like ``rotate_checkpoints`` (``save_total_limit``): units are ordered by mtime (``by=
    "mtime"``, the HF default; ties broken by name) or by the numbers in their names, the
    oldest are removed with ``shutil.rmtree(ignore_errors=True)`` (files are unlinked), and
    paths in ``protect`` (e.g. ``best_model_checkpoint``) are never deleted. Returns the
    deleted paths, oldest first.
    """
    protected = {Path(p).resolve() for p in protect}
    units = [p for p in root.glob(unit_glob) if p.exists()]
    if by == "mtime":
        units.sort(key=lambda p: (p.stat().st_mtime_ns, _natural_key(p)))
    else:
        units.sort(key=_natural_key)
    deleted: list[Path] = []
    excess = len(units) - max(keep, 0)
    for unit in units:
        if excess <= 0:
            break
        if unit.resolve() in protected:
            continue
        if unit.is_dir() and not unit.is_symlink():
            shutil.rmtree(unit, ignore_errors=True)
        else:
            unit.unlink(missing_ok=True)
        deleted.append(unit)
        excess -= 1
    return deleted


def write_sidecar(path: Path, step: int, metrics: Mapping[str, Any]) -> Path:
    """Atomically write ``{"step": N, "metrics": {...}}`` next to (or into) a unit.

    For a file unit ``x.ckpt`` the sidecar is ``x.ckpt.metrics.json``; for a directory unit it
    is ``<dir>/metrics.json``. The JSON goes to a ``.tmpXXXXXX`` file in the same directory
    first and is then renamed over the target. Returns the sidecar path.
    """
    target = path / "metrics.json" if path.is_dir() else path.with_name(path.name + ".metrics.json")
    tmp = _temp_name(target.parent)
    try:
        tmp.write_bytes(_json_bytes({"step": step, "metrics": dict(metrics)}))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


# --------------------------------------------------------------------------------------------
# Structural oracle
# --------------------------------------------------------------------------------------------


def zip_problem(path: Path, *, members: Iterable[str] = ()) -> str | None:
    """Why ``path`` is not a complete zip (EOCD at the tail, readable directory), or None.

    Only the last archive is checked, so a concatenation of zips (a DCP ``.distcp`` file of
    ``torch.save``'d items) passes once its last item is complete.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"{path.name}: unreadable ({exc.strerror})"
    tail = data[-(22 + 65535) :]
    at = tail.rfind(_ZIP_EOCD)
    if at < 0 or len(tail) - at < 22:
        return f"{path.name}: no zip end-of-central-directory record (torn?)"
    (comment_len,) = struct.unpack_from("<H", tail, at + 20)
    if at + 22 + comment_len != len(tail):
        return f"{path.name}: zip EOCD is not at the end of the file"
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            names = set(zf.namelist())
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        return f"{path.name}: unreadable zip ({exc})"
    if bad is not None:
        return f"{path.name}: zip member {bad} fails its CRC"
    missing = set(members) - names
    if missing:
        return f"{path.name}: zip lacks members {sorted(missing)}"
    return None


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete safetensors file, or None.

    Checks: 8-byte LE header length, JSON header, and ``8 + header + max(data end) == size``.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"{path.name}: unreadable ({exc.strerror})"
    if len(data) < 8:
        return f"{path.name}: {len(data)} bytes, shorter than the header length field"
    (header_len,) = struct.unpack_from("<Q", data)
    if 8 + header_len > len(data):
        return f"{path.name}: header of {header_len} bytes runs past the end of the file"
    try:
        header = json.loads(data[8 : 8 + header_len])
    except ValueError:
        return f"{path.name}: header is not JSON"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    expected = 8 + header_len + max(ends, default=0)
    if expected != len(data):
        return f"{path.name}: header implies {expected} bytes, file has {len(data)}"
    return None


def _json_problem(path: Path) -> str | None:
    """Why ``path`` is not a readable JSON document, or None."""
    try:
        json.loads(path.read_bytes())
    except OSError as exc:
        return f"{path.name}: unreadable ({exc.strerror})"
    except ValueError:
        return f"{path.name}: not valid JSON (torn?)"
    return None


def _pickle_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete pickle (STOP opcode last), or None."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"{path.name}: unreadable ({exc.strerror})"
    if not data.endswith(b"."):
        return f"{path.name}: pickle does not end with STOP"
    return None


def _read_text(path: Path) -> str | None:
    """File content as stripped text, or None when missing."""
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _check_pt_files(unit: Path, names: Iterable[str]) -> list[str]:
    """Zip check for every ``.pt``/``.pth``/``.bin``/``.distcp``/``.ckpt`` among ``names``."""
    suffixes = (".pt", ".pth", ".bin", ".distcp", ".ckpt")
    problems = []
    for name in sorted(names):
        if name.endswith(suffixes):
            problem = zip_problem(unit / name)
            if problem:
                problems.append(problem)
    return problems


def _check_dcp(unit: Path, *, marker: str = ".metadata") -> list[str]:
    """A DCP directory needs a complete ``.metadata`` no older than any shard.

    The mtime rule catches a save into an existing directory (``overwrite=True``, Lightning's
    sharded ``last.ckpt/``): the previous save's ``.metadata`` (or ``meta.pt``, given as
    ``marker``) lingers while the shards are rewritten.
    """
    problem = _pickle_problem(unit / ".metadata")
    if problem:
        return [problem]
    newest_shard = max((p.stat().st_mtime_ns for p in unit.glob("__*.distcp")), default=0)
    return [
        f"{name} is older than the newest shard (left over from an earlier save)"
        for name in dict.fromkeys((".metadata", marker))
        if (unit / name).stat().st_mtime_ns < newest_shard
    ]


def validate_unit(spec: WriterSpec, root: Path, step: int, **kwargs: Any) -> list[str]:
    """Reasons why ``spec``'s unit for ``step`` under ``root`` is not a finished checkpoint.

    An empty list means the unit is structurally complete: every expected file is present,
    nothing extra (temp files, markers) is left in the unit, the format's commit marker is
    in place, and every file passes its format check (zip EOCD, safetensors length, JSON,
    pickle STOP). This is the readiness oracle tests compare ckptd's decisions against.
    """
    unit_rel = spec.unit(step, **kwargs)
    unit = root / unit_rel
    expected = spec.files(step, **kwargs)
    base = unit if spec.kind == "dir" else unit.parent
    problems: list[str] = []
    if spec.kind == "dir":
        if not unit.is_dir():
            return [f"{unit_rel}/ does not exist"]
        present = {p.relative_to(unit).as_posix() for p in unit.rglob("*") if p.is_file()}
        extra = present - expected
        if extra:
            problems.append(f"unexpected files in unit: {sorted(extra)}")
    else:
        present = {name for name in expected if (base / name).is_file()}
    missing = expected - present
    if missing:
        problems.append(f"missing files: {sorted(missing)}")
    for name in sorted(spec.outside(step, **kwargs)):
        if not (root / name).exists():
            problems.append(f"missing {name} next to the unit")
    if problems:
        return problems

    checker = _CHECKERS[spec.format]
    problems.extend(checker(spec, root, base, step, kwargs))
    return problems


Checker = Callable[[WriterSpec, Path, Path, int, dict[str, Any]], list[str]]


def _check_file(
    spec: WriterSpec, root: Path, base: Path, step: int, kw: dict[str, Any]
) -> list[str]:
    """Single torch.save file: complete zip."""
    return _check_pt_files(base, spec.files(step, **kw))


def _check_lightning(
    spec: WriterSpec, root: Path, base: Path, step: int, kw: dict[str, Any]
) -> list[str]:
    """Lightning file: complete zip; sharded dir: DCP ``.metadata`` + ``meta.pt``."""
    if spec.kind == "file":
        return _check_pt_files(base, spec.files(step, **kw))
    return _check_dcp(base, marker="meta.pt") + _check_pt_files(base, spec.files(step, **kw))


def _check_hf(spec: WriterSpec, root: Path, base: Path, step: int, kw: dict[str, Any]) -> list[str]:
    """HF: JSON files parse, index names exactly the shard files, shards and .pt complete."""
    files = spec.files(step, **kw)
    problems = [p for n in sorted(files) if n.endswith(".json") and (p := _json_problem(base / n))]
    if problems:
        return problems
    shards = sorted(n for n in files if n.endswith(".safetensors"))
    index_path = base / "model.safetensors.index.json"
    if index_path.exists():
        weight_map = json.loads(index_path.read_bytes())["weight_map"]
        named = set(weight_map.values())
        if named != set(shards):
            problems.append(f"index names {sorted(named)}, shards are {shards}")
    problems += [p for n in shards if (p := safetensors_problem(base / n))]
    problems += _check_pt_files(base, files)
    state = json.loads((base / "trainer_state.json").read_bytes())
    if state.get("global_step") != step:
        problems.append(f"trainer_state.json global_step {state.get('global_step')} != {step}")
    return problems


def _check_deepspeed(
    spec: WriterSpec, root: Path, base: Path, step: int, kw: dict[str, Any]
) -> list[str]:
    """DeepSpeed: ``latest`` == tag, one complete optimizer shard per DP rank."""
    problems = []
    tag = spec.unit(step, **kw).name
    latest = _read_text(root / "latest")
    if latest != tag:
        problems.append(f"latest is {latest!r}, expected {tag!r}")
    ranks = int(kw.get("ranks", 2))
    shards = list(base.glob("*_optim_states.pt"))
    if len(shards) != ranks:
        problems.append(f"{len(shards)} optimizer shards, dp_world_size is {ranks}")
    return problems + _check_pt_files(base, spec.files(step, **kw))


def _check_dcp_unit(
    spec: WriterSpec, root: Path, base: Path, step: int, kw: dict[str, Any]
) -> list[str]:
    """Torch DCP: ``.metadata`` complete, shards end with a complete torch.save item."""
    return _check_dcp(base) + _check_pt_files(base, spec.files(step, **kw))


def _check_orbax(
    spec: WriterSpec, root: Path, base: Path, step: int, kw: dict[str, Any]
) -> list[str]:
    """Orbax: final name, commit_success.txt, committed ``_CHECKPOINT_METADATA``, metrics."""
    problems = []
    if not (base / "commit_success.txt").is_file():
        problems.append("commit_success.txt missing")
    for name in ("_CHECKPOINT_METADATA", "metrics/metrics", "state/_METADATA"):
        if problem := _json_problem(base / name):
            problems.append(problem)
    if not problems:
        meta = json.loads((base / "_CHECKPOINT_METADATA").read_bytes())
        if meta.get("commit_timestamp_nsecs") is None:
            problems.append("_CHECKPOINT_METADATA has no commit_timestamp_nsecs")
    return problems


def _check_megatron(
    spec: WriterSpec, root: Path, base: Path, step: int, kw: dict[str, Any]
) -> list[str]:
    """Megatron: tracker names the iteration, metadata.json + DCP complete, tokenizer."""
    problems = []
    tracker = _read_text(root / MEGATRON_TRACKER)
    if tracker != str(step):
        problems.append(f"{MEGATRON_TRACKER} is {tracker!r}, expected {step}")
    if problem := _json_problem(base / "metadata.json"):
        problems.append(problem)
    problems += [p for n in _MEGATRON_TOKENIZER if (p := _json_problem(base / n))]
    return problems + _check_dcp(base) + _check_pt_files(base, spec.files(step, **kw))


def _check_nemo(
    spec: WriterSpec, root: Path, base: Path, step: int, kw: dict[str, Any]
) -> list[str]:
    """NeMo: no ``-unfinished`` marker, weights form a complete Megatron dist checkpoint."""
    problems = []
    marker = base.parent / f"{base.name}{NEMO_UNFINISHED_SUFFIX}"
    if marker.exists():
        problems.append(f"{marker.name} still present")
    weights = base / "weights"
    if problem := _json_problem(weights / "metadata.json"):
        problems.append(problem)
    files = spec.files(step, **kw)
    return problems + _check_dcp(weights) + _check_pt_files(base, files)


def _check_keras(
    spec: WriterSpec, root: Path, base: Path, step: int, kw: dict[str, Any]
) -> list[str]:
    """Keras: complete zip with metadata.json, config.json and model.weights.h5."""
    name = spec.unit(step, **kw).name
    problem = zip_problem(base / name, members=_KERAS_MEMBERS)
    return [problem] if problem else []


def _check_tf(spec: WriterSpec, root: Path, base: Path, step: int, kw: dict[str, Any]) -> list[str]:
    """TensorFlow: ``checkpoint`` names the prefix, ``.index`` has its footer magic."""
    problems = []
    prefix = spec.unit(step, **kw).name
    state = _read_text(root / "checkpoint") or ""
    named = {f'model_checkpoint_path: "{prefix}"', f'all_model_checkpoint_paths: "{prefix}"'}
    if not named & set(state.splitlines()):
        problems.append(f"checkpoint state file does not name {prefix}")
    index = (base / f"{prefix}.index").read_bytes()
    if len(index) < 48 or struct.unpack("<Q", index[-8:])[0] != TF_TABLE_MAGIC:
        problems.append(f"{prefix}.index lacks the table footer magic (torn?)")
    return problems


_CHECKERS: dict[str, Checker] = {
    "file": _check_file,
    "lightning": _check_lightning,
    "hf-trainer": _check_hf,
    "deepspeed": _check_deepspeed,
    "torch-dcp": _check_dcp_unit,
    "orbax": _check_orbax,
    "megatron": _check_megatron,
    "nemo": _check_nemo,
    "keras": _check_keras,
    "tensorflow": _check_tf,
}


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def _single(name_of: Callable[..., PurePosixPath]) -> Callable[..., frozenset[str]]:
    """``files`` for a file unit: just the unit's own name."""

    def files(step: int, **kwargs: Any) -> frozenset[str]:
        return frozenset({name_of(step, **kwargs).name})

    return files


def _lightning_sharded_files(step: int, *, ranks: int = 2, **_: Any) -> frozenset[str]:
    """Sharded Lightning ``.ckpt/`` contents."""
    return _dcp_files(ranks) | {"meta.pt"}


def _with_variants(default: WriterSpec, *variants: WriterSpec) -> WriterSpec:
    """Attach variants to a default spec."""
    return dataclasses.replace(default, variants={v.variant: v for v in variants})


WRITERS: dict[str, WriterSpec] = {
    "file": _with_variants(
        WriterSpec(
            format="file",
            variant="default",
            writer=torch_file,
            unit=_torch_file_name,
            files=_single(_torch_file_name),
            kind="file",
            description="torch.save in place; EOCD last",
        ),
        WriterSpec(
            format="file",
            variant="rename",
            writer=torch_file_rename,
            unit=_torch_file_name,
            files=_single(_torch_file_name),
            kind="file",
            description="torch.save to .tmpXXXXXX in the same dir, then os.replace",
        ),
    ),
    "lightning": _with_variants(
        WriterSpec(
            format="lightning",
            variant="default",
            writer=lightning,
            unit=_lightning_name,
            files=_single(_lightning_name),
            kind="file",
            description="torch.save into $TMPDIR (sibling dir), then rename into root",
        ),
        WriterSpec(
            format="lightning",
            variant="sharded",
            writer=lightning_sharded,
            unit=_lightning_name,
            files=_lightning_sharded_files,
            kind="dir",
            description="FSDP .ckpt/ directory: DCP shards, .metadata, meta.pt last",
        ),
    ),
    "hf-trainer": _with_variants(
        WriterSpec(
            format="hf-trainer",
            variant="default",
            writer=hf_trainer,
            unit=_hf_name,
            files=_hf_files,
            kind="dir",
            description="checkpoint-N/ in place, trainer_state.json last",
        ),
        WriterSpec(
            format="hf-trainer",
            variant="late-rng",
            writer=hf_trainer_late_rng,
            unit=_hf_name,
            files=_hf_files,
            kind="dir",
            description="trainer_state.json before the last rank's rng_state",
        ),
    ),
    "deepspeed": WriterSpec(
        format="deepspeed",
        variant="default",
        writer=deepspeed,
        unit=_ds_tag,
        files=_ds_files,
        kind="dir",
        outside=_ds_outside,
        description="global_stepN/; latest written before the last optimizer shards",
    ),
    "torch-dcp": WriterSpec(
        format="torch-dcp",
        variant="default",
        writer=torch_dcp,
        unit=_dcp_name,
        files=_dcp_unit_files,
        kind="dir",
        description="__R_0.distcp in place, .metadata.tmp renamed to .metadata last",
    ),
    "orbax": _with_variants(
        WriterSpec(
            format="orbax",
            variant="default",
            writer=orbax,
            unit=_orbax_name,
            files=_orbax_files,
            kind="dir",
            description="<step>.orbax-checkpoint-tmp/ renamed to <step>/",
        ),
        WriterSpec(
            format="orbax",
            variant="commit-file",
            writer=orbax_commit_file,
            unit=_orbax_name,
            files=_orbax_files,
            kind="dir",
            description="in place into <step>/, commit_success.txt last (GCS)",
        ),
    ),
    "megatron": WriterSpec(
        format="megatron",
        variant="default",
        writer=megatron,
        unit=_megatron_name,
        files=_megatron_files,
        kind="dir",
        outside=_megatron_outside,
        description="iter_NNNNNNN/ torch_dist; tracker; tokenizer assets after the tracker",
    ),
    "nemo": WriterSpec(
        format="nemo",
        variant="default",
        writer=nemo,
        unit=_nemo_name,
        files=_nemo_files,
        kind="dir",
        description="<name>-unfinished marker, weights/ + context/, unmark",
    ),
    "keras": _with_variants(
        WriterSpec(
            format="keras",
            variant="default",
            writer=keras,
            unit=_keras_name,
            files=_keras_files,
            kind="file",
            description=".keras zip written in place",
        ),
        WriterSpec(
            format="keras",
            variant="best",
            writer=keras_best,
            unit=_keras_best_name,
            files=_single(_keras_best_name),
            kind="file",
            description="save_best_only: best.keras rewritten in place",
        ),
    ),
    "tensorflow": WriterSpec(
        format="tensorflow",
        variant="default",
        writer=tensorflow,
        unit=_tf_prefix,
        files=_tf_files,
        kind="prefix",
        outside=_tf_outside,
        description="ckpt-N_temp/ parts renamed, ckpt-N.index, checkpoint via tmp+rename",
    ),
}
"""ckptd format name -> default writer spec; variants live in ``spec.variants``."""

FORMATS: tuple[str, ...] = tuple(WRITERS)
"""Every ckptd format name the corpus covers."""

ALL_SPECS: tuple[WriterSpec, ...] = tuple(v for spec in WRITERS.values() for v in spec.all())
"""Every writer spec, defaults and variants, in registry order."""
