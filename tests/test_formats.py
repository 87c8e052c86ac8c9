"""Each checkpoint format on real files: what a unit is, when it is finished, what it says."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptd.config import WatchConfig
from ckptd.formats import CheckpointFormat, FileFormat, Verdict, format_for
from ckptd.formats.auto import FORMATS, AutoFormat
from ckptd.formats.checks import (
    check_file,
    check_hdf5,
    check_pickle,
    check_tar,
    check_tf_index,
    check_zip,
    torch_saved_ints,
)
from ckptd.formats.tensorflow import named_prefixes
from tests.support.writers import WRITERS, WriterSpec

STEP = 100


def spec(spec_id: str) -> WriterSpec:
    """A writer spec by its id (`format` or `format/variant`)."""
    name, _, variant = spec_id.partition("/")
    return WRITERS[name].variants[variant] if variant else WRITERS[name]


def fmt_of(root: Path, name: str) -> CheckpointFormat:
    """The format object `format: name` builds for a watch of `root`."""
    root.mkdir(parents=True, exist_ok=True)
    return format_for(WatchConfig.model_validate({"path": root, "format": name}))


def written(
    tmp_path: Path, spec_id: str, fmt: str | None = None, **kwargs: Any
) -> tuple[CheckpointFormat, Path]:
    """Run a writer to completion under tmp_path/root; return the format and the unit."""
    writer = spec(spec_id)
    root = tmp_path / "root"
    fmt_obj = fmt_of(root, fmt or writer.format)
    writer.run(root, STEP, **kwargs)
    return fmt_obj, writer.unit_path(root, STEP, **kwargs)


def names(verdict: Verdict) -> set[str]:
    """The names of the files a verdict would publish."""
    return {f.name for f in verdict.files}


def hdf5_bytes(eof: int, size: int, version: int = 0) -> bytes:
    """A file that starts with an HDF5 superblock recording `eof`, padded to `size`."""
    head = b"\x89HDF\r\n\x1a\n"
    if version == 0:
        head += bytes([0, 0, 0, 0, 0, 8, 8, 0]) + struct.pack("<HHI", 4, 16, 0)
    else:
        head += bytes([version, 8, 8, 0])
    head += struct.pack("<QQQQ", 0, 0xFFFFFFFFFFFFFFFF, eof, 0)
    return head + b"\0" * (size - len(head))


def torch_bytes(obj: Any) -> bytes:
    """What torch.save writes for `obj`."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# -- registry -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_format_for_builds_each_named_format(name: str, tmp_path: Path) -> None:
    """Every `format:` name in the config gets its own format object, named after it."""
    fmt = fmt_of(tmp_path, name)
    assert type(fmt) is FORMATS[name] and fmt.name == name


def test_format_for_auto_and_file(tmp_path: Path) -> None:
    """`auto` is the AutoFormat and `file` is still the plain FileFormat."""
    assert isinstance(fmt_of(tmp_path, "auto"), AutoFormat)
    assert type(fmt_of(tmp_path, "file")) is FileFormat


# -- structural checks ----------------------------------------------------------------------


@pytest.mark.parametrize("version", [0, 2])
def test_hdf5_check_compares_the_superblock_eof_with_the_size(version: int, tmp_path: Path) -> None:
    """An HDF5 file shorter than its recorded end-of-file address is torn; others pass."""
    path = tmp_path / "m.h5"
    path.write_bytes(hdf5_bytes(4096, 4096, version))
    assert check_hdf5(path) is None
    path.write_bytes(hdf5_bytes(4096, 2048, version))
    assert "4096" in (check_hdf5(path) or "")
    path.write_bytes(b"not hdf5 at all" * 10)
    assert check_hdf5(path) is None
    path.write_bytes(b"")
    assert check_hdf5(path) == "empty file"


def test_tar_check_wants_the_end_of_archive(tmp_path: Path) -> None:
    """A ustar tar is finished with its zero blocks; a cut one is not; gzip passes."""
    path = tmp_path / "model.nemo"
    with tarfile.open(path, "w:") as tar:
        tar.addfile(tarfile.TarInfo("model_config.yaml"), io.BytesIO(b""))
        info = tarfile.TarInfo("weights.ckpt")
        info.size = 3000
        tar.addfile(info, io.BytesIO(b"\1" * 3000))
    assert check_tar(path) is None and check_file(path) is None
    data = path.read_bytes()
    path.write_bytes(data[:2048])
    assert check_tar(path) is not None
    path.write_bytes(b"\x1f\x8b" + b"\0" * 600)
    assert check_tar(path) is None


@pytest.mark.parametrize("cut", range(1, 22))
def test_zip_cut_inside_its_end_record_is_torn(cut: int, tmp_path: Path) -> None:
    """A torch.save zip cut anywhere inside its 22-byte end record is reported as torn, not
    an error: its signature alone is no end record."""
    path = tmp_path / "pytorch_model.bin"
    data = torch_bytes({"w": torch.zeros(4)})
    path.write_bytes(data[:-cut])
    assert check_zip(path) == "zip end-of-central-directory record not written yet"
    path.write_bytes(data)
    assert check_zip(path) is None


def test_tf_index_and_pickle_checks(tmp_path: Path) -> None:
    """A TF index needs its footer magic; a pickle needs its STOP byte."""
    index = tmp_path / "ckpt-1.index"
    index.write_bytes(b"\0" * 40 + struct.pack("<Q", 0xDB4775248B80FB57))
    assert check_tf_index(index) is None
    index.write_bytes(b"\0" * 48)
    assert check_tf_index(index) is not None
    meta = tmp_path / ".metadata"
    meta.write_bytes(b"\x80\x04K\x01.")
    assert check_pickle(meta) is None
    meta.write_bytes(b"\x80\x04K")
    assert check_pickle(meta) is not None


