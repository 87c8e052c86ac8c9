"""Tests for ``tests.support.wandb_offline`` against files written by the real wandb SDK.

The SDK runs in offline mode in this process; every test reads back what it wrote.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import wandb

from tests.support.wandb_offline import (
    BLOCK_SIZE,
    FILE_HEADER,
    OfflineArtifact,
    OfflineRunFormatError,
    artifacts,
    find_run_files,
    read_records,
)


@dataclass(frozen=True)
class _Spec:
    """An artifact to log: name, type, aliases, metadata, description and files to add."""

    name: str
    type: str
    aliases: Sequence[str]
    metadata: dict[str, Any]
    description: str
    files: dict[str, bytes]  # artifact path -> content


def _offline_env(base: Path) -> dict[str, str]:
    """Environment that keeps the SDK offline and every wandb directory under ``base``."""
    env = {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true",
        "WANDB_ERROR_REPORTING": "false",
    }
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        directory = base / var.lower()
        directory.mkdir(parents=True, exist_ok=True)
        env[var] = str(directory)
    return env


def _log_offline_run(base: Path, specs: Sequence[_Spec], project: str = "ckptd-test") -> Path:
    """Run the real SDK offline, log ``specs`` in order, finish; return ``$WANDB_DIR``."""
    env = _offline_env(base)
    src = base / "src"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        try:
            run = wandb.init(project=project, dir=env["WANDB_DIR"], reinit="create_new")
            for spec in specs:
                art = wandb.Artifact(
                    spec.name, type=spec.type, metadata=spec.metadata, description=spec.description
                )
                for rel, content in spec.files.items():
                    local = src / spec.name / rel
                    local.parent.mkdir(parents=True, exist_ok=True)
                    local.write_bytes(content)
                    art.add_file(str(local), name=rel, policy="immutable", skip_cache=True)
                run.log_artifact(art, aliases=list(spec.aliases))
            run.finish()
        finally:
            # The SDK keeps process-wide settings (read from the environment at setup time);
            # drop them so the next test's environment is honoured.
            wandb.teardown()
    return Path(env["WANDB_DIR"])


def _b64md5(content: bytes) -> str:
    """W&B manifest digest of a file: base64 of its MD5."""
    return base64.b64encode(hashlib.md5(content).digest()).decode()


MODEL = _Spec(
    name="model-run1",
    type="model",
    aliases=["step-100", "best"],
    metadata={"step": 100, "metrics": {"eval_loss": 0.25}, "format": "hf-trainer"},
    description="checkpoint-100",
    files={"config.json": b'{"a": 1}', "weights/model.safetensors": os.urandom(5000)},
)
OPTIM = _Spec(
    name="optim-run1",
    type="optimizer",
    aliases=["step-100"],
    metadata={"step": 100},
    description="",
    files={"optimizer.pt": os.urandom(1234)},
)


@pytest.fixture(scope="module")
def two_artifacts_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``$WANDB_DIR`` of one offline run that logged ``MODEL`` then ``OPTIM``."""
    return _log_offline_run(tmp_path_factory.mktemp("wandb-two"), [MODEL, OPTIM])


@pytest.fixture
def run_file(two_artifacts_run: Path, tmp_path: Path) -> Path:
    """A private copy of the two-artifact run file that a test may corrupt."""
    (original,) = find_run_files(two_artifacts_run)
    copy = tmp_path / original.name
    copy.write_bytes(original.read_bytes())
    return copy


def _by_name(arts: list[OfflineArtifact]) -> dict[str, OfflineArtifact]:
    """Index artifacts by name."""
    return {a.name: a for a in arts}


def test_find_run_files_accepts_wandb_dir_wandb_subdir_and_run_dir(
    two_artifacts_run: Path,
) -> None:
    """find_run_files finds the single run file from $WANDB_DIR, its wandb/ and the run dir."""
    (found,) = find_run_files(two_artifacts_run)
    assert found.name.startswith("run-") and found.suffix == ".wandb"
    assert found.parent.name.startswith("offline-run-")
    assert find_run_files(two_artifacts_run / "wandb") == [found]
    assert find_run_files(found.parent) == [found]


