"""Quick checks that the checkpoint-writer corpus in ``tests.support.writers`` is faithful.

Final states must be structurally valid, intermediate states must not be, and the write
orders the framework report describes (markers last, trackers early, temp-then-rename) must
be what the generators actually do.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import writers as w
from tests.support.writers import ALL_SPECS, WRITERS, WriterSpec, WriterStep

EXPECTED_FORMATS = {
    "file",
    "lightning",
    "hf-trainer",
    "deepspeed",
    "torch-dcp",
    "orbax",
    "megatron",
    "nemo",
    "keras",
    "tensorflow",
}
STEP = 100


def _spec(spec_id: str) -> WriterSpec:
    """Look a spec up by its pytest id (``format`` or ``format/variant``)."""
    return next(s for s in ALL_SPECS if s.id == spec_id)


def _walk(
    spec: WriterSpec, root: Path, step: int = STEP, **kwargs: Any
) -> Iterator[tuple[WriterStep, Path]]:
    """Drive a writer, yielding each step together with the unit's absolute path."""
    unit = spec.unit_path(root, step, **kwargs)
    for state in spec.steps(root, step, **kwargs):
        yield state, unit


def _first_state(
    spec: WriterSpec, root: Path, predicate: Callable[[WriterStep], bool], **kwargs: Any
) -> WriterStep:
    """Advance a writer until ``predicate`` holds and leave it frozen there."""
    for state in spec.steps(root, STEP, **kwargs):
        if predicate(state):
            return state
    raise AssertionError("no step matched")


# ------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------


def test_registry_covers_every_format() -> None:
    """WRITERS has exactly the ckptd format names, each spec filed under its own format."""
    assert set(WRITERS) == EXPECTED_FORMATS
    assert set(w.FORMATS) == EXPECTED_FORMATS
    for name, spec in WRITERS.items():
        assert spec.format == name and spec.variant == "default"
        assert all(v.format == name for v in spec.variants.values())


def test_registry_variants_are_listed() -> None:
    """The variants the brief asks for exist and ALL_SPECS has unique ids."""
    ids = [s.id for s in ALL_SPECS]
    assert len(ids) == len(set(ids))
    assert {
        "file/rename",
        "lightning/sharded",
        "hf-trainer/late-rng",
        "orbax/commit-file",
        "keras/best",
    } <= set(ids)


# ------------------------------------------------------------------------------------------
# Properties of every writer
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.id)
def test_only_the_last_step_is_finished(spec: WriterSpec, tmp_path: Path) -> None:
    """Exactly one step is marked finished, and it is the last one."""
    steps = spec.run(tmp_path / "root", STEP)
    assert len(steps) >= 3
    assert [s.finished for s in steps] == [False] * (len(steps) - 1) + [True]


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.id)
def test_final_state_is_valid_and_matches_files(spec: WriterSpec, tmp_path: Path) -> None:
    """After the last step the unit exists, holds exactly spec.files, and passes the oracle."""
    root = tmp_path / "root"
    spec.run(root, STEP)
    unit = spec.unit_path(root, STEP)
    files = spec.files(STEP)
    if spec.kind == "dir":
        assert unit.is_dir()
        assert {p.relative_to(unit).as_posix() for p in unit.rglob("*") if p.is_file()} == files
    elif spec.kind == "file":
        assert unit.is_file() and files == {unit.name}
    else:
        assert all((root / name).is_file() for name in files)
        assert all(name.startswith(unit.name + ".") for name in files)
    assert all((root / name).exists() for name in spec.outside(STEP))
    assert w.validate_unit(spec, root, STEP) == []


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.id)
def test_every_intermediate_state_is_invalid(spec: WriterSpec, tmp_path: Path) -> None:
    """At every unfinished step the oracle finds a problem; at the finished step none."""
    root = tmp_path / "root"
    for state, _unit in _walk(spec, root):
        problems = w.validate_unit(spec, root, STEP)
        assert bool(problems) != state.finished, (state.description, problems)


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.id)
def test_no_temp_files_or_markers_left(spec: WriterSpec, tmp_path: Path) -> None:
    """A finished writer leaves no temp names, _temp dirs or -unfinished markers in root."""
    root = tmp_path / "root"
    spec.run(root, STEP)
    leftovers = [
        p.name
        for p in root.rglob("*")
        if ".tmp" in p.name
        or p.name.startswith("tmp")
        or p.name.endswith(("_temp", "-unfinished", ".orbax-checkpoint-tmp"))
    ]
    assert leftovers == []


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.id)
def test_step_paths_are_relative_to_root(spec: WriterSpec, tmp_path: Path) -> None:
    """Every step names the path it touched; a root-relative path exists unless it was removed."""
    root = tmp_path / "root"
    for state, _unit in _walk(spec, root):
        assert state.path and state.description
        if not Path(state.path).is_absolute():
            assert (root / state.path).exists() or state.description.endswith("removed")


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.id)
def test_writers_are_repeatable_for_several_steps(spec: WriterSpec, tmp_path: Path) -> None:
    """Two saves at different steps into one root both end valid (as training would do)."""
    root = tmp_path / "root"
    spec.run(root, 100)
    spec.run(root, 200)
    assert w.validate_unit(spec, root, 200) == []
    if spec.unit(100) != spec.unit(200) and spec.format not in {"deepspeed", "megatron"}:
        assert w.validate_unit(spec, root, 100) == []