def test_torch_saved_ints_reads_without_unpickling(tmp_path: Path) -> None:
    """Integers and Nones under top-level keys come out of a torch.save zip; torn or
    non-zip files give nothing."""
    path = tmp_path / "last.ckpt"
    path.write_bytes(
        torch_bytes({"epoch": 3, "global_step": 70000, "optimizer": None, "name": "x"})
    )
    keys = ("epoch", "global_step", "optimizer", "name", "absent")
    assert torch_saved_ints(path, keys) == {"epoch": 3, "global_step": 70000, "optimizer": None}
    path.write_bytes(path.read_bytes()[:-30])
    assert torch_saved_ints(path, keys) == {}
    path.write_bytes(b"plain text")
    assert torch_saved_ints(path, keys) == {}


# -- directory units in general -------------------------------------------------------------


def test_symlink_leaving_the_root_is_refused(tmp_path: Path) -> None:
    """A symlink inside a checkpoint that points outside the watched root makes the unit
    not ready, with a reason naming the link."""
    fmt, unit = written(tmp_path, "hf-trainer")
    outside = tmp_path / "elsewhere.pt"
    outside.write_bytes(b"x")
    (unit / "extra.pt").symlink_to(outside)
    verdict = fmt.check(unit)
    assert not verdict.ready
    assert str(unit / "extra.pt") in verdict.reason and "outside the watched root" in verdict.reason


def test_symlink_inside_the_root_is_followed(tmp_path: Path) -> None:
    """A symlinked file pointing inside the root is published as the file it points to."""
    fmt, unit = written(tmp_path, "hf-trainer")
    shared = unit.parent / "shared_vocab.txt"
    shared.write_text("a b c")
    (unit / "vocab.txt").symlink_to(shared)
    verdict = fmt.check(unit)
    assert verdict.ready, verdict.reason
    (state,) = [f for f in verdict.files if f.name == "vocab.txt"]
    assert state.size == 5 and state.ino == shared.stat().st_ino


def test_dangling_symlink_is_not_ready(tmp_path: Path) -> None:
    """A dangling symlink inside a unit is a reason to wait, not a vanished checkpoint."""
    fmt, unit = written(tmp_path, "torch-dcp")
    (unit / "gone").symlink_to(unit / "missing")
    verdict = fmt.check(unit)
    assert not verdict.ready and "dangling" in verdict.reason


def test_temp_file_inside_a_unit_blocks_it(tmp_path: Path) -> None:
    """A temp file inside a unit (safetensors' `.tmpXXXXXX`) means a write is in flight."""
    fmt, unit = written(tmp_path, "hf-trainer")
    (unit / ".tmpAb12Cd").write_bytes(b"half")
    verdict = fmt.check(unit)
    assert not verdict.ready and ".tmpAb12Cd" in verdict.reason


def test_sidecar_inside_a_unit_is_not_published(tmp_path: Path) -> None:
    """`metrics.json` inside a directory unit is the sidecar: read, never a checkpoint file."""
    fmt, unit = written(tmp_path, "orbax")
    (unit / "metrics.json").write_text('{"step": 1}')
    assert "metrics.json" not in names(fmt.check(unit))


@pytest.mark.parametrize("spec_id", ["hf-trainer", "orbax", "nemo", "tensorflow", "keras"])
@pytest.mark.parametrize("how", ["own", "auto"])
def test_vanished_unit_raises_file_not_found(spec_id: str, how: str, tmp_path: Path) -> None:
    """A unit deleted (rotated away) raises FileNotFoundError, as the interface says."""
    fmt, unit = written(tmp_path, spec_id, None if how == "own" else "auto")
    for path in list(unit.parent.iterdir()):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    with pytest.raises(FileNotFoundError):
        fmt.check(unit)


# -- Hugging Face ---------------------------------------------------------------------------


def test_hf_finished_is_ready_without_a_commit_signal(tmp_path: Path) -> None:
    """A complete checkpoint-N/ is ready but left to the settle window (written in place)."""
    fmt, unit = written(tmp_path, "hf-trainer")
    verdict = fmt.check(unit)
    assert verdict.ready and not verdict.committed
    assert names(verdict) == spec("hf-trainer").files(STEP)


def test_hf_index_naming_a_missing_shard(tmp_path: Path) -> None:
    """A shard named by model.safetensors.index.json but absent keeps the unit unfinished."""
    fmt, unit = written(tmp_path, "hf-trainer", shards=3)
    (unit / "model-00002-of-00003.safetensors").unlink()
    verdict = fmt.check(unit)
    assert not verdict.ready and "model-00002-of-00003.safetensors" in verdict.reason


def test_hf_torn_safetensors_shard(tmp_path: Path) -> None:
    """A shard shorter than its header says is torn."""
    fmt, unit = written(tmp_path, "hf-trainer")
    shard = unit / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    verdict = fmt.check(unit)
    assert not verdict.ready and "model-00001-of-00002.safetensors" in verdict.reason


def test_hf_rng_states_must_be_contiguous(tmp_path: Path) -> None:
    """rng_state_R.pth must run 0..N-1; a gap, or rank 0 alone, is not finished."""
    fmt, unit = written(tmp_path, "hf-trainer", ranks=3)
    (unit / "rng_state_1.pth").unlink()
    assert "rng_state_1.pth missing" in fmt.check(unit).reason
    (unit / "rng_state_2.pth").unlink()
    verdict = fmt.check(unit)
    assert not verdict.ready and "rng_state_0.pth" in verdict.reason


def test_hf_single_process_is_ready(tmp_path: Path) -> None:
    """One process writes rng_state.pth and model.safetensors without an index."""
    fmt, unit = written(tmp_path, "hf-trainer", ranks=1, shards=1)
    assert fmt.check(unit).ready


