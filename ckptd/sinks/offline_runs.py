"""What W&B offline run files under state_dir durably hold: ckptd's side of `wandb sync`.

An offline `log_artifact` is buffered by wandb-core and reaches the run's `.wandb` file only
later (at the latest when the run finishes); a `kill -9` loses what was buffered. So ckptd
trusts no offline publish until it has read the artifact record back from a run file, the
way Litestream re-derives its position from the replica rather than from its own memory.

The file format (wandb 0.31, a LevelDB-style log): a 7-byte header (`:W&B`, 0xBEE1 as u16
LE, version 0), then 32 KiB blocks of chunks `<crc32 u32 LE><length u16 LE><type u8>` plus
payload (type 1 full, 2 first, 3 middle, 4 last fragment; the CRC covers the type byte and
the payload; fewer than 7 bytes left in a block are padding). Each record's payload parses as
`wandb.proto.wandb_internal_pb2.Record`. A file that is still being written, or was cut
short by a crash, is read up to its last whole record: what follows is not durable.
"""

from __future__ import annotations

import collections
import json
import logging
import re
import secrets
import shutil
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptd import staging
from ckptd.sinks import PublishRequest, SinkFile
from ckptd.sinks.metadata import key_of

__all__ = [
    "OfflineLedger",
    "RecordedArtifact",
    "discard_empty_runs",
    "keep_for_sync",
    "recorded_artifacts",
    "recorded_keys",
    "run_files",
    "run_id",
]

log = logging.getLogger(__name__)

_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
_BLOCK = 32 * 1024
_CHUNK = struct.Struct("<IHB")  # crc32, payload length, chunk type
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass(frozen=True)
class RecordedArtifact:
    """An artifact record found in an offline run file."""

    name: str
    run_id: str
    aliases: tuple[str, ...]
    metadata: dict[str, Any]
    run_file: Path


class OfflineLedger:
    """One process's account of its offline runs: what each collection's current run was
    given and may not have written yet, what died with a wandb-core (to be logged again
    into the next run), and which versions earlier processes' run files hold. Thread-safe."""

    def __init__(self, wandb_dir: Path) -> None:
        self.wandb_dir = wandb_dir
        self._lock = threading.Lock()
        self._logged: dict[str, list[PublishRequest]] = {}  # under _lock
        self._lost: dict[str, list[PublishRequest]] = {}  # under _lock
        self._at_start: set[str] | None = None  # under _lock
        self._swept = False  # under _lock

    def recorded_before(self, key: str | None) -> bool:
        """Was `key` in the run files when this process first looked (logged by an earlier
        ckptd that died before its journal said so)?"""
        with self._lock:
            if self._at_start is None:
                self._at_start = recorded_keys(self.wandb_dir)
            return key in self._at_start

    def sweep_once(self) -> list[Path]:
        """The first time only, before this process opens a run: `discard_empty_runs`."""
        with self._lock:
            if self._swept:
                return []
            self._swept = True
        return discard_empty_runs(self.wandb_dir)

    def logged(self, request: PublishRequest) -> None:
        with self._lock:
            self._logged.setdefault(request.collection, []).append(request)

    def runs_lost(self) -> None:
        """wandb-core died: whatever its runs were given may never have been written."""
        with self._lock:
            for collection, requests in self._logged.items():
                self._lost.setdefault(collection, []).extend(requests)
            self._logged = {}

    def take_lost(self, collection: str) -> list[PublishRequest]:
        """The versions a dead run of `collection` was given and did not write, now taken
        (`give_back` what then cannot be logged)."""
        with self._lock:
            lost = self._lost.pop(collection, [])
        if not lost:
            return []
        on_disk = recorded_keys(self.wandb_dir, collection)
        return [r for r in lost if r.key not in on_disk]

    def give_back(self, collection: str, requests: list[PublishRequest]) -> None:
        with self._lock:
            self._lost.setdefault(collection, [])[:0] = requests


def run_id(wandb_dir: Path, collection: str) -> str:
    """The offline run id of `collection`, kept in `wandb_dir`, so that every start resumes
    the same run rather than adding one; a new one after a run that did not close.

    `wandb sync` given a run left unclosed by a kill -9 and a later run of the same id, in one
    command, uploads the first one's versions only, exits 0, and drops the second one's
    (measured with wandb 0.31); under a new id both upload."""
    path = wandb_dir / f"ckptd-run-{collection}.id"
    try:
        kept = path.read_text(encoding="ascii").strip()
    except (OSError, ValueError):
        kept = ""  # none yet, or unreadable: a new run
    if re.fullmatch(r"[0-9a-z]{1,64}", kept):
        if _closed(wandb_dir, kept):
            return kept
        log.info(
            "the last offline run of %s (%s) did not close (ckptd or wandb-core was killed): "
            "starting a new run, so that one `wandb sync` uploads both", collection, kept,
        )  # fmt: skip
    made = secrets.token_hex(4)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(made + "\n", encoding="ascii")
    temp.replace(path)
    return made