# ------------------------------------------------------------------------------------------
# Torn files
# ------------------------------------------------------------------------------------------


def test_torn_torch_file_has_no_eocd(tmp_path: Path) -> None:
    """A half-written torch.save file lacks the zip EOCD; the finished one ends with it."""
    root = tmp_path / "root"
    gen = WRITERS["file"].steps(root, STEP)
    path = WRITERS["file"].unit_path(root, STEP)
    states = iter(gen)
    assert "empty" in next(states).description
    assert path.stat().st_size == 0
    assert "partially" in next(states).description
    problem = w.zip_problem(path)
    assert problem is not None and "end-of-central-directory" in problem
    assert next(states).finished
    data = path.read_bytes()
    assert data[-22:-18] == b"PK\x05\x06"
    assert w.zip_problem(path) is None


def test_torn_safetensors_is_shorter_than_its_header(tmp_path: Path) -> None:
    """A partially written shard fails the safetensors length check; finished shards pass."""
    spec = WRITERS["hf-trainer"]
    root = tmp_path / "root"
    state = _first_state(spec, root, lambda s: "safetensors partially" in s.description)
    problem = w.safetensors_problem(root / state.path)
    assert problem is not None


def test_safetensors_header_consistent_with_size(tmp_path: Path) -> None:
    """Each final shard's 8-byte header length + JSON header + max data end equals its size."""
    root = tmp_path / "root"
    WRITERS["hf-trainer"].run(root, STEP, shards=3, size=10_000)
    unit = root / f"checkpoint-{STEP}"
    shards = sorted(unit.glob("model-*-of-00003.safetensors"))
    assert len(shards) == 3
    for shard in shards:
        data = shard.read_bytes()
        (header_len,) = struct.unpack_from("<Q", data)
        header = json.loads(data[8 : 8 + header_len])
        assert header["__metadata__"] == {"format": "pt"}
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        assert 8 + header_len + max(ends) == len(data)
        assert w.safetensors_problem(shard) is None


def test_hf_index_names_all_shards(tmp_path: Path) -> None:
    """model.safetensors.index.json maps tensors onto exactly the shard files, with total_size."""
    root = tmp_path / "root"
    WRITERS["hf-trainer"].run(root, STEP, shards=4)
    unit = root / f"checkpoint-{STEP}"
    index = json.loads((unit / "model.safetensors.index.json").read_text())
    shards = {p.name for p in unit.glob("*.safetensors")}
    assert set(index["weight_map"].values()) == shards
    assert shards == {f"model-{k:05d}-of-00004.safetensors" for k in range(1, 5)}
    assert index["metadata"]["total_size"] > 0