def test_find_run_files_empty_dir(tmp_path: Path) -> None:
    """A directory without offline runs yields no run files and no artifacts."""
    assert find_run_files(tmp_path) == []
    assert artifacts(tmp_path) == []


def test_records_start_with_header_and_name_the_run(two_artifacts_run: Path) -> None:
    """The first record is the SDK header and a run record carries the run id from the name."""
    (found,) = find_run_files(two_artifacts_run)
    records = read_records(found)
    kinds = [r.WhichOneof("record_type") for r in records]
    assert kinds[0] == "header"
    run_ids = {r.run.run_id for r in records if r.WhichOneof("record_type") == "run"}
    assert run_ids == {found.stem.removeprefix("run-")}
    assert kinds.count("artifact") == 2


def test_artifacts_round_trip_names_types_aliases_metadata(two_artifacts_run: Path) -> None:
    """Both logged artifacts come back, in log order, with type, aliases (+latest) and metadata."""
    arts = artifacts(two_artifacts_run)
    assert [a.name for a in arts] == [MODEL.name, OPTIM.name]
    for spec, art in zip((MODEL, OPTIM), arts, strict=True):
        assert art.type == spec.type
        assert set(art.aliases) == {*spec.aliases, "latest"}
        assert art.metadata == spec.metadata
        assert art.description == spec.description
        assert art.project == "ckptd-test"
        assert len(art.digest) == 32


def test_artifact_entries_carry_md5_size_and_local_path(two_artifacts_run: Path) -> None:
    """Every manifest entry has the base64 MD5, byte size and the local path that was added."""
    arts = _by_name(artifacts(two_artifacts_run))
    for spec in (MODEL, OPTIM):
        entries = arts[spec.name].entries
        assert set(entries) == set(spec.files)
        for rel, content in spec.files.items():
            digest, size, local = entries[rel]
            assert digest == _b64md5(content)
            assert size == len(content)
            assert Path(local).read_bytes() == content


def test_offline_artifact_is_frozen(two_artifacts_run: Path) -> None:
    """OfflineArtifact is immutable so tests cannot accidentally edit what was recorded."""
    art = artifacts(two_artifacts_run)[0]
    with pytest.raises(AttributeError):
        art.name = "other"  # type: ignore[misc]


def test_record_larger_than_a_block_is_reassembled(tmp_path: Path) -> None:
    """An artifact record bigger than 32 KiB (first/middle/last chunks) parses intact."""
    big = {"blob": "x" * (3 * BLOCK_SIZE), "step": 7}
    spec = _Spec("big", "model", ["step-7"], big, "", {"f.bin": b"abc"})
    wandb_dir = _log_offline_run(tmp_path, [spec])
    (found,) = find_run_files(wandb_dir)
    assert found.stat().st_size > 3 * BLOCK_SIZE
    chunk_types = set(_chunk_types(found.read_bytes()))
    assert {2, 3, 4} <= chunk_types
    (art,) = artifacts(found)
    assert art.metadata == big


def test_artifacts_from_several_runs_in_run_order(tmp_path: Path) -> None:
    """Two runs in one $WANDB_DIR give two run files, and artifacts() reads both."""
    first = _Spec("a", "model", ["v"], {"step": 1}, "", {"x": b"1"})
    second = _Spec("b", "model", ["v"], {"step": 2}, "", {"x": b"2"})
    wandb_dir = _log_offline_run(tmp_path, [first])
    assert _log_offline_run(tmp_path, [second]) == wandb_dir
    files = find_run_files(wandb_dir)
    assert len(files) == 2
    assert sorted(a.name for a in artifacts(wandb_dir)) == ["a", "b"]
    assert [a.name for f in files for a in artifacts(f)] == [a.name for a in artifacts(wandb_dir)]