def test_hf_nested_deepspeed_shards_are_checked(tmp_path: Path) -> None:
    """With DeepSpeed inside checkpoint-N/, a missing ZeRO shard keeps it unfinished."""
    fmt, unit = written(tmp_path, "hf-trainer")
    WRITERS["deepspeed"].run(unit, STEP, ranks=2)
    assert fmt.check(unit).ready
    (unit / f"global_step{STEP}" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    verdict = fmt.check(unit)
    assert not verdict.ready and "dp_world_size is 2" in verdict.reason


def test_hf_info_from_trainer_state(tmp_path: Path) -> None:
    """Step, epoch, the latest evaluation's metrics and best_metric come from trainer_state."""
    fmt, unit = written(tmp_path, "hf-trainer")
    info = fmt.info(unit)
    assert info.step == STEP and info.epoch == 1.0
    assert info.metrics["eval_loss"] == pytest.approx(0.5 + 100 / 150, abs=1e-4)
    assert "step" not in info.metrics and "loss" not in info.metrics
    assert info.metadata["best_metric"] == info.metrics["eval_loss"]
    assert info.source == str(unit / "trainer_state.json")


@pytest.mark.parametrize("content", ["{torn", "[1, 2]", '{"global_step": "x", "log_history": 5}'])
def test_hf_bad_trainer_state_never_raises(
    content: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A malformed trainer_state.json gives what the name says, without an error or a log."""
    fmt, unit = written(tmp_path, "hf-trainer")
    (unit / "trainer_state.json").write_text(content)
    caplog.set_level(logging.DEBUG)
    info = fmt.info(unit)
    assert info.step == STEP and info.metrics == {}
    assert caplog.records == []


# -- save_pretrained() and PEFT directories (real files) ------------------------------------


@pytest.fixture(scope="module")
def real_layouts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What transformers' and peft's `save_pretrained` really write (tests/support/trainers.py
    `layouts`, in a process of its own): plain, sharded, bin, adapter, adapter-bin."""
    out = tmp_path_factory.mktemp("layouts")
    subprocess.run(
        [sys.executable, "-m", "tests.support.trainers", "layouts", str(out / "made"),
         str(out / "record.jsonl")],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return out / "made"


def pretrained(
    real_layouts: Path, tmp_path: Path, layout: str, fmt: str = "auto"
) -> tuple[CheckpointFormat, Path]:
    """A copy of one real layout under tmp_path/root, and the format watching that root."""
    root = tmp_path / "root"
    fmt_obj = fmt_of(root, fmt)
    shutil.copytree(real_layouts / layout, root / layout)
    return fmt_obj, root / layout


_PRETRAINED = ["plain", "sharded", "bin", "adapter", "adapter-bin"]


def _parses(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("fmt_name", ["hf-pretrained", "auto"])
@pytest.mark.parametrize("layout", _PRETRAINED)
def test_save_pretrained_directory_is_one_unit(
    layout: str, fmt_name: str, real_layouts: Path, tmp_path: Path
) -> None:
    """Each directory save_pretrained() writes (a model unsharded, sharded or as a .bin, a
    PEFT adapter as safetensors or .bin) is one hf-pretrained unit, ready with every file."""
    fmt, unit = pretrained(real_layouts, tmp_path, layout, fmt_name)
    root = unit.parent
    files = {p.name for p in unit.iterdir()}
    assert list(fmt.scan(root)) == [unit]
    assert all(fmt.unit_for(root, unit / name) == unit for name in files)
    if isinstance(fmt, AutoFormat):
        owner = fmt.owner(unit)
        assert owner is not None and owner.name == "hf-pretrained"
    verdict = fmt.check(unit)
    assert verdict.ready and not verdict.committed, verdict.reason
    assert not verdict.conclusive  # a tokenizer may follow the weights: settle decides
    assert names(verdict) == files


def test_sharded_save_pretrained_needs_every_shard_its_index_names(
    real_layouts: Path, tmp_path: Path
) -> None:
    """A shard the index names but absent, a torn shard, or shards without their index
    (save_pretrained writes the index last) keep the directory unfinished, named."""
    fmt, unit = pretrained(real_layouts, tmp_path, "sharded")
    shards = sorted(unit.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3
    kept = shards[1].read_bytes()
    shards[1].unlink()
    verdict = fmt.check(unit)
    assert not verdict.ready and f"names {shards[1].name}, which is missing" in verdict.reason
    shards[1].write_bytes(kept[:-5])
    verdict = fmt.check(unit)
    assert not verdict.ready and shards[1].name in verdict.reason
    shards[1].write_bytes(kept)
    (unit / "model.safetensors.index.json").unlink()
    verdict = fmt.check(unit)
    assert not verdict.ready and "model.safetensors.index.json missing" in verdict.reason


@pytest.mark.parametrize(
    ("layout", "remove", "reason"),
    [
        ("plain", "model.safetensors", "no weights yet"),
        ("plain", "config.json", "no config.json yet"),
        ("bin", "pytorch_model.bin", "no weights yet"),
        ("adapter", "adapter_config.json", "no adapter_config.json yet"),
        ("adapter", "adapter_model.safetensors", "no adapter weights yet"),
        ("adapter-bin", "adapter_model.bin", "no adapter weights yet"),
    ],
)
def test_save_pretrained_missing_part_is_not_ready(
    layout: str, remove: str, reason: str, real_layouts: Path, tmp_path: Path
) -> None:
    """A model without its weights or config, or an adapter without its weights or config,
    is not finished, and the reason names what is missing."""
    fmt, unit = pretrained(real_layouts, tmp_path, layout, "hf-pretrained")
    (unit / remove).unlink()
    verdict = fmt.check(unit)
    assert not verdict.ready and reason in verdict.reason


@pytest.mark.parametrize(
    ("layout", "keep"), [("plain", "config.json"), ("plain", "model.safetensors"),
                         ("sharded", "model-00001-of-00008.safetensors")],
)  # fmt: skip
def test_config_alone_or_bare_weights_are_no_save_pretrained_directory(
    layout: str, keep: str, real_layouts: Path, tmp_path: Path
) -> None:
    """transformers writes config.json first: a config.json alone (no weights yet, or no
    model at all) or weights without a config are not claimed, so auto reports such a
    directory as a layout it does not recognise instead of waiting on it."""
    fmt, unit = pretrained(real_layouts, tmp_path, layout)
    for path in unit.iterdir():
        if path.name != keep:
            path.unlink()
    assert isinstance(fmt, AutoFormat) and fmt.owner(unit) is None
    assert list(fmt.scan(unit.parent)) == []
    verdict = fmt.check(unit)
    assert not verdict.ready and verdict.unrecognised


@pytest.mark.parametrize(
    ("layout", "torn"), [("plain", "model.safetensors"), ("adapter", "adapter_model.safetensors"),
                         ("bin", "pytorch_model.bin"), ("adapter", "adapter_config.json")]
)  # fmt: skip
def test_save_pretrained_torn_file_is_not_ready(
    layout: str, torn: str, real_layouts: Path, tmp_path: Path
) -> None:
    """A weights file cut short (safetensors header vs size, zip end record) or a torn JSON
    config is a write still in flight."""
    fmt, unit = pretrained(real_layouts, tmp_path, layout)
    data = (unit / torn).read_bytes()
    (unit / torn).write_bytes(data[: len(data) - 7])
    verdict = fmt.check(unit)
    assert not verdict.ready and torn in verdict.reason


def test_save_pretrained_temp_file_blocks_it(real_layouts: Path, tmp_path: Path) -> None:
    """safetensors' in-flight `.tmpXXXXXX` inside the directory means not finished yet."""
    fmt, unit = pretrained(real_layouts, tmp_path, "plain")
    (unit / ".tmpQ1w2E3").write_bytes(b"half")
    verdict = fmt.check(unit)
    assert not verdict.ready and ".tmpQ1w2E3" in verdict.reason


def test_save_pretrained_inside_a_trainer_checkpoint_is_part_of_it(
    real_layouts: Path, tmp_path: Path
) -> None:
    """A save_pretrained() directory inside checkpoint-N/ is part of that checkpoint, never a
    unit of its own, and its missing shard keeps the whole checkpoint unfinished."""
    fmt, unit = written(tmp_path, "hf-trainer", fmt="auto")
    root = unit.parent
    shutil.copytree(real_layouts / "sharded", unit / "merged")
    assert list(fmt.scan(root)) == [unit]
    assert fmt.unit_for(root, unit / "merged" / "config.json") == unit
    assert isinstance(fmt, AutoFormat)
    owner = fmt.owner(unit)
    assert owner is not None and owner.name == "hf-trainer"
    verdict = fmt.check(unit)
    assert verdict.ready, verdict.reason
    assert {"merged/config.json", "merged/model.safetensors.index.json"} <= names(verdict)
    (unit / "merged" / "model-00002-of-00008.safetensors").unlink()
    verdict = fmt.check(unit)
    assert not verdict.ready and verdict.reason.startswith("hf-trainer: merged/: ")
    assert "model-00002-of-00008.safetensors" in verdict.reason


def test_hf_pretrained_never_claims_a_trainer_checkpoint(tmp_path: Path) -> None:
    """`format: hf-pretrained` leaves `checkpoint-N/` (and anything holding trainer_state.json)
    alone: published before trainer_state.json, a Trainer checkpoint would be incomplete."""
    root = tmp_path / "root"
    fmt = fmt_of(root, "hf-pretrained")
    spec("hf-trainer").run(root, STEP)
    renamed = root / "run-a"
    shutil.copytree(spec("hf-trainer").unit_path(root, STEP), renamed)
    assert list(fmt.scan(root)) == []
    assert fmt.unit_for(root, renamed / "config.json") is None


@pytest.mark.parametrize("layout", _PRETRAINED)
def test_garbage_in_save_pretrained_files_never_raises(
    layout: str, real_layouts: Path, tmp_path: Path
) -> None:
    """Whatever bytes a save_pretrained() directory's files hold (JSON that does not parse,
    an index without a weight_map or naming `../x`, a torn safetensors header), checking it
    returns a verdict instead of raising; a file that cannot be what its name says keeps
    the directory unfinished, named in the reason."""
    fmt, unit = pretrained(real_layouts, tmp_path, layout)
    for path in sorted(unit.iterdir()):
        original = path.read_bytes()
        for garbage in _GARBAGE:
            path.write_bytes(garbage)
            verdict = fmt.check(unit)
            fmt.info(unit)
            unusable = path.suffix == ".safetensors" or (
                path.suffix == ".json" and (not _parses(garbage) or "index" in path.name)
            )
            if unusable:
                assert not verdict.ready and path.name in verdict.reason, (path.name, garbage)
        path.write_bytes(original)
    assert fmt.check(unit).ready


def test_save_pretrained_step_comes_from_the_name(real_layouts: Path, tmp_path: Path) -> None:
    """A save_pretrained() directory has no trainer state: its name gives the step, if any."""
    fmt, unit = pretrained(real_layouts, tmp_path, "plain")
    assert fmt.info(unit).step is None
    stepped = unit.rename(unit.parent / "model-step-700")
    assert fmt.info(stepped).step == 700 and fmt.check(stepped).ready


# -- Lightning ------------------------------------------------------------------------------


def test_lightning_file_info_from_its_name(tmp_path: Path) -> None:
    """`epoch=1-step=100.ckpt` names its step, epoch and metrics."""
    fmt = fmt_of(tmp_path / "root", "lightning")
    path = tmp_path / "root" / "epoch=3-step=1200-val_loss=0.23.ckpt"
    path.write_bytes(torch_bytes({"epoch": 3}))
    assert fmt.unit_for(tmp_path / "root", path) == path
    info = fmt.info(path)
    assert (info.step, info.epoch, info.metrics) == (1200, 3, {"val_loss": 0.23})


def test_lightning_last_ckpt_info_from_the_checkpoint(tmp_path: Path) -> None:
    """`last.ckpt` names no step: the global_step stored inside it is read."""
    fmt = fmt_of(tmp_path / "root", "lightning")
    path = tmp_path / "root" / "last.ckpt"
    path.write_bytes(torch_bytes({"epoch": 4, "global_step": 5000, "state_dict": {}}))
    assert fmt.check(path).ready
    info = fmt.info(path)
    assert (info.step, info.epoch) == (5000, 4.0)


def test_lightning_sharded_needs_meta_pt_newer_than_shards(tmp_path: Path) -> None:
    """A sharded .ckpt/ is committed by meta.pt; a meta.pt older than a shard is stale."""
    fmt, unit = written(tmp_path, "lightning/sharded")
    verdict = fmt.check(unit)
    assert verdict.ready and verdict.committed
    assert fmt.info(unit).step == STEP
    shard = unit / "__0_0.distcp"
    later = (unit / "meta.pt").stat().st_mtime + 5
    os.utime(shard, (later, later))
    verdict = fmt.check(unit)
    assert not verdict.ready and "older than __0_0.distcp" in verdict.reason


# -- DeepSpeed ------------------------------------------------------------------------------


def test_deepspeed_latest_maps_to_its_tag(tmp_path: Path) -> None:
    """`latest` concerns the tag it names; zero_to_fp32.py concerns nothing."""
    fmt, unit = written(tmp_path, "deepspeed")
    root = unit.parent
    assert fmt.unit_for(root, root / "latest") == unit
    assert fmt.unit_for(root, root / "zero_to_fp32.py") is None
    assert fmt.unit_for(root, unit / "mp_rank_00_model_states.pt") == unit
    assert list(fmt.scan(root)) == [unit]


def test_deepspeed_shard_count_must_match_dp_world_size(tmp_path: Path) -> None:
    """Fewer optimizer shards than the recorded dp_world_size, or a gap, is not finished."""
    fmt, unit = written(tmp_path, "deepspeed", ranks=3)
    assert fmt.check(unit).ready
    (unit / "zero_pp_rank_2_mp_rank_00_optim_states.pt").unlink()
    assert "dp_world_size is 3" in fmt.check(unit).reason
    (unit / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    assert "dp rank 0" in fmt.check(unit).reason


def test_deepspeed_latest_must_name_this_or_a_later_tag(tmp_path: Path) -> None:
    """While `latest` still names an earlier tag the new one waits; a later tag, or no
    tracker at all, leaves it to structure and the settle window."""
    fmt, unit = written(tmp_path, "deepspeed")
    latest = unit.parent / "latest"
    latest.write_text("global_step50")
    assert "global_step50" in fmt.check(unit).reason
    latest.write_text("global_step150")
    assert fmt.check(unit).ready
    latest.write_text("")
    assert not fmt.check(unit).ready
    latest.unlink()
    verdict = fmt.check(unit)
    assert verdict.ready and not verdict.committed


def test_deepspeed_without_zero_needs_no_shards(tmp_path: Path) -> None:
    """Model states that hold the optimizer (no ZeRO) are complete without shards; ZeRO
    model states (optimizer None) without shards are not."""
    root = tmp_path / "root"
    fmt = fmt_of(root, "deepspeed")
    unit = root / "global_step7"
    unit.mkdir()
    states = unit / "mp_rank_00_model_states.pt"
    states.write_bytes(torch_bytes({"module": {}, "optimizer": {"state": {}}, "dp_world_size": 4}))
    assert fmt.check(unit).ready
    states.write_bytes(torch_bytes({"module": {}, "optimizer": None, "dp_world_size": 4}))
    assert "no ZeRO optimizer shards" in fmt.check(unit).reason


# -- torch DCP ------------------------------------------------------------------------------


def test_dcp_committed_by_metadata(tmp_path: Path) -> None:
    """A DCP directory with its `.metadata` is committed; without it, never ready."""
    fmt, unit = written(tmp_path, "torch-dcp")
    verdict = fmt.check(unit)
    assert verdict.ready and verdict.committed and names(verdict) == spec("torch-dcp").files(STEP)
    (unit / ".metadata").unlink()
    assert "no .metadata" in fmt.check(unit).reason


def test_dcp_refuses_stale_or_in_flight_metadata(tmp_path: Path) -> None:
    """An old `.metadata` beside a newer shard, or a `.metadata.tmp`, is not a commit."""
    fmt, unit = written(tmp_path, "torch-dcp")
    later = (unit / ".metadata").stat().st_mtime + 5
    os.utime(unit / "__1_0.distcp", (later, later))
    assert "older than __1_0.distcp" in fmt.check(unit).reason
    os.utime(unit / ".metadata", (later, later))
    assert fmt.check(unit).ready
    (unit / ".metadata.tmp").write_bytes(b"x")
    assert not fmt.check(unit).ready


def test_dcp_tolerates_a_second_of_clock_skew(tmp_path: Path) -> None:
    """A shard stamped under a second after `.metadata` (another node's clock) still counts
    as committed; one stamped seconds later does not."""
    fmt, unit = written(tmp_path, "torch-dcp")
    base = (unit / ".metadata").stat().st_mtime
    os.utime(unit / "__0_0.distcp", (base + 0.5, base + 0.5))
    assert fmt.check(unit).ready
    os.utime(unit / "__0_0.distcp", (base + 3, base + 3))
    assert not fmt.check(unit).ready


def test_dcp_metadata_naming_a_missing_shard(tmp_path: Path) -> None:
    """Every shard `.metadata` names must exist (a rotation deleting files mid-way)."""
    fmt, unit = written(tmp_path, "torch-dcp")
    (unit / "__1_0.distcp").unlink()
    verdict = fmt.check(unit)
    assert not verdict.ready and "__1_0.distcp" in verdict.reason


def test_dcp_any_rank_shard_names_the_unit(tmp_path: Path) -> None:
    """The first shard of any rank makes its directory a candidate."""
    root = tmp_path / "root"
    fmt = fmt_of(root, "torch-dcp")
    (root / "step_5").mkdir()
    (root / "step_5" / "__3_0.distcp").write_bytes(b"")
    assert fmt.unit_for(root, root / "step_5" / "__3_0.distcp") == root / "step_5"
    assert fmt.unit_for(root, root / "notes") is None


# -- Orbax ----------------------------------------------------------------------------------


def test_orbax_temp_directory_is_never_a_unit(tmp_path: Path) -> None:
    """`<step>.orbax-checkpoint-tmp/` is neither hinted nor scanned as a checkpoint."""
    root = tmp_path / "root"
    fmt = fmt_of(root, "orbax")
    tmp = root / "100.orbax-checkpoint-tmp"
    tmp.mkdir()
    (tmp / "_CHECKPOINT_METADATA").write_text("{}")
    (tmp / "commit_success.txt").write_text("ok")
    assert fmt.unit_for(root, tmp / "commit_success.txt") is None
    assert list(fmt.scan(root)) == []


def test_orbax_commit_and_legacy_rules(tmp_path: Path) -> None:
    """commit_success.txt commits; without it a commit timestamp (older Orbax) is ready for
    the settle window, and no timestamp is not ready."""
    fmt, unit = written(tmp_path, "orbax")
    verdict = fmt.check(unit)
    assert verdict.ready and verdict.committed
    (unit / "commit_success.txt").unlink()
    verdict = fmt.check(unit)
    assert verdict.ready and not verdict.committed
    meta = json.loads((unit / "_CHECKPOINT_METADATA").read_text())
    meta["commit_timestamp_nsecs"] = None
    (unit / "_CHECKPOINT_METADATA").write_text(json.dumps(meta))
    assert "commit_success.txt" in fmt.check(unit).reason


def test_orbax_empty_commit_file_is_a_commit_in_progress(tmp_path: Path) -> None:
    """An empty commit_success.txt (created, not yet written, in place) commits nothing."""
    fmt, unit = written(tmp_path, "orbax")
    (unit / "commit_success.txt").write_bytes(b"")
    verdict = fmt.check(unit)
    assert not verdict.ready and "still being written" in verdict.reason


def test_orbax_missing_item_directory(tmp_path: Path) -> None:
    """An item listed in _CHECKPOINT_METADATA without files of its own is not finished."""
    fmt, unit = written(tmp_path, "orbax")
    shutil.rmtree(unit / "state")
    verdict = fmt.check(unit)
    assert not verdict.ready and "state" in verdict.reason


def test_orbax_info_from_metrics(tmp_path: Path) -> None:
    """The step is the name; metrics come from metrics/metrics, else _CHECKPOINT_METADATA."""
    fmt, unit = written(tmp_path, "orbax")
    info = fmt.info(unit)
    assert info.step == STEP and info.metrics["eval_loss"] == pytest.approx(1.1667, abs=1e-4)
    (unit / "metrics" / "metrics").write_text("{torn")
    info = fmt.info(unit)
    assert info.metrics["eval_loss"] == pytest.approx(1.1667, abs=1e-4)
    assert info.source == str(unit / "_CHECKPOINT_METADATA")
    (unit / "_CHECKPOINT_METADATA").write_text("[]")
    assert fmt.info(unit).metrics == {}


# -- Megatron -------------------------------------------------------------------------------


def test_megatron_tracker_maps_to_its_iteration(tmp_path: Path) -> None:
    """The tracker concerns the iteration it names (or release/)."""
    fmt, unit = written(tmp_path, "megatron")
    root = unit.parent
    tracker = root / "latest_checkpointed_iteration.txt"
    assert fmt.unit_for(root, tracker) == unit
    tracker.write_text("release")
    assert fmt.unit_for(root, tracker) == root / "release"
    tracker.write_text("")
    assert fmt.unit_for(root, tracker) is None


def test_megatron_tracker_must_reach_the_iteration(tmp_path: Path) -> None:
    """An iteration is finished when the tracker names it or a later one, never before."""
    fmt, unit = written(tmp_path, "megatron")
    tracker = unit.parent / "latest_checkpointed_iteration.txt"
    tracker.write_text("50")
    assert "iteration 50" in fmt.check(unit).reason
    tracker.write_text("150")
    assert fmt.check(unit).ready
    tracker.unlink()
    assert not fmt.check(unit).ready


@pytest.mark.parametrize("how", ["own", "auto"])
@pytest.mark.parametrize(
    ("spec_id", "tracker"),
    [("megatron", "latest_checkpointed_iteration.txt"), ("deepspeed", "latest")],
)
def test_trackers_are_signals_not_files(
    spec_id: str, tracker: str, how: str, tmp_path: Path
) -> None:
    """A tracker outside the unit is reported as a signal (restarting the settle window) and
    never as a file to publish."""
    fmt, unit = written(tmp_path, spec_id, None if how == "own" else "auto")
    verdict = fmt.check(unit)
    assert [s.name for s in verdict.signals] == [tracker]
    assert verdict.signals[0].ino == (unit.parent / tracker).stat().st_ino
    assert tracker not in names(verdict)
    (unit.parent / tracker).unlink()
    assert fmt.check(unit).signals == ()


def test_megatron_legacy_layout(tmp_path: Path) -> None:
    """The legacy format (mp_rank_XX/model_optim_rng.pt, no metadata.json) is recognised."""
    root = tmp_path / "root"
    fmt = fmt_of(root, "megatron")
    unit = root / "iter_0000020"
    (unit / "mp_rank_00").mkdir(parents=True)
    (root / "latest_checkpointed_iteration.txt").write_text("20")
    assert not fmt.check(unit).ready
    (unit / "mp_rank_00" / "model_optim_rng.pt").write_bytes(torch_bytes({"iteration": 20}))
    verdict = fmt.check(unit)
    assert verdict.ready and not verdict.committed
    assert fmt.info(unit).step == 20


# -- NeMo -----------------------------------------------------------------------------------


def test_nemo_marker_blocks_and_its_removal_names_the_unit(tmp_path: Path) -> None:
    """While `<name>-unfinished` exists the directory waits; the marker maps to the unit."""
    fmt, unit = written(tmp_path, "nemo")
    marker = unit.with_name(unit.name + "-unfinished")
    assert fmt.unit_for(unit.parent, marker) == unit
    verdict = fmt.check(unit)
    assert verdict.ready and verdict.committed
    marker.touch()
    assert "-unfinished" in fmt.check(unit).reason
    assert list(fmt.scan(unit.parent)) == [unit]


def test_nemo_empty_directory_is_not_ready(tmp_path: Path) -> None:
    """A directory without content is never a finished NeMo checkpoint."""
    root = tmp_path / "root"
    fmt = fmt_of(root, "nemo")
    (root / "model--step=5").mkdir()
    (root / "model--step=5-unfinished").touch()
    (root / "model--step=5-unfinished").unlink()
    assert fmt.check(root / "model--step=5").reason == "empty directory"


def test_nemo_info_from_the_name(tmp_path: Path) -> None:
    """`megatron_gpt--val_loss=1.17-step=100-...` gives the step and val_loss."""
    fmt, unit = written(tmp_path, "nemo")
    info = fmt.info(unit)
    assert info.step == STEP and info.metrics["val_loss"] == 1.17


def test_nemo_tar_file_is_a_unit(tmp_path: Path) -> None:
    """A `.nemo` tar file is a unit of its own, ready once its end-of-archive is written."""
    root = tmp_path / "root"
    fmt = fmt_of(root, "nemo")
    path = root / "model.nemo"
    with tarfile.open(path, "w:") as tar:
        tar.addfile(tarfile.TarInfo("model_config.yaml"), io.BytesIO(b""))
    assert fmt.unit_for(root, path) == path and list(fmt.scan(root)) == [path]
    assert fmt.check(path).ready
    path.write_bytes(path.read_bytes()[:512])
    assert not fmt.check(path).ready


# -- Keras ----------------------------------------------------------------------------------


def test_keras_torn_zip_is_not_ready(tmp_path: Path) -> None:
    """A `.keras` zip without its end record is torn."""
    fmt, unit = written(tmp_path, "keras")
    assert fmt.check(unit).ready
    unit.write_bytes(unit.read_bytes()[:-30])
    assert not fmt.check(unit).ready


def test_keras_sharded_weights_are_one_unit(tmp_path: Path) -> None:
    """`<base>_0000k.weights.h5` shards belong to `<base>.weights.json`, ready when the map
    parses and every shard it names is complete."""
    root = tmp_path / "root"
    fmt = fmt_of(root, "keras")
    shards = [root / f"model_{k:05d}.weights.h5" for k in range(2)]
    for shard in shards:
        shard.write_bytes(hdf5_bytes(1024, 1024))
    unit = root / "model.weights.json"
    assert {fmt.unit_for(root, s) for s in shards} == {unit}
    assert "not yet" in fmt.check(unit).reason
    weight_map = {"weight_map": {"/vars/0": shards[0].name, "/vars/1": shards[1].name}}
    unit.write_text(json.dumps(weight_map))
    verdict = fmt.check(unit)
    assert verdict.ready and names(verdict) == {unit.name, *(s.name for s in shards)}
    assert list(fmt.scan(root)) == [unit]
    shards[1].write_bytes(hdf5_bytes(1024, 512))
    assert "model_00001.weights.h5" in fmt.check(unit).reason


def test_keras_epoch_numbered_weights_file_is_its_own_unit(tmp_path: Path) -> None:
    """`model_00003.weights.h5` without a shard zero or a map is a single-file checkpoint."""
    root = tmp_path / "root"
    fmt = fmt_of(root, "keras")
    path = root / "model_00003.weights.h5"
    path.write_bytes(hdf5_bytes(1024, 1024))
    assert fmt.unit_for(root, path) == path
    assert fmt.check(path).ready and fmt.info(path).step == 3


# -- TensorFlow -----------------------------------------------------------------------------


def test_tensorflow_paths_map_to_their_prefix(tmp_path: Path) -> None:
    """Index, data shards, the `_temp` dir and the state file all concern the prefix;
    the state file's temp name concerns nothing."""
    fmt, unit = written(tmp_path, "tensorflow")
    root = unit.parent
    for name in ("ckpt-100.index", "ckpt-100.data-00001-of-00002", "ckpt-100_temp", "checkpoint"):
        assert fmt.unit_for(root, root / name) == unit, name
    assert fmt.unit_for(root, root / "checkpoint.tmp1234") is None
    assert fmt.unit_for(root, root / "ckpt-100_temp" / "part-00000-of-00002.index") is None
    assert list(fmt.scan(root)) == [unit]
    assert named_prefixes(root) == ["ckpt-100"]


def test_tensorflow_files_are_named_relative_to_the_root(tmp_path: Path) -> None:
    """The prefix's files are named as they sit in the root, and nothing else is."""
    fmt, unit = written(tmp_path, "tensorflow")
    verdict = fmt.check(unit)
    assert verdict.ready and verdict.committed
    assert names(verdict) == spec("tensorflow").files(STEP)
    assert fmt.info(unit).step == STEP


def test_tensorflow_needs_every_shard_and_the_state_file(tmp_path: Path) -> None:
    """A missing data shard, a torn index or a state file not naming it keeps it waiting."""
    fmt, unit = written(tmp_path, "tensorflow")
    root = unit.parent
    state = (root / "checkpoint").read_text()
    (root / "checkpoint").write_text(state.replace("ckpt-100", "ckpt-99"))
    assert "does not name ckpt-100" in fmt.check(unit).reason
    (root / "checkpoint").write_text(state)
    index = root / "ckpt-100.index"
    index.write_bytes(index.read_bytes()[:-8])
    assert "footer" in fmt.check(unit).reason
    (root / "ckpt-100.data-00001-of-00002").unlink()
    assert "ckpt-100.data-00001-of-00002 missing" in fmt.check(unit).reason


# -- auto -----------------------------------------------------------------------------------


_EVERY = [
    "hf-trainer", "deepspeed", "megatron", "lightning", "lightning/sharded", "torch-dcp",
    "orbax", "nemo", "tensorflow", "keras", "file",
]  # fmt: skip


@pytest.mark.parametrize("spec_id", _EVERY)
def test_auto_hands_each_layout_to_its_format(spec_id: str, tmp_path: Path) -> None:
    """auto recognises each layout by name and content and judges it by that format."""
    fmt, unit = written(tmp_path, spec_id, "auto")
    assert isinstance(fmt, AutoFormat)
    owner = fmt.owner(unit)
    assert owner is not None and owner.name == spec(spec_id).format
    assert names(fmt.check(unit)) == spec(spec_id).files(STEP)
    assert fmt.info(unit).step == STEP


def test_auto_scan_finds_every_layout_in_one_root(tmp_path: Path) -> None:
    """One root holding every layout scans to exactly their units; unknown directories,
    temp names and trackers are not candidates."""
    root = tmp_path / "root"
    fmt = fmt_of(root, "auto")
    expected = set()
    for step, spec_id in enumerate(_EVERY, start=1):
        spec(spec_id).run(root, step)
        expected.add(spec(spec_id).unit_path(root, step))
    (root / "runs" / "events").mkdir(parents=True)
    (root / "runs" / "events" / "log.txt").write_text("x")
    (root / "7.orbax-checkpoint-tmp").mkdir()
    (root / "tmp-checkpoint-9").mkdir()
    (root / "tmp-checkpoint-9" / "trainer_state.json").write_text("{}")
    (root / "crashed-unfinished").touch()
    (root / "notes.txt").write_text("x")
    assert set(fmt.scan(root)) == expected
    assert fmt.unit_for(root, root / "runs" / "events" / "log.txt") is None
    assert fmt.unit_for(root, root / "7.orbax-checkpoint-tmp" / "x") is None
    assert fmt.unit_for(root, root / "tmp-checkpoint-9" / "trainer_state.json") is None
    hf = spec("hf-trainer").unit_path(root, 1)
    assert fmt.unit_for(root, hf / "optimizer.pt") == hf


def test_auto_recursive_files_skip_directory_checkpoints(tmp_path: Path) -> None:
    """With `recursive: true` files inside a recognised checkpoint directory belong to it."""
    root = tmp_path / "root"
    root.mkdir()
    watch = WatchConfig.model_validate({"path": root, "format": "auto", "recursive": True})
    fmt = format_for(watch)
    spec("hf-trainer").run(root, STEP)
    (root / "sub").mkdir()
    (root / "sub" / "model.pt").write_bytes(torch_bytes({"w": 1}))
    assert set(fmt.scan(root)) == {root / "checkpoint-100", root / "sub" / "model.pt"}
    checkpoint = root / "checkpoint-100"
    assert fmt.unit_for(root, checkpoint / "optimizer.pt") == checkpoint


def test_auto_unrecognised_directory_is_not_ready(tmp_path: Path) -> None:
    """A directory that lost what made it recognisable is reported, not guessed at."""
    root = tmp_path / "root"
    fmt = fmt_of(root, "auto")
    (root / "misc").mkdir()
    (root / "misc" / "a.txt").write_text("x")
    verdict = fmt.check(root / "misc")
    assert not verdict.ready and "recognises" in verdict.reason


def test_plain_zip_file_is_still_a_file_unit(tmp_path: Path) -> None:
    """Under auto a root-level torch.save file is a file checkpoint as before."""
    root = tmp_path / "root"
    fmt = fmt_of(root, "auto")
    path = root / "ckpt_7.pt"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("data.pkl", b"x")
    path.write_bytes(buf.getvalue())
    assert fmt.unit_for(root, path) == path
    assert fmt.check(path).ready and fmt.info(path).step == 7


# -- bad input ------------------------------------------------------------------------------

_GARBAGE = [
    b"",
    b"{",
    b'{"weight_map": {"a": "../x"}, "global_step": [], "log_history": [{"eval_x": "y"}]}',
    b"\x10\0\0\0\0\0\0\0" + b'{"t": {"data_offsets": [0, "9"]}}' + b" " * 16,
    b"PK\x03\x04" + b"\0" * 40 + b"PK\x05\x06" + b"\0" * 18,
    b"\x89HDF\r\n\x1a\n\x00",
    bytes(range(256)) * 3,
]


@pytest.mark.parametrize("how", ["own", "auto"])
@pytest.mark.parametrize("spec_id", [*_EVERY, "keras/best", "orbax/commit-file"])
def test_garbage_in_any_file_never_raises(spec_id: str, how: str, tmp_path: Path) -> None:
    """Whatever bytes a checkpoint's files or trackers hold, checking and reading it returns
    a verdict and an info instead of raising."""
    writer = spec(spec_id)
    fmt, unit = written(tmp_path, spec_id, None if how == "own" else "auto")
    base = unit if writer.kind == "dir" else unit.parent
    paths = [base / name for name in writer.files(STEP)]
    paths += [unit.parent / name for name in writer.outside(STEP)]
    for path in paths:
        original = path.read_bytes()
        for garbage in _GARBAGE:
            path.write_bytes(garbage)
            assert isinstance(fmt.check(unit), Verdict)
            fmt.info(unit)
            fmt.unit_for(unit.parent, path)
        path.write_bytes(original)
    assert fmt.check(unit).ready


def test_the_config_names_every_format_of_the_registry_and_no_other() -> None:
    """`watch[].format` accepts exactly `auto` and the formats ckptd can detect."""
    from typing import get_args

    from ckptd.config import Format
    from ckptd.formats.auto import FORMATS

    assert set(get_args(Format)) == {"auto", *FORMATS}