def test_hf_single_shard_writes_model_safetensors(tmp_path: Path) -> None:
    """With one shard HF writes model.safetensors and no index, and the spec agrees."""
    spec = WRITERS["hf-trainer"]
    root = tmp_path / "root"
    spec.run(root, STEP, shards=1, ranks=1)
    files = spec.files(STEP, shards=1, ranks=1)
    assert "model.safetensors" in files and "model.safetensors.index.json" not in files
    assert "rng_state.pth" in files
    assert w.validate_unit(spec, root, STEP, shards=1, ranks=1) == []


def test_hf_trainer_state_content(tmp_path: Path) -> None:
    """trainer_state.json carries global_step, epoch, eval_loss history and the best fields."""
    root = tmp_path / "root"
    WRITERS["hf-trainer"].run(root, STEP)
    state = json.loads((root / f"checkpoint-{STEP}" / "trainer_state.json").read_text())
    metrics = w.default_metrics(STEP)
    assert state["global_step"] == STEP
    assert state["epoch"] == pytest.approx(STEP / w.STEPS_PER_EPOCH)
    evals = [e for e in state["log_history"] if "eval_loss" in e]
    assert evals[-1] == {**evals[-1], "eval_loss": metrics["eval_loss"], "step": STEP}
    assert state["best_metric"] == metrics["eval_loss"]
    assert state["best_model_checkpoint"] == str(root / f"checkpoint-{STEP}")


# ------------------------------------------------------------------------------------------
# Orders
# ------------------------------------------------------------------------------------------


def test_hf_late_rng_writes_trainer_state_before_last_rng(tmp_path: Path) -> None:
    """In the late-rng variant trainer_state.json exists while the last rank's rng is absent."""
    spec = _spec("hf-trainer/late-rng")
    root = tmp_path / "root"
    unit = root / f"checkpoint-{STEP}"
    state = _first_state(spec, root, lambda s: s.path.endswith("trainer_state.json"))
    assert not state.finished
    assert (unit / "rng_state_0.pth").exists()
    assert not (unit / "rng_state_2.pth").exists() and not (unit / "rng_state_1.pth").exists()
    assert w.validate_unit(spec, root, STEP) != []


def test_hf_default_writes_trainer_state_last(tmp_path: Path) -> None:
    """In the default HF order trainer_state.json is the finishing write."""
    steps = WRITERS["hf-trainer"].run(tmp_path / "root", STEP, ranks=3)
    assert steps[-1].path.endswith("trainer_state.json") and steps[-1].finished
    rng = [s.path for s in steps if "rng_state_" in s.path and s.description.endswith("written")]
    assert [Path(p).name for p in rng] == [f"rng_state_{r}.pth" for r in range(3)]


def test_deepspeed_latest_before_last_optimizer_shard(tmp_path: Path) -> None:
    """`latest` names the tag while the last DP rank's optimizer shard is still missing."""
    spec = WRITERS["deepspeed"]
    root = tmp_path / "root"
    _first_state(spec, root, lambda s: s.description.startswith("latest written"), ranks=4)
    assert (root / "latest").read_text() == f"global_step{STEP}"
    assert (root / "zero_to_fp32.py").stat().st_mode & 0o100
    unit = root / f"global_step{STEP}"
    assert len(list(unit.glob("*_optim_states.pt"))) == 3
    problems = w.validate_unit(spec, root, STEP, ranks=4)
    assert any("zero_pp_rank_3_mp_rank_00_optim_states.pt" in p for p in problems)


def test_dcp_metadata_only_arrives_by_rename(tmp_path: Path) -> None:
    """`.metadata` never exists before its rename step; `.metadata.tmp` precedes it."""
    spec = WRITERS["torch-dcp"]
    root = tmp_path / "root"
    saw_tmp = False
    for state, unit in _walk(spec, root):
        saw_tmp |= (unit / ".metadata.tmp").exists()
        assert (unit / ".metadata").exists() == state.finished
    assert saw_tmp


