"""Multi-host pieces without a server: where a host stands (launcher variables and config),
what one host's part of a DCP or DeepSpeed save is, how the hosts' metrics merge, and the
journal's `upserted` state."""

from __future__ import annotations

import os
import pickle
import random
import re
import sqlite3
import subprocess
from pathlib import Path

import pytest

from ckptd.checkpoint import CheckpointInfo, stat_files
from ckptd.config import WatchConfig, load_config
from ckptd.errors import ConfigError, JournalError
from ckptd.formats import format_for
from ckptd.journal import Journal, NewRow
from ckptd.journal.rows import SCHEMA_VERSION
from ckptd.multihost import merged_info, poll_interval
from ckptd.sinks.distributed import Part, Place
from ckptd.topology import detect
from tests.conftest import CKPTD
from tests.support.multihost import write_part


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"SLURM_JOB_ID": "77", "SLURM_NODEID": "2", "SLURM_NNODES": "4"},
            ("slurm-77", 4, 2, "SLURM_NODEID=2"),
        ),
        (
            {"TORCHELASTIC_RUN_ID": "abc", "GROUP_RANK": "1", "WORLD_SIZE": "16",
             "LOCAL_WORLD_SIZE": "8"},
            ("torchrun-abc", 2, 1, "GROUP_RANK=1"),
        ),
        ({"PET_NNODES": "3", "PET_NODE_RANK": "0"}, (None, 3, 0, "PET_NODE_RANK=0")),
        ({"JOBSET_NAME": "train", "JOB_COMPLETION_INDEX": "5"}, ("jobset-train", None, 5,
                                                                  "JOB_COMPLETION_INDEX=5")),
        (
            {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "8", "PMIX_NAMESPACE": "j1"},
            ("mpi-j1", 8, 3, "OMPI_COMM_WORLD_RANK=3"),
        ),
        ({"PMI_RANK": "1", "PMI_SIZE": "2"}, (None, 2, 1, "PMI_RANK=1")),
        ({"HOME": "/root"}, (None, None, None, None)),
    ],
)  # fmt: skip
def test_each_launcher_tells_group_hosts_and_rank(
    env: dict[str, str], expected: tuple[str | None, int | None, int | None, str | None]
) -> None:
    """SLURM, torchrun, PyTorchJob, JobSet/Indexed Jobs and MPI each give what they know,
    named by the variable it came from."""
    found = detect(env)
    group, hosts, rank, rank_source = expected
    assert (found.group, found.hosts, found.rank) == (group, hosts, rank)
    assert found.sources.get("rank") == rank_source


def test_slurm_is_asked_before_torchrun_and_the_config_wins(tmp_path: Path) -> None:
    """Under SLURM with torchrun inside, SLURM's node id is the rank; a value in the config
    (interpolated from any variable) wins over what is detected."""
    env = {"SLURM_JOB_ID": "9", "SLURM_NODEID": "1", "SLURM_NNODES": "2", "GROUP_RANK": "0",
           "TORCHELASTIC_RUN_ID": "x", "MY_RANK": "0"}  # fmt: skip
    assert detect(env).rank == 1
    path = tmp_path / "ckptd.yaml"
    path.write_text(
        "wandb: {mode: online}\nwatch:\n  - path: ck\n    distributed: {}\n"
        "  - path: ck2\n    artifact: other\n    distributed: {rank: '${MY_RANK}', group: g}\n"
    )
    first, second = load_config(path, env=env).watch
    assert first.distributed is not None and second.distributed is not None
    assert (first.distributed.group, first.distributed.hosts, first.distributed.rank) == (
        "slurm-9", 2, 1,
    )  # fmt: skip
    assert (second.distributed.group, second.distributed.rank) == ("g", 0)
    assert first.distributed.timeout == 1800 and first.distributed.finisher == 0


