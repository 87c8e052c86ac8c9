"""Where this host stands in a multi-node job, read from the launcher's environment.

A multi-node job runs one ckptd per node. Each needs three facts to take part in a
distributed version: the job's `group` (the same on every node, new for each job), how many
`hosts` contribute, and its own `rank` among them. `watch[].distributed` may give each one
(`${SLURM_NODEID}` works as everywhere in the config); what it leaves out is read here from
the variables that the common launchers set. `ckptd check` prints what was found and where.

Launchers, in the order they are asked (the first that knows a fact gives it):
- SLURM: SLURM_JOB_ID, SLURM_NODEID, SLURM_NNODES (or SLURM_JOB_NUM_NODES).
- torchrun / torchelastic: TORCHELASTIC_RUN_ID, GROUP_RANK (or NODE_RANK), and
  WORLD_SIZE / LOCAL_WORLD_SIZE as the number of nodes.
- Kubeflow PyTorchJob: PET_NNODES, PET_NODE_RANK (the operator sets them in every pod).
- Kubernetes JobSet and Indexed Jobs: JOB_COMPLETION_INDEX as the rank, JOBSET_NAME as the
  group; the node count is not in the environment (give `hosts`).
- MPI with one ckptd per node (`mpirun --map-by ppr:1:node`): OMPI_COMM_WORLD_RANK and
  OMPI_COMM_WORLD_SIZE (Open MPI), PMI_RANK and PMI_SIZE (MPICH, Intel MPI); PMIX_NAMESPACE
  as the group.

No I/O beyond the mapping it is given; pure functions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

__all__ = ["Detected", "detect"]


@dataclass(frozen=True)
class Detected:
    """What the environment says about this host: each fact and the variable it came from."""

    group: str | None = None
    hosts: int | None = None
    rank: int | None = None
    sources: Mapping[str, str] = field(default_factory=dict)  # fact -> "SLURM_NODEID=2"

    def describe(self) -> str:
        """One line: `rank from SLURM_NODEID=2, hosts from SLURM_NNODES=3, ...`."""
        found = [f"{fact} from {where}" for fact, where in self.sources.items()]
        return ", ".join(found) if found else "nothing (no launcher variables set)"


def _int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "").strip()
    return int(value) if value.isdigit() else None


def _text(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name, "").strip()
    return value or None


def _slurm(env: Mapping[str, str]) -> dict[str, tuple[object, str]]:
    found: dict[str, tuple[object, str]] = {}
    if (job := _text(env, "SLURM_JOB_ID")) is not None:
        found["group"] = (f"slurm-{job}", f"SLURM_JOB_ID={job}")
    if (rank := _int(env, "SLURM_NODEID")) is not None:
        found["rank"] = (rank, f"SLURM_NODEID={rank}")
    for name in ("SLURM_NNODES", "SLURM_JOB_NUM_NODES"):
        if (hosts := _int(env, name)) is not None:
            found["hosts"] = (hosts, f"{name}={hosts}")
            break
    return found


def _torchrun(env: Mapping[str, str]) -> dict[str, tuple[object, str]]:
    found: dict[str, tuple[object, str]] = {}
    if (run := _text(env, "TORCHELASTIC_RUN_ID")) is not None:
        found["group"] = (f"torchrun-{run}", f"TORCHELASTIC_RUN_ID={run}")
    for name in ("GROUP_RANK", "NODE_RANK"):
        if (rank := _int(env, name)) is not None:
            found["rank"] = (rank, f"{name}={rank}")
            break
    world, local = _int(env, "WORLD_SIZE"), _int(env, "LOCAL_WORLD_SIZE")
    if world and local and world % local == 0:
        found["hosts"] = (world // local, f"WORLD_SIZE={world} / LOCAL_WORLD_SIZE={local}")
    return found


def _pytorchjob(env: Mapping[str, str]) -> dict[str, tuple[object, str]]:
    found: dict[str, tuple[object, str]] = {}
    if (rank := _int(env, "PET_NODE_RANK")) is not None:
        found["rank"] = (rank, f"PET_NODE_RANK={rank}")
    nodes = _text(env, "PET_NNODES")  # "4", or "2:4" for an elastic range
    if nodes is not None and nodes.isdigit():
        found["hosts"] = (int(nodes), f"PET_NNODES={nodes}")
    return found


def _indexed_job(env: Mapping[str, str]) -> dict[str, tuple[object, str]]:
    found: dict[str, tuple[object, str]] = {}
    if (name := _text(env, "JOBSET_NAME")) is not None:
        found["group"] = (f"jobset-{name}", f"JOBSET_NAME={name}")
    if (index := _int(env, "JOB_COMPLETION_INDEX")) is not None:
        found["rank"] = (index, f"JOB_COMPLETION_INDEX={index}")
    return found


def _mpi(env: Mapping[str, str]) -> dict[str, tuple[object, str]]:
    found: dict[str, tuple[object, str]] = {}
    if (space := _text(env, "PMIX_NAMESPACE")) is not None:
        found["group"] = (f"mpi-{space}", f"PMIX_NAMESPACE={space}")
    for rank_name, size_name in (
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
        ("PMI_RANK", "PMI_SIZE"),
    ):
        rank, size = _int(env, rank_name), _int(env, size_name)
        if rank is not None and size is not None:
            found["rank"] = (rank, f"{rank_name}={rank}")
            found["hosts"] = (size, f"{size_name}={size}")
            break
    return found


_LAUNCHERS: tuple[Callable[[Mapping[str, str]], dict[str, tuple[object, str]]], ...] = (
    _slurm, _torchrun, _pytorchjob, _indexed_job, _mpi,
)  # fmt: skip


def detect(env: Mapping[str, str]) -> Detected:
    """This host's group, host count and rank as far as `env` tells them."""
    facts: dict[str, tuple[object, str]] = {}
    for launcher in _LAUNCHERS:
        for fact, found in launcher(env).items():
            facts.setdefault(fact, found)
    group = facts.get("group", (None, ""))[0]
    hosts = facts.get("hosts", (None, ""))[0]
    rank = facts.get("rank", (None, ""))[0]
    return Detected(
        group=group if isinstance(group, str) else None,
        hosts=hosts if isinstance(hosts, int) else None,
        rank=rank if isinstance(rank, int) else None,
        sources={fact: where for fact, (_, where) in facts.items()},
    )