def test_dcp_overwrite_keeps_stale_metadata_until_rename(tmp_path: Path) -> None:
    """Re-saving into a fixed directory leaves the old .metadata while shards are rewritten."""
    spec = WRITERS["torch-dcp"]
    root = tmp_path / "root"
    spec.run(root, 1, name="last")
    unit = root / "last"
    old = unit / ".metadata"
    old_ns = old.stat().st_mtime_ns - 10_000_000_000
    for path in unit.iterdir():  # age the first save so mtime granularity cannot hide it
        os.utime(path, ns=(old_ns, old_ns))
    saw_stale = False
    states = spec.steps(root, 2, name="last")
    assert next(states).description == "last/ created"  # nothing rewritten yet: old save valid
    for state in states:
        if not state.finished:
            saw_stale |= old.exists() and old.stat().st_mtime_ns == old_ns
            assert w.validate_unit(spec, root, 2, name="last") != [], state.description
    assert saw_stale
    assert w.validate_unit(spec, root, 2, name="last") == []


def test_lightning_temp_lives_outside_root_then_renamed(tmp_path: Path) -> None:
    """Lightning writes into a sibling $TMPDIR and only the final rename touches root."""
    spec = WRITERS["lightning"]
    root = tmp_path / "root"
    for state, unit in _walk(spec, root):
        in_root = sorted(p.name for p in root.iterdir())
        assert in_root == ([unit.name] if state.finished else [])
    assert unit.name == f"epoch={STEP // w.STEPS_PER_EPOCH}-step={STEP}.ckpt"
    assert list((tmp_path / "root.TMPDIR").iterdir()) == []


def test_lightning_sharded_meta_pt_last(tmp_path: Path) -> None:
    """The sharded .ckpt directory gets meta.pt as its finishing write, after .metadata."""
    steps = _spec("lightning/sharded").run(tmp_path / "root", STEP)
    assert steps[-1].path.endswith("/meta.pt")
    assert steps[-2].path.endswith("/.metadata")


def test_orbax_final_name_only_after_rename(tmp_path: Path) -> None:
    """The `<step>/` directory appears only at the last step; commit_success.txt is inside."""
    spec = WRITERS["orbax"]
    root = tmp_path / "root"
    for state, unit in _walk(spec, root):
        assert unit.exists() == state.finished
    assert (unit / "commit_success.txt").is_file()
    first = spec.run(tmp_path / "again", STEP)[1]
    assert first.path.endswith("_CHECKPOINT_METADATA")
    meta = json.loads((unit / "_CHECKPOINT_METADATA").read_text())
    assert meta["commit_timestamp_nsecs"] is not None
    assert json.loads((unit / "metrics" / "metrics").read_text()) == w.default_metrics(STEP)


def test_orbax_commit_file_variant_writes_in_place(tmp_path: Path) -> None:
    """The GCS-style variant writes into `<step>/` directly with commit_success.txt last."""
    spec = _spec("orbax/commit-file")
    root = tmp_path / "root"
    for state, unit in _walk(spec, root):
        assert unit.is_dir()
        assert (unit / "commit_success.txt").exists() == state.finished


def test_megatron_tracker_before_tokenizer_assets(tmp_path: Path) -> None:
    """The tracker names the iteration before the tokenizer assets land in iter_NNNNNNN/."""
    spec = WRITERS["megatron"]
    root = tmp_path / "root"
    _first_state(spec, root, lambda s: s.description.startswith(w.MEGATRON_TRACKER + " written"))
    unit = root / f"iter_{STEP:07d}"
    assert (root / w.MEGATRON_TRACKER).read_text() == str(STEP)
    assert (unit / "metadata.json").is_file() and (unit / ".metadata").is_file()
    assert not (unit / "tokenizer").exists()


def test_nemo_marker_present_until_last_step(tmp_path: Path) -> None:
    """The sibling -unfinished marker exists in every state but the finished one."""
    spec = WRITERS["nemo"]
    root = tmp_path / "root"
    for state, unit in _walk(spec, root):
        marker = unit.with_name(unit.name + "-unfinished")
        assert marker.exists() != state.finished