@pytest.mark.parametrize(
    ("entry", "mode", "message"),
    [
        ("{hosts: 2, rank: 0, group: g}", "offline",
         "watch[0].distributed: needs wandb.mode: online"),
        ("{hosts: 2, group: g}", "online",
         "watch[0].distributed: rank not given and not found in the environment"),
        ("{hosts: 2, rank: 2, group: g}", "online", "rank 2 is not below hosts (2)"),
        ("{hosts: 2, rank: 0, group: g, finisher: 3}", "online",
         "finisher 3 is not below hosts (2)"),
        ("{hosts: 2, rank: 0, group: g, timeout: 0s}", "online",
         "watch[0].distributed.timeout: must be more than 0s"),
        ("{hosts: 2, rank: 0, group: g, ranks: 1}", "online",
         "watch[0].distributed.ranks: unknown key (did you mean 'rank'?)"),
        ("{hosts: 2, rank: 0, group: g}\n    reference: file", "online",
         "watch[0].distributed: cannot be combined with reference"),
    ],
)  # fmt: skip
def test_bad_distributed_config_names_the_key(
    tmp_path: Path, entry: str, mode: str, message: str
) -> None:
    """Offline mode, a rank found nowhere, ranks out of range, a zero timeout and typos are
    config errors naming `watch[0].distributed...`."""
    path = tmp_path / "ckptd.yaml"
    path.write_text(f"wandb: {{mode: {mode}}}\nwatch:\n  - path: ck\n    distributed: {entry}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert any(message in problem for problem in info.value.problems), info.value.problems


def test_metrics_any_host_gave_are_merged_own_first_then_by_rank() -> None:
    """The finisher plans aliases from its own metrics, then each metric, the epoch and the
    aliases that only other hosts' parts carry (the lowest rank first)."""
    own = CheckpointInfo(step=5, metrics={"loss": 1.0})
    parts = {
        2: Part(2, {"b": 1}, {"val_loss": 0.9, "acc": 0.5}, 3.0, ("candidate",)),
        1: Part(1, {"a": 1}, {"val_loss": 0.2, "loss": 7.0}, None, ()),
    }
    merged = merged_info(own, parts)
    assert merged.metrics == {"loss": 1.0, "val_loss": 0.2, "acc": 0.5}
    assert merged.epoch == 3.0 and merged.aliases == ("candidate",) and merged.step == 5
    assert Part.from_json(2, parts[2].to_json()) == parts[2]


def test_every_host_derives_the_same_distributed_id_alone() -> None:
    """The id names group, collection and step only: any rank computes the same one."""
    ids = {Place("slurm-7", 3, rank, 0, 12).distributed_id("model") for rank in range(3)}
    assert ids == {"ckptd/slurm-7/model/step-12"}
    assert Place("slurm-8", 3, 0, 0, 12).distributed_id("model") not in ids


def _watch(root: Path, fmt: str, rank: int) -> WatchConfig:
    return WatchConfig.model_validate(
        {"path": root, "format": fmt,
         "distributed": {"group": "g", "hosts": 3, "rank": rank}},
    )  # fmt: skip


@pytest.mark.parametrize("layout", ["dcp", "ds"])
@pytest.mark.parametrize("host", [0, 1, 2])
def test_a_hosts_part_is_whole_without_the_other_hosts_files(
    tmp_path: Path, layout: str, host: int
) -> None:
    """Each host's own shards are a whole part: never waiting for the ranks on other hosts
    (the full-save rules would say a shard is missing forever). Only the coordinator's host
    has a commit marker (`.metadata`); elsewhere the settle window decides."""
    root = tmp_path / str(host)
    files = write_part(root, layout, host, 3, 5, 0.1, random.Random(host))
    fmt = format_for(_watch(root, "torch-dcp" if layout == "dcp" else "deepspeed", host))
    unit = files[0].parent
    assert list(fmt.scan(root)) == [unit]
    verdict = fmt.check(unit)
    assert verdict.ready, verdict.reason
    assert {f.name for f in verdict.files} == {p.name for p in files}
    assert verdict.committed == (layout == "dcp" and host == 0)
    assert verdict.conclusive == (layout == "dcp" and host == 0)  # inotify may not end settle
    whole = format_for(
        WatchConfig.model_validate({"path": root, "format": fmt.name})
    ).check(unit)  # fmt: skip
    assert not whole.ready  # the same files are not a whole single-host save


def test_a_part_with_a_save_in_flight_or_no_shard_is_not_ready(tmp_path: Path) -> None:
    """A DCP part is not ready while `.metadata.tmp` exists, nor before any shard landed;
    a DeepSpeed part not before a rank file landed."""
    unit = tmp_path / "step_3"
    unit.mkdir()
    fmt = format_for(_watch(tmp_path, "torch-dcp", 1))
    (unit / "notes.txt").write_text("x")
    assert "no .distcp shards" in fmt.check(unit).reason
    (unit / "__2_0.distcp").write_bytes(os.urandom(100))
    (unit / ".metadata.tmp").write_bytes(pickle.dumps({}))
    assert not fmt.check(unit).ready
    tag = tmp_path / "ds" / "global_step3"
    tag.mkdir(parents=True)
    (tag / "zero_to_fp32.py").write_text("")
    ds = format_for(_watch(tmp_path / "ds", "deepspeed", 2))
    assert "no model or optimizer states" in ds.check(tag).reason


def test_poll_interval_follows_the_timeout_within_bounds() -> None:
    """Waiting hosts read the rendezvous every timeout/20, between 0.5 s and 5 s."""
    watch = _watch(Path("/x"), "torch-dcp", 0)
    assert watch.distributed is not None
    assert poll_interval(watch.distributed) == 5.0
    short = watch.distributed.model_copy(update={"timeout": 4.0})
    assert poll_interval(short) == 0.5


def test_journal_schema_3_adds_the_upserted_state_and_part_time(tmp_path: Path) -> None:
    """A schema-2 journal upgrades to 3; a row goes hashed -> upserted (with when its part
    landed) -> published, and `upserted` may also end failed, never go back to hashed."""
    state = tmp_path / "state"
    state.mkdir()
    Journal(state).open().close()
    db = sqlite3.connect(state / "journal.sqlite3")
    db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    db.execute("ALTER TABLE checkpoints DROP COLUMN part_at")
    db.commit()
    db.close()
    assert SCHEMA_VERSION >= 3  # and every later migration runs on top of it
    with Journal(state) as journal:
        ids = [
            journal.add(
                NewRow(
                    collection="m", watch_path=tmp_path, relpath=f"step_{s}", fingerprint="f",
                    format="torch-dcp", step=s, files=(), info=CheckpointInfo(step=s),
                    snapshot=None,
                ),
                1.0,
            )
            for s in (1, 2)
        ]  # fmt: skip
        first, second = (i for i in ids if i is not None)
        for row_id in (first, second):
            journal.mark_hashed(row_id, 2.0, md5s={}, digest="d")
            journal.mark_upserted(row_id, 3.0)
        assert journal.get(first).part_at == 3.0
        with pytest.raises(JournalError, match="cannot go from upserted to hashed"):
            journal.mark_hashed(second, 3.5, md5s={}, digest="d")
        journal.mark_published(first, 4.0, version="v0", aliases=(), best={})
        journal.fail(second, 5.0, "partial: step 2")
        assert [r.state for r in journal.rows()] == ["published", "failed"]


def test_the_readme_multi_node_config_passes_check_on_a_slurm_node(tmp_path: Path) -> None:
    """The README's multi-node config is accepted by `ckptd check` on a SLURM node, which
    names the node's place in the job and the variables that told it; without any launcher
    variable it is a config error naming the keys to set."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (block,) = [
        b for b in re.findall(r"```yaml\n(.*?)```", readme, re.DOTALL) if "distributed" in b
    ]
    config = tmp_path / "ckptd.yaml"
    config.write_text(block)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "PMI", "OMPI"))}
    slurm = {**env, "SLURM_JOB_ID": "4242", "SLURM_NODEID": "1", "SLURM_NNODES": "3"}
    checked = subprocess.run([*CKPTD, "check", "--config", str(config)], env=slurm,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    assert "group 'slurm-4242', rank 1 of 3 hosts (rank 0 commits each version)" in checked.stdout
    assert "rank from SLURM_NODEID=1" in checked.stdout
    bare = subprocess.run([*CKPTD, "check", "--config", str(config)], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bare.returncode == 2
    assert "watch[0].distributed: group, hosts and rank not given" in bare.stderr


def test_only_the_finisher_runs_remote_retention_and_local_files_wait_for_the_commit(
    tmp_path: Path,
) -> None:
    """On a host that is not the finisher, retention never lists or deletes versions (the
    finisher does), and deletes a step's local files only once its version is committed
    (`aliased`), never while its part waits in `upserted`."""
    from ckptd.retention.run import Retention
    from ckptd.sinks.wandb import WandbSink

    path = tmp_path / "ckptd.yaml"
    path.write_text(
        "state_dir: state\nwandb: {mode: online, base_url: 'http://127.0.0.1:9'}\n"
        "watch:\n  - path: ck\n    format: torch-dcp\n"
        "    distributed: {group: g, hosts: 2, rank: 1}\n"
        "    retention: {remote: {keep_last: 1}, local: {delete_after_upload: true, "
        "keep_last: 0}}\n"
    )
    config = load_config(path, env={})
    watch = config.watch[0]
    steps = {}
    for step in (1, 2, 3):
        unit = watch.path / f"step_{step}"
        unit.mkdir(parents=True)
        (unit / "__1_0.distcp").write_bytes(os.urandom(100))
        steps[step] = unit
    with Journal(config.state_dir) as journal:
        for step, unit in steps.items():
            files = stat_files(unit)
            new = NewRow(
                collection=watch.artifact, watch_path=watch.path, relpath=unit.name,
                fingerprint="f", format="torch-dcp", step=step, files=files,
                info=CheckpointInfo(step=step), snapshot=None,
            )  # fmt: skip
            row_id = journal.add(new, 1.0)
            assert row_id is not None
            journal.mark_hashed(row_id, 2.0, md5s={}, digest=f"d{step}")
            journal.mark_upserted(row_id, 3.0)
            if step < 3:  # committed by the finisher; step 3 still waits for it
                journal.mark_published(row_id, 4.0, version=f"v{step}", aliases=(), best={})
                journal.mark_aliased(row_id, 5.0)
        plan = Retention(config, journal, WandbSink(config)).run(watch, 10.0)
    assert "the finisher (rank 0) runs remote retention" in " ".join(plan.notes)
    assert [(d.where, d.step) for d in plan.deletions] == [("local", 1)]
    assert not steps[1].exists() and steps[2].exists() and steps[3].exists()  # 2: latest
    (waiting,) = [d for d in plan.decisions if d.step == 3]
    assert waiting.reason == "not published yet (upserted)"


def test_directory_records_are_each_hosts_file_and_read_as_one_rendezvous(
    tmp_path: Path,
) -> None:
    """With `distributed.rendezvous`, each host replaces its own JSON file atomically; the
    rendezvous of a step reads every host's part, and the finisher's commit or give-up only
    from the finisher's file; another collection's or group's records are not mixed in."""
    from ckptd.sinks.distributed import DirectoryRecords, read_rendezvous

    records = DirectoryRecords(tmp_path / "shared")
    place = {rank: Place("job", 3, rank, 0, 5) for rank in range(3)}
    for rank in (0, 1):
        data = records.load("model", place[rank])
        assert data == {}
        data.update(
            collection="model", rank=rank, parts={"5": Part(rank, {f"f{rank}": 1}).to_json()}
        )
        records.store("model", place[rank], data)
    seen = read_rendezvous(records.all("model", place[0]), "model", place[0])
    assert sorted(seen.parts) == [0, 1] and seen.committed is None and seen.abandoned is None
    late = records.load("model", place[1])
    late.update(committed={"5": "v9"})  # not the finisher: ignored
    records.store("model", place[1], late)
    first = records.load("model", place[0])
    first.update(abandoned={"5": [2]})
    records.store("model", place[0], first)
    seen = read_rendezvous(records.all("model", place[1]), "model", place[1])
    assert seen.committed is None and seen.abandoned == (2,)
    assert records.all("other", place[0]) == []
    assert records.all("model", Place("job-2", 3, 0, 0, 5)) == []
    assert not list((tmp_path / "shared").rglob("*.tmp"))


def test_a_part_with_a_file_still_open_for_writing_waits_past_the_settle_window(
    tmp_path: Path,
) -> None:
    """A host's DCP part without `.metadata` is whole by the settle window and, where
    inotify and the kernel can tell, only once no rank still holds one of its files open
    for writing (a rank pausing mid-save longer than `settle`)."""
    from ckptd.detect import Detector

    root = tmp_path / "ck"
    unit = root / "step_4"
    unit.mkdir(parents=True)
    watch = WatchConfig.model_validate(
        {"path": root, "format": "torch-dcp", "settle": 2, "sidecar": {"wait": 0},
         "distributed": {"group": "g", "hosts": 2, "rank": 1}},
    )  # fmt: skip
    detector = Detector(watch, tmp_path / "staging", close_evidence=True)
    (tmp_path / "staging").mkdir()
    (unit / "__2_0.distcp").write_bytes(os.urandom(1000))
    slow = (unit / "__3_0.distcp").open("wb")  # rank 3 has written some and paused
    slow.write(os.urandom(1000))
    slow.flush()
    t0 = os.stat(unit / "__3_0.distcp").st_mtime + 1000
    try:
        detector.scan(t0)
        assert detector.poll(t0) == []
        assert detector.poll(t0 + 10) == []  # settled, but still open for writing
        assert detector.pending()[unit] == "one of this host's files is still open for writing"
    finally:
        slow.close()
    (ready,) = detector.poll(t0 + 11)
    assert {f.name for f in ready.files} == {"__2_0.distcp", "__3_0.distcp"}
