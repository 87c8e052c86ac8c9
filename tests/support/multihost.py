"""Multi-node checkpoints written to each host's own disk, for the multi-host tests.

Three "hosts" are three directories on one machine. Each writes only its own ranks' files,
in place as the frameworks do: torch DCP (`step_N/__R_0.distcp` per rank, `.metadata` on the
coordinator's host only, renamed in last) and DeepSpeed (`global_stepN/` with each rank's
ZeRO optimizer shard; model states and the `latest` tracker on rank 0's host only). One
host other than the finisher writes the step's metrics (`metrics.json` in the directory),
so the finisher must take them from the rendezvous.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import zipfile
from pathlib import Path

__all__ = ["LAYOUTS", "RANKS_PER_HOST", "md5_hex", "write_part"]

RANKS_PER_HOST = 2
LAYOUTS = ("dcp", "ds")
METRICS_HOST = {"dcp": 1, "ds": 2}  # which host's files carry the step's val_loss


def md5_hex(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _write(path: Path, data: bytes) -> None:
    """In place, as DCP and DeepSpeed write a shard: open, write, close."""
    with path.open("wb") as f:
        f.write(data)


def _zip(path: Path, payload: bytes, **fields: object) -> None:
    """A torch.save-like zip (ckptd checks the end record of `.pt` files)."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"payload": len(payload), **fields}))
        z.writestr("archive/data/0", payload)


def _metrics(directory: Path, step: int, loss: float) -> None:
    tmp = directory / ".metrics.json.tmp"
    tmp.write_text(json.dumps({"step": step, "metrics": {"val_loss": loss}}))
    os.replace(tmp, directory / "metrics.json")


def write_part(
    root: Path, layout: str, host: int, hosts: int, step: int, loss: float, rng: random.Random
) -> list[Path]:
    """Write host `host`'s part of `step` under `root` (its watch directory); return the
    files that belong in the published version."""
    ranks = range(host * RANKS_PER_HOST, (host + 1) * RANKS_PER_HOST)
    written: list[Path] = []
    if layout == "dcp":
        unit = root / f"step_{step}"
        unit.mkdir(parents=True, exist_ok=True)
        if host == METRICS_HOST[layout]:
            _metrics(unit, step, loss)
        for rank in ranks:
            shard = unit / f"__{rank}_0.distcp"
            _write(shard, rng.randbytes(rng.randint(20_000, 60_000)))
            written.append(shard)
        if host == 0:  # the coordinator's host commits the save with `.metadata`
            names = [f"__{r}_0.distcp" for r in range(hosts * RANKS_PER_HOST)]
            tmp = unit / ".metadata.tmp"
            tmp.write_bytes(pickle.dumps({"step": step, "storage": names}))
            os.replace(tmp, unit / ".metadata")
            written.append(unit / ".metadata")
        return written
    unit = root / f"global_step{step}"
    unit.mkdir(parents=True, exist_ok=True)
    if host == METRICS_HOST[layout]:
        _metrics(unit, step, loss)
    if host == 0:
        model = unit / "mp_rank_00_model_states.pt"
        # ZeRO: the optimizer lives in every rank's shard, across all hosts.
        payload = rng.randbytes(rng.randint(20_000, 40_000))
        _zip(model, payload, optimizer=None, dp_world_size=hosts * RANKS_PER_HOST)
        written.append(model)
    for rank in ranks:
        shard = unit / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        _zip(shard, rng.randbytes(rng.randint(20_000, 60_000)))
        written.append(shard)
    if host == 0:
        (root / "latest").write_text(unit.name)
    return written