def test_keras_zip_members(tmp_path: Path) -> None:
    """A .keras file is a complete zip with metadata.json, config.json and model.weights.h5."""
    root = tmp_path / "root"
    WRITERS["keras"].run(root, STEP)
    path = WRITERS["keras"].unit_path(root, STEP)
    assert w.zip_problem(path, members=("metadata.json", "config.json", "model.weights.h5")) is None


def test_keras_best_rewrite_truncates_old_file(tmp_path: Path) -> None:
    """Rewriting best.keras first truncates the previous best, then it is torn, then new."""
    spec = _spec("keras/best")
    root = tmp_path / "root"
    spec.run(root, 1)
    path = spec.unit_path(root, 1)
    old = path.read_bytes()
    states = spec.steps(root, 2)
    next(states)
    assert path.stat().st_size == 0
    next(states)
    assert w.zip_problem(path) is not None
    assert next(states).finished
    assert path.read_bytes() != old and w.zip_problem(path) is None


def test_tensorflow_state_file_names_prefix(tmp_path: Path) -> None:
    """`checkpoint` appears last, by rename, naming ckpt-N; _temp is gone; index has its magic."""
    spec = WRITERS["tensorflow"]
    root = tmp_path / "root"
    for state, _unit in _walk(spec, root):
        assert (root / "checkpoint").exists() == state.finished
    text = (root / "checkpoint").read_text()
    assert f'model_checkpoint_path: "ckpt-{STEP}"' in text
    assert not (root / f"ckpt-{STEP}_temp").exists()
    index = (root / f"ckpt-{STEP}.index").read_bytes()
    assert struct.unpack("<Q", index[-8:])[0] == w.TF_TABLE_MAGIC
    spec.run(root, 200)
    assert 'all_model_checkpoint_paths: "ckpt-100"' in (root / "checkpoint").read_text()


def test_file_rename_variant_uses_same_dir_temp(tmp_path: Path) -> None:
    """The rename variant writes a .tmpXXXXXX next to the target, which appears only at the end."""
    spec = _spec("file/rename")
    root = tmp_path / "root"
    for state, unit in _walk(spec, root):
        temps = [p.name for p in root.iterdir() if p.name.startswith(".tmp")]
        assert unit.exists() == state.finished
        assert len(temps) == (0 if state.finished else 1)
        assert all(len(t) == len(".tmp") + 6 for t in temps)


# ------------------------------------------------------------------------------------------
# Knobs, real libraries
# ------------------------------------------------------------------------------------------


def test_size_and_chunks_knobs(tmp_path: Path) -> None:
    """`size` scales large files and `chunks` sets how many torn states each one passes through."""
    root = tmp_path / "root"
    steps = WRITERS["file"].run(root, STEP, size=200_000, chunks=5)
    assert WRITERS["file"].unit_path(root, STEP).stat().st_size > 200_000
    assert sum("partially" in s.description for s in steps) == 4


def test_real_torch_load_and_safetensors_load(tmp_path: Path) -> None:
    """With torch/safetensors installed the files load with the real libraries."""
    torch = pytest.importorskip("torch")
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    assert w.USING_TORCH and w.USING_SAFETENSORS
    root = tmp_path / "root"
    WRITERS["hf-trainer"].run(root, STEP, size=1024)
    unit = root / f"checkpoint-{STEP}"
    optimizer = torch.load(unit / "optimizer.pt", weights_only=True)
    assert optimizer["state"][0]["exp_avg"].numel() == 1024
    tensors = safetensors_numpy.load_file(str(unit / "model-00001-of-00002.safetensors"))
    assert sum(t.nbytes for t in tensors.values()) == 1024


