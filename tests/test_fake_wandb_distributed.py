"""The loopback W&B server's distributed artifacts, driven by the real SDK: every participant
upserts its part into the one version of a distributed id, the finisher commits the merge."""

from __future__ import annotations

from pathlib import Path

from tests.support.fake_wandb import FakeWandbServer
from tests.test_fake_wandb_server import md5_hex, run_sdk, server

__all__ = ["server"]  # the fixture, re-used

PARTS = """
def upsert(rank, distributed_id, step):
    run = start_run()
    path = ROOT / f"shard{rank}.bin"
    path.write_bytes(os.urandom(2000 + rank))
    artifact = wandb.Artifact("ckpt", type="model", metadata={"step": step, f"rank{rank}": 1})
    artifact.add_file(str(path), name=f"rank{rank}/shard.bin")
    part = run.upsert_artifact(artifact, distributed_id=distributed_id)
    part.wait(timeout=45)  # this participant's files and patch have landed
    return run, part.state

def finish(run, distributed_id, aliases):
    artifact = wandb.Artifact("ckpt", type="model")
    done = run.finish_artifact(artifact, distributed_id=distributed_id, aliases=aliases)
    done.wait(timeout=45)
    return done
"""


def test_parts_from_three_runs_commit_as_one_version(
    server: FakeWandbServer, tmp_path: Path
) -> None:
    """Three runs upsert into distributed id `step-5` (each a PENDING part), the first run
    finishes: one COMMITTED version whose manifest holds all three parts, with the aliases
    given at finish and metadata from every part."""
    result = run_sdk(
        tmp_path,
        PARTS
        + """
runs, states = zip(*(upsert(rank, "step-5", 5) for rank in range(3)))
done = finish(runs[0], "step-5", ["best"])
for run in runs:
    run.finish()
emit(states=list(states), version=done.version, state=done.state)
""",
    )
    assert result == {"states": ["PENDING"] * 3, "version": "v0", "state": "COMMITTED"}
    (version,) = server.versions("ckpt", project="ckpt-tests")
    assert version.state == "COMMITTED" and version.aliases == {"best", "latest"}
    assert set(version.manifest["contents"]) == {f"rank{r}/shard.bin" for r in range(3)}
    work = tmp_path / "work"
    for rank in range(3):
        assert version.file_md5(f"rank{rank}/shard.bin") == md5_hex(work / f"shard{rank}.bin")
    assert {version.metadata.get(f"rank{r}") for r in range(3)} == {1}


def test_a_part_that_never_arrived_is_missing_from_the_committed_version(
    server: FakeWandbServer, tmp_path: Path
) -> None:
    """A finish before every part is in commits what arrived, as W&B would store it, and a
    part upserted after the commit adds nothing: the version stays as committed."""
    run_sdk(
        tmp_path,
        PARTS
        + """
first, _ = upsert(0, "step-6", 6)
finish(first, "step-6", [])
late, state = upsert(1, "step-6", 6)
for run in (first, late):
    run.finish()
emit(late=state)
""",
    )
    (version,) = server.versions("ckpt", project="ckpt-tests")
    assert set(version.manifest["contents"]) == {"rank0/shard.bin"}
    assert server.created_versions == 1


def test_each_distributed_id_is_its_own_version_in_order(
    server: FakeWandbServer, tmp_path: Path
) -> None:
    """Two steps' distributed ids become two versions; `latest` ends on the one committed
    last, and identical content in a new distributed id is not deduplicated away."""
    run_sdk(
        tmp_path,
        PARTS
        + """
a, _ = upsert(0, "step-1", 1)
finish(a, "step-1", [])
b, _ = upsert(0, "step-2", 2)
finish(b, "step-2", [])
for run in (a, b):
    run.finish()
emit(ok=True)
""",
    )
    versions = server.versions("ckpt", project="ckpt-tests")
    assert [(v.version, v.metadata["step"]) for v in versions] == [("v0", 1), ("v1", 2)]
    assert server.alias_holder("ckpt", "latest", project="ckpt-tests") == "v1"


def test_public_api_records_a_runs_config_and_lists_a_groups_runs(
    server: FakeWandbServer, tmp_path: Path
) -> None:
    """The rendezvous the multi-host publisher relies on: `Run.create` + `Run.update()` store
    a run's config, group and job type; `api.runs(path, filters={"group": ...})` lists only
    that group's runs with their config, fresh after `api.flush()`."""
    result = run_sdk(
        tmp_path,
        """
from wandb.apis.public import Run
api = wandb.Api(timeout=30)
for rank, group in ((0, "job-1"), (1, "job-1"), (0, "job-2")):
    Run.create(api, run_id=f"{group}-r{rank}", project=PROJECT, entity=ENTITY)
    run = api.run(f"{ENTITY}/{PROJECT}/{group}-r{rank}")
    run.group, run.job_type = group, "ckptd-parts"
    run.config["ckptd_parts"] = {"rank": rank, "parts": {"5": {"files": {"a": 1}}}}
    run.update()
def listed():
    api.flush()
    runs = api.runs(f"{ENTITY}/{PROJECT}", filters={"group": "job-1", "jobType": "ckptd-parts"},
                    lazy=False)
    return sorted((r.id, r.config["ckptd_parts"]["rank"], r.group) for r in runs)
before = listed()
run = api.run(f"{ENTITY}/{PROJECT}/job-1-r1")
run.config["ckptd_parts"]["parts"]["6"] = {"files": {}}
run.update()
after = api.runs(f"{ENTITY}/{PROJECT}", filters={"group": "job-1"}, lazy=False)
api.flush()
fresh = api.runs(f"{ENTITY}/{PROJECT}", filters={"group": "job-1"}, lazy=False)
emit(before=before, steps=sorted(
    s for r in fresh for s in r.config["ckptd_parts"]["parts"] if r.id == "job-1-r1"))
""",
    )
    assert result == {
        "before": [["job-1-r0", 0, "job-1"], ["job-1-r1", 1, "job-1"]],
        "steps": ["5", "6"],
    }
    (record,) = [r for r in server.runs() if r.name == "job-2-r0"]
    assert record.group == "job-2" and record.job_type == "ckptd-parts"
    assert record.config["ckptd_parts"]["value"]["rank"] == 0
