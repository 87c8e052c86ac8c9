"""Read the records of W&B offline run files (``run-<id>.wandb``).

``WANDB_MODE=offline`` makes the SDK append every record of a run to
``$WANDB_DIR/wandb/offline-run-<stamp>-<id>/run-<id>.wandb`` instead of sending it. Tests use
this module to check what a publisher *would* have uploaded, without a server.

File layout (a LevelDB-style log, as written by wandb-core 0.31):

* a 7-byte file header: ``b":W&B"``, the magic ``0xBEE1`` as u16 little-endian, version u8 ``0``;
* then the log proper, cut into 32 KiB blocks. Block boundaries are counted from the start of
  the *file*, so the first block holds the file header plus 32 761 bytes of chunks;
* each chunk is ``<crc32 u32 LE><length u16 LE><type u8>`` followed by ``length`` payload bytes,
  where type is 1 (full record), 2 (first), 3 (middle) or 4 (last fragment) and the CRC is the
  standard IEEE CRC-32 (``zlib.crc32``) over the type byte followed by the payload;
* a chunk never straddles a block; when fewer than 7 bytes are left in a block they are zero
  padding and the next chunk starts at the next block;
* the concatenated payload of one record parses as ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

from wandb.proto import wandb_internal_pb2 as _pb

# The generated protobuf modules ship without type stubs, so the message types are ``Any``
# to a type checker; the aliases keep signatures readable.
pb: Any = _pb
Record: TypeAlias = Any
"""``wandb.proto.wandb_internal_pb2.Record``."""
ArtifactRecord: TypeAlias = Any
"""``wandb.proto.wandb_internal_pb2.ArtifactRecord``."""

__all__ = [
    "BLOCK_SIZE",
    "FILE_HEADER",
    "OfflineArtifact",
    "OfflineRunFormatError",
    "artifacts",
    "find_run_files",
    "iter_record_payloads",
    "read_records",
]

FILE_MAGIC = b":W&B"
FILE_HEADER = FILE_MAGIC + struct.pack("<HB", 0xBEE1, 0)
"""The 7 bytes every offline run file starts with."""

BLOCK_SIZE = 32 * 1024
CHUNK_HEADER = struct.Struct("<IHB")  # crc32, payload length, chunk type

CHUNK_FULL = 1
CHUNK_FIRST = 2
CHUNK_MIDDLE = 3
CHUNK_LAST = 4
_CHUNK_NAMES = {
    CHUNK_FULL: "full",
    CHUNK_FIRST: "first",
    CHUNK_MIDDLE: "middle",
    CHUNK_LAST: "last",
}


class OfflineRunFormatError(ValueError):
    """The file is not a well-formed W&B offline run file; the message says where and why."""

    def __init__(self, path: Path | str, offset: int, reason: str) -> None:
        super().__init__(f"{path}: corrupt W&B run file at byte {offset}: {reason}")
        self.path = Path(path)
        self.offset = offset
        self.reason = reason


def _chunk_crc(chunk_type: int, payload: bytes) -> int:
    """CRC-32 (IEEE) over the chunk type byte followed by the payload."""
    return zlib.crc32(payload, zlib.crc32(bytes([chunk_type]))) & 0xFFFFFFFF


def iter_record_payloads(
    data: bytes, *, path: Path | str = "<bytes>", torn_tail: bool = False
) -> Iterator[bytes]:
    """Yield the raw payload of every record in the bytes of a run file, checking every CRC.

    Raises ``OfflineRunFormatError`` on a bad header, a CRC mismatch, a chunk that runs past
    its block or the end of the file, fragments out of order, non-zero block padding, or a
    record left unfinished at the end of the file. With ``torn_tail``, a file that ends in
    the middle of its last record (a writer killed mid-write) yields the records before it,
    as ``wandb sync`` reads such a file.
    """
    if len(data) < len(FILE_HEADER):
        raise OfflineRunFormatError(path, 0, f"file is {len(data)} bytes, shorter than the header")
    if data[: len(FILE_MAGIC)] != FILE_MAGIC:
        raise OfflineRunFormatError(path, 0, f"bad magic {data[:4]!r}, expected {FILE_MAGIC!r}")
    if data[: len(FILE_HEADER)] != FILE_HEADER:
        magic, version = struct.unpack_from("<HB", data, len(FILE_MAGIC))
        raise OfflineRunFormatError(
            path, 4, f"unsupported header ident 0x{magic:04X} version {version}"
        )

    pos = len(FILE_HEADER)
    pending: list[bytes] | None = None  # fragments of a record split across chunks
    pending_start = pos
    while pos < len(data):
        left_in_block = BLOCK_SIZE - pos % BLOCK_SIZE
        if left_in_block < CHUNK_HEADER.size:
            padding = data[pos : pos + left_in_block]
            if padding.strip(b"\x00"):
                raise OfflineRunFormatError(path, pos, f"non-zero block padding {padding!r}")
            pos += left_in_block
            continue
        if len(data) - pos < CHUNK_HEADER.size:
            if torn_tail:
                return
            raise OfflineRunFormatError(
                path, pos, f"truncated chunk header ({len(data) - pos} trailing bytes)"
            )
        crc, length, chunk_type = CHUNK_HEADER.unpack_from(data, pos)
        body_start = pos + CHUNK_HEADER.size
        if length > left_in_block - CHUNK_HEADER.size:
            raise OfflineRunFormatError(
                path, pos, f"chunk length {length} runs past the end of its 32 KiB block"
            )
        if body_start + length > len(data):
            if torn_tail:
                return
            raise OfflineRunFormatError(
                path, pos, f"chunk length {length} runs past the end of the file (truncated?)"
            )
        payload = data[body_start : body_start + length]
        if chunk_type not in _CHUNK_NAMES:
            raise OfflineRunFormatError(path, pos, f"unknown chunk type {chunk_type}")
        actual = _chunk_crc(chunk_type, payload)
        if actual != crc:
            raise OfflineRunFormatError(
                path, pos, f"CRC mismatch: stored 0x{crc:08X}, computed 0x{actual:08X}"
            )

        if chunk_type == CHUNK_FULL:
            if pending is not None:
                raise OfflineRunFormatError(path, pos, "full chunk inside a fragmented record")
            yield payload
        elif chunk_type == CHUNK_FIRST:
            if pending is not None:
                raise OfflineRunFormatError(path, pos, "first chunk inside a fragmented record")
            pending, pending_start = [payload], pos
        else:
            if pending is None:
                name = _CHUNK_NAMES[chunk_type]
                raise OfflineRunFormatError(path, pos, f"{name} chunk without a first chunk")
            pending.append(payload)
            if chunk_type == CHUNK_LAST:
                yield b"".join(pending)
                pending = None
        pos = body_start + length

    if pending is not None and not torn_tail:
        raise OfflineRunFormatError(
            path, pending_start, "file ends inside a fragmented record (truncated?)"
        )


def read_records(path: Path | str, *, torn_tail: bool = False) -> list[Record]:
    """Parse every record of one ``run-<id>.wandb`` file, verifying CRCs and framing
    (``torn_tail``: see ``iter_record_payloads``)."""
    path = Path(path)
    records: list[Record] = []
    data = path.read_bytes()
    for index, payload in enumerate(iter_record_payloads(data, path=path, torn_tail=torn_tail)):
        record = pb.Record()
        try:
            record.ParseFromString(payload)
        except Exception as exc:  # protobuf raises its own DecodeError type
            raise OfflineRunFormatError(
                path, -1, f"record #{index} is not a wandb Record protobuf: {exc}"
            ) from exc
        records.append(record)
    return records


def find_run_files(wandb_dir: Path | str) -> list[Path]:
    """Return the offline run files under ``wandb_dir``, oldest run directory first.

    ``wandb_dir`` may be ``$WANDB_DIR`` (which holds ``wandb/``), the ``wandb/`` directory
    itself, or a single ``offline-run-*`` directory.
    """
    root = Path(wandb_dir)
    patterns = (
        "wandb/offline-run-*/run-*.wandb",
        "offline-run-*/run-*.wandb",
        "run-*.wandb",
    )
    found: set[Path] = set()
    for pattern in patterns:
        found.update(p for p in root.glob(pattern) if p.is_file())
    # Run directories are named offline-run-<YYYYmmdd_HHMMSS>-<id>: sorting by the directory
    # name orders by start time, then by id.
    return sorted(found, key=lambda p: (p.parent.name, p.name))


@dataclass(frozen=True)
class OfflineArtifact:
    """One artifact as recorded by ``run.log_artifact`` in an offline run file."""

    name: str
    type: str
    aliases: tuple[str, ...]
    metadata: dict[str, Any]
    description: str
    digest: str
    entries: dict[str, tuple[str, int, str]] = field(default_factory=dict)
    """Manifest entries: artifact path -> (digest, size in bytes, local path at log time)."""
    run_id: str = ""
    project: str = ""
    tags: tuple[str, ...] = ()


def _artifact_from_record(record: ArtifactRecord) -> OfflineArtifact:
    """Convert the protobuf artifact record to an ``OfflineArtifact``."""
    metadata: dict[str, Any] = json.loads(record.metadata) if record.metadata else {}
    entries = {
        entry.path: (entry.digest, int(entry.size), entry.local_path)
        for entry in record.manifest.contents
    }
    return OfflineArtifact(
        name=record.name,
        type=record.type,
        aliases=tuple(record.aliases),
        metadata=metadata,
        description=record.description,
        digest=record.digest,
        entries=entries,
        run_id=record.run_id,
        project=record.project,
        tags=tuple(record.tags),
    )


def _artifact_records(records: list[Record]) -> Iterator[ArtifactRecord]:
    """Yield the artifact records a run logged, wherever the SDK put them.

    wandb 0.31 stores ``log_artifact`` as a top-level ``Record.artifact``; older and possibly
    newer SDKs wrap it in ``Record.request.log_artifact.artifact``. Both are accepted.
    """
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "artifact":
            yield record.artifact
        elif kind == "request" and record.request.WhichOneof("request_type") == "log_artifact":
            yield record.request.log_artifact.artifact


def artifacts(path_or_dir: Path | str, *, torn_tail: bool = True) -> list[OfflineArtifact]:
    """Return every artifact logged in a run file, or in all run files under a directory:
    what ``wandb sync`` uploads, so a record torn by a kill -9 at the end of a file is not
    there (``torn_tail=False`` refuses such a file instead).

    Artifacts come in run order (as ``find_run_files`` sorts them), then in log order.
    """
    target = Path(path_or_dir)
    files = [target] if target.is_file() else find_run_files(target)
    return [
        _artifact_from_record(art)
        for run_file in files
        for art in _artifact_records(read_records(run_file, torn_tail=torn_tail))
    ]