def keep_for_sync(run_dir: str, files: tuple[SinkFile, ...]) -> tuple[SinkFile, ...]:
    """Hard-link (across filesystems: copy) `files` into the offline run's directory, which
    `wandb sync` reads them from; the links cost no disk while the checkpoint exists."""
    dest = Path(run_dir).parent / "ckptd-files" / str(time.time_ns())
    kept = []
    for file in files:
        if file.ref is not None:
            kept.append(file)  # a reference: `wandb sync` uploads no bytes of it
            continue
        target = dest / file.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not staging.try_link(file.path, target):
            shutil.copy2(file.path, target)
        kept.append(SinkFile(file.name, target, file.md5_b64, file.size))
    return tuple(kept)


def recorded_keys(wandb_dir: Path, collection: str | None = None) -> set[str]:
    """The ckptd keys (metadata `ckptd.key`) of the versions (of `collection`, or of every
    collection) whose records are in the offline run files."""
    return {
        key
        for art in recorded_artifacts(wandb_dir)
        if (collection is None or art.name == collection)
        and (key := key_of(art.metadata)) is not None
    }


def _closed(wandb_dir: Path, run: str) -> bool:
    """Did the newest offline run directory of run id `run` close (its last whole record
    is the run's exit record)? True where there is none yet."""
    from wandb.proto import wandb_internal_pb2

    newest = max(wandb_dir.glob(f"offline-run-*-{run}/run-{run}.wandb"), default=None,
                 key=lambda p: p.parent.name)  # fmt: skip
    if newest is None:
        return True
    try:
        data = newest.read_bytes()
    except OSError:
        return False
    last = collections.deque(_payloads(data, newest), maxlen=1)  # the last whole record
    record: Any = wandb_internal_pb2.Record()  # type: ignore[attr-defined]
    try:
        record.ParseFromString(last[0] if last else b"")
    except Exception:  # protobuf's DecodeError: not a record this reader can use
        return False
    return bool(record.WhichOneof("record_type") == "exit")


def discard_empty_runs(wandb_dir: Path) -> list[Path]:
    """Delete the offline run directories whose run file holds no whole record (a run that
    wandb-core lost before writing anything); return them. `wandb sync` of such a run fails
    ("didn't find run info") and, given several runs, then silently uploads none of the
    others. Call it only while no run of this state_dir is open."""
    discarded = []
    for path in run_files(wandb_dir):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if next(_payloads(data, path), None) is None:
            shutil.rmtree(path.parent, ignore_errors=True)
            discarded.append(path.parent)
    return discarded


def run_files(wandb_dir: Path) -> list[Path]:
    """Every offline run file under `wandb_dir` (state_dir/wandb), oldest run first."""
    return sorted(wandb_dir.glob("offline-run-*/run-*.wandb"), key=lambda p: p.parent.name)


def recorded_artifacts(wandb_dir: Path) -> list[RecordedArtifact]:
    """Every artifact record durably written to an offline run file under `wandb_dir`."""
    from wandb.proto import wandb_internal_pb2

    found = []
    for path in run_files(wandb_dir):
        try:
            data = path.read_bytes()
        except OSError as exc:
            log.warning("cannot read W&B offline run file %s: %s", path, exc.strerror or exc)
            continue
        for payload in _payloads(data, path):
            record: Any = wandb_internal_pb2.Record()  # type: ignore[attr-defined]
            try:
                record.ParseFromString(payload)
            except Exception as exc:  # protobuf's DecodeError: a record this reader cannot use
                log.debug("%s: skipping a record that does not parse: %s", path, exc)
                continue
            artifact = _artifact_of(record)
            if artifact is not None:
                found.append(_recorded(artifact, path))
    return found


def _artifact_of(record: Any) -> Any:
    """The artifact record inside `record`, wherever this SDK version puts it, or None."""
    kind = record.WhichOneof("record_type")
    if kind == "artifact":
        return record.artifact
    if kind == "request" and record.request.WhichOneof("request_type") == "log_artifact":
        return record.request.log_artifact.artifact
    return None


def _recorded(artifact: Any, path: Path) -> RecordedArtifact:
    try:
        metadata = json.loads(artifact.metadata) if artifact.metadata else {}
    except ValueError:
        metadata = {}
    return RecordedArtifact(
        name=artifact.name,
        run_id=artifact.run_id,
        aliases=tuple(artifact.aliases),
        metadata=metadata if isinstance(metadata, dict) else {},
        run_file=path,
    )


def _payloads(data: bytes, path: Path) -> Iterator[bytes]:
    """The payload of each whole record in `data`; stops at the first torn or bad chunk."""
    if not data.startswith(_HEADER):
        if data:
            log.warning("%s is not a W&B offline run file (bad header); skipping it", path)
        return
    pos, pending = len(_HEADER), None
    while pos < len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK.size:
            pos += left  # block padding
            continue
        if len(data) - pos < _CHUNK.size:
            return  # a torn tail: written up to here
        crc, length, kind = _CHUNK.unpack_from(data, pos)
        body = data[pos + _CHUNK.size : pos + _CHUNK.size + length]
        if length > left - _CHUNK.size or len(body) < length or crc != _crc(kind, body):
            return  # torn, or not written yet (a zero-filled tail): nothing after is whole
        pos += _CHUNK.size + length
        if kind == _FULL:
            yield body
        elif kind == _FIRST:
            pending = [body]
        elif kind in (_MIDDLE, _LAST) and pending is not None:
            pending.append(body)
            if kind == _LAST:
                yield b"".join(pending)
                pending = None
        else:
            return


def _crc(kind: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF
