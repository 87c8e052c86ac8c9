"""Multi-host: one torch DCP step of H hosts x K shards x S MiB, published as one version.

Two ways to publish the same bytes to the loopback server:
1. "shared directory": one ckptd watching one directory that holds all H*K shards and
   `.metadata` (what works without `distributed`: a filesystem every node writes to);
2. "multi-host": H ckptd daemons, one per host directory holding its K shards (`.metadata`
   with rank 0's), each with `distributed: {hosts: H, rank: r}`: every daemon upserts its
   part, the finisher commits once every part is recorded.
Here the H "hosts" share this machine's cores and disk, so the figure shows the protocol's
cost (a rendezvous, a settle window on the hosts without `.metadata`, H wandb-cores on the
same cores), not the gain of H machines hashing and uploading at once. Each run is timed from
the first rename of a finished checkpoint into a watched directory to the version's
`CommitArtifact`; every daemon publishes a small warm-up step first, so none pays for starting
its W&B runs. The contenders take turns, `--repeat` times (order reversed every round).

    python -m bench.multihost [--hosts 3] [--shards 4] [--size-mib 256] [--repeat 1]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import shutil
import sys
import time
from pathlib import Path

from bench import _common as c

SETTLE = "1s"  # both contenders: hosts without `.metadata` are judged by the settle window


def write_step(parent: Path, step: int, ranks: range, all_ranks: int, size: int) -> Path:
    """`tmp-step_N/` (a temp name: no candidate) with the shards of `ranks`, and `.metadata`
    naming every rank's shard if rank 0 is among them."""
    path = parent / f"tmp-step_{step}"
    for rank in ranks:
        c.write_payload(path / f"__{rank}_0.distcp", size, seed=100_000 * step + rank)
    if 0 in ranks:
        names = [f"__{r}_0.distcp" for r in range(all_ranks)]
        (path / ".metadata").write_bytes(pickle.dumps({"storage": names}, protocol=4))
    return path


def publish(path: Path) -> None:
    path.rename(path.with_name(path.name.removeprefix("tmp-")))


def shared_directory(
    server: c.FakeWandbServer, tmp: Path, args: argparse.Namespace, round_: int
) -> float:
    """Seconds from the rename to the commit, one ckptd on one directory of every shard."""
    name = f"shared-{round_}"
    root = tmp / name / "ck"
    root.mkdir(parents=True)
    total = args.hosts * args.shards
    env = c.wandb_env(tmp / name / "wandb", server)
    watch = c.watch_entry(root, name, format="torch-dcp", settle=SETTLE)
    with c.Ckptd(tmp / name, [watch], env):
        publish(write_step(root, 0, range(total), total, 4096))
        c.wait_until("the warm-up version", lambda: c.committed(server, name) == 1, 120)
        staged = write_step(root, 1, range(total), total, args.size_mib * c.MiB)
        os.sync()
        t0 = time.time()
        publish(staged)
        c.wait_until("the version", lambda: c.committed(server, name) == 2, 1800)
        seconds = max(c.op_times(server, "CommitArtifact", since=t0)) - t0
    shutil.rmtree(tmp / name, ignore_errors=True)
    return seconds


def multi_host(
    server: c.FakeWandbServer, tmp: Path, args: argparse.Namespace, round_: int
) -> float:
    """Seconds from the first rename to the commit, H daemons each with its own part."""
    name = f"multi-{round_}"
    total = args.hosts * args.shards
    roots = [tmp / name / f"host{h}" / "ck" for h in range(args.hosts)]
    with contextlib.ExitStack() as stack:
        for host, root in enumerate(roots):
            root.mkdir(parents=True)
            env = c.wandb_env(tmp / name / f"wandb{host}", server)
            distributed = {"group": name, "hosts": args.hosts, "rank": host, "timeout": "30m"}
            watch = c.watch_entry(
                root, name, format="torch-dcp", settle=SETTLE, distributed=distributed
            )
            stack.enter_context(c.Ckptd(tmp / name / f"daemon{host}", [watch], env))

        def ranks(host: int) -> range:
            return range(host * args.shards, (host + 1) * args.shards)

        for host, root in enumerate(roots):
            publish(write_step(root, 0, ranks(host), total, 4096))
        c.wait_until("the warm-up version", lambda: c.committed(server, name) == 1, 180)
        staged = [
            write_step(root, 1, ranks(host), total, args.size_mib * c.MiB)
            for host, root in enumerate(roots)
        ]
        os.sync()
        t0 = time.time()
        for path in staged:
            publish(path)
        c.wait_until("the version", lambda: c.committed(server, name) == 2, 1800)
        seconds = max(c.op_times(server, "CommitArtifact", since=t0)) - t0
    shutil.rmtree(tmp / name, ignore_errors=True)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--shards", type=int, default=4, help="shards per host")
    parser.add_argument("--size-mib", type=int, default=256, help="MiB per shard")
    parser.add_argument("--repeat", type=int, default=1)
    c.add_common_args(parser)
    args = parser.parse_args(argv)
    c.print_preamble("multi-host publishing", ["bench.multihost", *(argv or sys.argv[1:])])
    nbytes = args.hosts * args.shards * args.size_mib * c.MiB
    shared: list[float] = []
    multi: list[float] = []
    with (
        c.scratch(args.tmp, "multihost", args.keep) as tmp,
        c.bench_server(tmp / "server") as server,
    ):
        for round_ in range(args.repeat):
            order = [shared_directory, multi_host]
            for contender in order if round_ % 2 == 0 else order[::-1]:
                seconds = contender(server, tmp, args, round_)
                (shared if contender is shared_directory else multi).append(seconds)
                rate = nbytes / 1e6 / seconds
                print(f"round {round_}: {contender.__name__}: {nbytes / 1e6:,.0f} MB in "
                      f"{seconds:.2f}s = {rate:,.0f} MB/s", flush=True)  # fmt: skip
    best_shared, best_multi = min(shared), min(multi)
    label = f"{args.hosts} hosts x {args.shards} shards x {args.size_mib} MiB"
    c.print_table(
        [
            c.Row(
                f"multi-host, {label} (DCP) on one machine: {args.hosts} daemons with "
                "`distributed` / one ckptd on a shared directory, best of "
                f"{args.repeat}",
                f"{nbytes / 1e6 / best_multi:,.0f} MB/s ({best_multi:.1f} s)",
                f"{nbytes / 1e6 / best_shared:,.0f} MB/s ({best_shared:.1f} s)",
                (nbytes / best_multi) / (nbytes / best_shared),
                "report",
                None,
            )
        ]
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