_FALLBACK_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    for blocked in ("torch", "safetensors", "safetensors.numpy"):
        sys.modules[blocked] = None  # makes `import torch` raise ImportError
    from tests.support import writers as w

    assert not w.USING_TORCH and not w.USING_SAFETENSORS
    root = Path(sys.argv[1])
    for spec in w.ALL_SPECS:
        for state in spec.steps(root / spec.id.replace("/", "_"), 100):
            problems = w.validate_unit(spec, root / spec.id.replace("/", "_"), 100)
            assert bool(problems) != state.finished, (spec.id, state.description, problems)
    """
)


def test_fallback_encoders_without_torch_or_safetensors(tmp_path: Path) -> None:
    """With torch and safetensors unimportable every writer still passes the oracle."""
    repo = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]),
    }
    subprocess.run(
        [sys.executable, "-c", _FALLBACK_SCRIPT, str(tmp_path)],
        check=True,
        cwd=repo,
        env=env,
        timeout=120,
    )
    shard = tmp_path / "hf-trainer" / f"checkpoint-{STEP}" / "model-00001-of-00002.safetensors"
    assert w.safetensors_problem(shard) is None
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    assert sum(t.nbytes for t in safetensors_numpy.load_file(str(shard)).values()) > 0


# ------------------------------------------------------------------------------------------
# rotate and write_sidecar
# ------------------------------------------------------------------------------------------


def _three_hf_checkpoints(root: Path) -> list[Path]:
    """Write checkpoint-100/200/300 with strictly increasing directory mtimes."""
    units = []
    for index, step in enumerate((100, 200, 300)):
        WRITERS["hf-trainer"].run(root, step, size=256)
        unit = root / f"checkpoint-{step}"
        ns = 1_700_000_000_000_000_000 + index * 1_000_000_000
        os.utime(unit, ns=(ns, ns))
        units.append(unit)
    return units


def test_rotate_deletes_oldest_units(tmp_path: Path) -> None:
    """rotate(keep=2) removes only the oldest checkpoint directory."""
    units = _three_hf_checkpoints(tmp_path)
    assert w.rotate(tmp_path, 2, "checkpoint-*") == [units[0]]
    assert [u.exists() for u in units] == [False, True, True]


def test_rotate_protects_best(tmp_path: Path) -> None:
    """A protected unit (best_model_checkpoint) survives and the next oldest goes instead."""
    units = _three_hf_checkpoints(tmp_path)
    assert w.rotate(tmp_path, 2, "checkpoint-*", protect=[units[0]]) == [units[1]]


def test_rotate_by_mtime_is_fooled_by_a_sidecar_in_the_unit(tmp_path: Path) -> None:
    """Writing a file into the oldest unit bumps its mtime, so HF-style rotation deletes another."""
    units = _three_hf_checkpoints(tmp_path)
    w.write_sidecar(units[0], 100, {"eval_loss": 1.0})
    assert w.rotate(tmp_path, 2, "checkpoint-*") == [units[1]]
    assert units[0].exists()


def test_rotate_by_name_orders_numerically(tmp_path: Path) -> None:
    """by="name" sorts checkpoint-9 before checkpoint-10 regardless of mtimes."""
    for step in (10, 9, 11):
        WRITERS["file"].run(tmp_path, step, size=64)
    deleted = w.rotate(tmp_path, 1, "model-*.pt", by="name")
    assert [p.name for p in deleted] == ["model-9.pt", "model-10.pt"]


def test_write_sidecar_file_and_directory(tmp_path: Path) -> None:
    """Sidecars are <unit>.metrics.json for files and metrics.json inside directories."""
    file_unit = tmp_path / "model.pt"
    file_unit.write_bytes(b"x")
    dir_unit = tmp_path / "checkpoint-5"
    dir_unit.mkdir()
    a = w.write_sidecar(file_unit, 5, {"eval_loss": 0.5})
    b = w.write_sidecar(dir_unit, 5, {"eval_loss": 0.5})
    assert a == tmp_path / "model.pt.metrics.json"
    assert b == dir_unit / "metrics.json"
    for path in (a, b):
        assert json.loads(path.read_text()) == {"step": 5, "metrics": {"eval_loss": 0.5}}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-5",
        "model.pt",
        "model.pt.metrics.json",
    ]
    assert [p.name for p in dir_unit.iterdir()] == ["metrics.json"]