def test_flipped_payload_byte_raises_crc_error(run_file: Path) -> None:
    """A single flipped byte inside a record is reported as a CRC mismatch with its offset."""
    data = bytearray(run_file.read_bytes())
    data[len(FILE_HEADER) + 7 + 3] ^= 0xFF  # inside the first record's payload
    run_file.write_bytes(bytes(data))
    with pytest.raises(OfflineRunFormatError, match="CRC mismatch") as info:
        read_records(run_file)
    assert info.value.offset == len(FILE_HEADER)
    assert str(run_file) in str(info.value)


def test_truncated_file_raises(run_file: Path) -> None:
    """A run file cut short in the middle of a chunk is rejected, not silently shortened."""
    data = run_file.read_bytes()
    run_file.write_bytes(data[: len(data) - 5])
    with pytest.raises(OfflineRunFormatError, match=r"past the end of the file|truncated"):
        read_records(run_file)


def test_bad_magic_raises(run_file: Path) -> None:
    """A file that does not start with the :W&B header is rejected."""
    data = run_file.read_bytes()
    run_file.write_bytes(b"XXXX" + data[4:])
    with pytest.raises(OfflineRunFormatError, match="bad magic"):
        read_records(run_file)


def test_unknown_header_version_raises(run_file: Path) -> None:
    """A header with a version other than 0 is rejected rather than misparsed."""
    data = bytearray(run_file.read_bytes())
    data[6] = 1
    run_file.write_bytes(bytes(data))
    with pytest.raises(OfflineRunFormatError, match="version 1"):
        read_records(run_file)


def test_valid_crc_but_garbage_protobuf_raises(tmp_path: Path) -> None:
    """A well-framed chunk whose payload is not a Record protobuf raises a format error."""
    payload = b"\xff\xff\xff\xff"
    crc = zlib.crc32(payload, zlib.crc32(b"\x01"))
    path = tmp_path / "run-bad.wandb"
    path.write_bytes(FILE_HEADER + struct.pack("<IHB", crc, len(payload), 1) + payload)
    with pytest.raises(OfflineRunFormatError, match="not a wandb Record"):
        read_records(path)


def _chunk_types(data: bytes) -> Iterator[int]:
    """Yield the chunk type of every chunk in a run file (framing only, no CRC check)."""
    pos = len(FILE_HEADER)
    while pos < len(data):
        left = BLOCK_SIZE - pos % BLOCK_SIZE
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack_from("<IHB", data, pos)
        yield kind
        pos += 7 + length


def test_a_torn_last_record_is_left_out_when_asked_as_wandb_sync_does(run_file: Path) -> None:
    """A writer killed mid-record leaves a torn tail: strict reading refuses the file,
    `torn_tail=True` (what `wandb sync` uploads) gives every record before the tear."""
    whole = read_records(run_file)
    data = run_file.read_bytes()
    run_file.write_bytes(data[: len(data) - 5])
    with pytest.raises(OfflineRunFormatError):
        read_records(run_file)
    assert read_records(run_file, torn_tail=True) == whole[:-1]


def test_a_run_left_unclosed_by_a_crash_is_not_resumed(run_file: Path, tmp_path: Path) -> None:
    """ckptd resumes a collection's offline run id only after that run closed (its last
    record is the exit record): `wandb sync` of an unclosed run and a later run of the same
    id, in one command, uploads the first one's versions only. After a crash: a new id."""
    from ckptd.sinks.offline_runs import run_id

    wandb_dir = tmp_path / "state-wandb"
    run = wandb_dir / "offline-run-20260101_000000-abc123"
    run.mkdir(parents=True)
    closed = run / "run-abc123.wandb"
    closed.write_bytes(run_file.read_bytes())  # a real run, finished: exit record last
    (wandb_dir / "ckptd-run-model.id").write_text("abc123\n")
    assert run_id(wandb_dir, "model") == "abc123"
    records = read_records(closed)
    assert records[-1].WhichOneof("record_type") == "exit"
    closed.write_bytes(run_file.read_bytes()[:-200])  # killed before it closed
    fresh = run_id(wandb_dir, "model")
    assert fresh != "abc123" and fresh == run_id(wandb_dir, "model")  # kept from now on
    assert (wandb_dir / "ckptd-run-model.id").read_text().strip() == fresh
