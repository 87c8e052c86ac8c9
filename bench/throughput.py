"""Throughput: N checkpoints of S MiB published to the loopback server, MB/s end to end.

For each layout (single files, and torch DCP directories of K shards) the same bytes are
1. hashed with hashlib on every core: the md5 limit (W&B needs the md5 of every byte);
2. published by the raw wandb SDK from one script (`policy="immutable", skip_cache=True`),
   waiting for each version before logging the next ("serial") and logging all, then
   waiting ("pipelined");
3. published by ckptd: renamed into place in its watched directory at once.
Each run is timed from its first byte of work (the SDK's first `add_file`, ckptd's first
rename) to the last `CommitArtifact` the server saw; each has a warm-up version first, so none
pays for starting its W&B run. The contenders take turns, `--repeat` times each (the order
reversed every round), with fresh bytes each round; the best round of each is compared, which
is the fair figure on a machine that other jobs share.

    python -m bench.throughput [--count 4] [--size-mib 512] [--shards 4] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench import _common as c
from tests.support.fake_wandb import FakeWandbServer


@dataclass
class Phase:
    """One timed publish of all the bytes, and who spent the CPU meanwhile."""

    name: str
    seconds: float
    nbytes: int
    cpu: dict[str, float]  # process name -> CPU seconds during the phase

    @property
    def mb_s(self) -> float:
        return self.nbytes / 1e6 / self.seconds

    def describe(self) -> str:
        cpu = ", ".join(f"{k} {v:.1f}s" for k, v in sorted(self.cpu.items()))
        return (
            f"{self.name}: {self.nbytes / 1e6:,.0f} MB in {self.seconds:.2f}s = "
            f"{self.mb_s:,.0f} MB/s; CPU seconds: {cpu}"
        )


# -- the checkpoints ---------------------------------------------------------------------


def write_checkpoint(parent: Path, layout: str, index: int, size: int, shards: int) -> Path:
    """Checkpoint `index` under a temp name, which no format takes for a candidate: a file,
    or a DCP directory of `shards` files and the `.metadata` that names them."""
    if layout == "single":
        path = parent / f".ckpt_{index}.pt.tmp"
        c.write_payload(path, size, seed=index)
        return path
    path = parent / f"tmp-step_{index}"
    names = [f"__{rank}_0.distcp" for rank in range(shards)]
    for rank, name in enumerate(names):
        c.write_payload(path / name, size // shards, seed=1000 * index + rank)
    (path / ".metadata").write_bytes(pickle.dumps({"storage": names}, protocol=4))
    return path


def final_name(staged: Path) -> Path:
    if staged.name.startswith("tmp-"):
        return staged.with_name(staged.name.removeprefix("tmp-"))
    return staged.with_name(staged.name.removeprefix(".").removesuffix(".tmp"))


def files_of(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def size_of(paths: list[Path]) -> int:
    return sum(f.stat().st_size for p in paths for f in files_of(p))


def reseed(paths: list[Path], round_: int) -> None:
    """New content for every file (bytes after its seed), so that no round deduplicates.
    A DCP `.metadata` is touched last: one older than its shards marks an unfinished save."""
    for path in paths:
        for f in files_of(path):
            if f.name != ".metadata":
                with f.open("r+b") as out:
                    out.seek(16)  # after the seed that write_payload put first
                    out.write(round_.to_bytes(4, "little"))
        if path.is_dir():
            (path / ".metadata").touch()


def move_all(paths: list[Path], parent: Path) -> list[Path]:
    parent.mkdir(parents=True, exist_ok=True)
    return [p.rename(parent / p.name) for p in paths]


# -- the three ways to spend the bytes ----------------------------------------------------


def md5_limit(paths: list[Path], rounds: int = 3) -> Phase:
    """The best of `rounds` md5 passes over every file with a process per core."""
    files = [f for p in paths for f in files_of(p)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    best = min(c.md5_seconds(files) for _ in range(rounds))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / rounds
    name = f"md5 limit (hashlib, {len(os.sched_getaffinity(0))} processes, best of {rounds})"
    return Phase(name, best, size_of(paths), {"hashlib workers (mean per pass)": cpu})


def raw_sdk(
    server: FakeWandbServer, paths: list[Path], tmp: Path, collection: str, pipelined: bool
) -> Phase:
    env = c.wandb_env(tmp / f"wandb-{collection}", server)
    command = c.child_command(
        "_sdk_upload", "--collection", collection, "--policy", "immutable", "--skip-cache",
        *(["--pipelined"] if pipelined else []), *map(str, paths),
    )  # fmt: skip
    proc = subprocess.Popen(command, env=env, cwd=c.REPO, stdout=subprocess.PIPE, text=True)
    tree = c.ProcTree(proc.pid).start()
    out, _ = proc.communicate(timeout=1800)
    tree.stop()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({proc.returncode}):\n{out}")
    t0 = json.loads(out.split("RESULT ", 1)[1])["t0"]
    t_end = max(c.op_times(server, "CommitArtifact", since=t0))
    cpu = _renamed(tree.cpu_between(t0, t_end), "sdk python")
    name = f"raw SDK, {'pipelined' if pipelined else 'serial'}"
    return Phase(name, t_end - t0, size_of(paths), cpu)


def with_ckptd(
    server: FakeWandbServer,
    staged: list[Path],
    tmp: Path,
    name: str,
    layout: str,
    workers: int,
    profile: Path | None = None,
) -> Phase:
    """Start ckptd on an empty directory, publish a warm-up version, then rename every
    staged checkpoint into place; `staged` must already be inside that directory."""
    root = staged[0].parent
    watch = c.watch_entry(root, name, format="file" if layout == "single" else "torch-dcp")
    env = c.wandb_env(tmp / f"wandb-{name}", server)
    raw = profile / f"throughput-{name}.raw" if profile else None
    # At the raw SDK's own priority: this measures the pipeline, not `upload.priority`'s
    # yielding to other work (bench.priority measures that).
    normal = {"priority": "normal"}
    with c.Ckptd(tmp / name, [watch], env, workers=workers, profile=raw, upload=normal) as daemon:
        tree = c.ProcTree(daemon.pid).start()
        warm = write_checkpoint(root, layout, 0, 4096, 1)
        warm.rename(final_name(warm))
        c.wait_until("the warm-up version", lambda: c.committed(server, name) == 1, 120)
        patience = 60 + size_of(staged) / 20e6  # seconds: 20 MB/s would be a failure
        t0 = time.time()
        for path in staged:
            path.rename(final_name(path))
        want = len(staged) + 1
        c.wait_until("every version", lambda: c.committed(server, name) == want, patience)
        t_end = max(c.op_times(server, "CommitArtifact", since=t0))
        time.sleep(2 * tree.interval)
        tree.stop()
        queued = [t for t, _ in daemon.events(r"finished checkpoint .* queued") if t >= t0]
    created = c.op_times(server, "CreateArtifact", since=t0)
    commits = c.op_times(server, "CommitArtifact", since=t0)
    timeline = "; ".join(
        "/".join(f"{t - t0:.2f}" for t in times)
        for times in zip(queued, created, commits, strict=False)
    )
    print(f"  ckptd timeline, s after the first rename (queued/upload start/commit): {timeline}")
    cpu = _renamed(tree.cpu_between(t0, t_end), "ckptd python")
    return Phase("ckptd", t_end - t0, size_of([final_name(p) for p in staged]), cpu)


def _renamed(cpu: dict[str, float], root: str) -> dict[str, float]:
    return {(root if name == "root" else name): seconds for name, seconds in cpu.items()}


# -- the benchmark -----------------------------------------------------------------------


def bench_layout(args: argparse.Namespace, layout: str, tmp: Path) -> list[c.Row]:
    size = args.size_mib * c.MiB
    shards = f" of {args.shards} shards" if layout == "sharded" else ""
    print(f"## {layout}: {args.count} checkpoints of {args.size_mib} MiB{shards}")
    data = tmp / f"data-{layout}"
    data.mkdir()
    staged = [
        write_checkpoint(data, layout, i, size, args.shards) for i in range(1, args.count + 1)
    ]
    os.sync()  # no write-back of these files during the timed phases
    results: dict[str, list[Phase]] = {"serial": [], "pipelined": [], "ckptd": []}
    with c.bench_server(tmp / f"server-{layout}", verify=args.server_md5) as server:
        md5 = md5_limit(staged)
        print(md5.describe())
        for round_ in range(1, args.repeat + 1):
            reseed(staged, round_)
            order = ["serial", "pipelined", "ckptd"]
            for contender in order if round_ % 2 else reversed(order):
                name = f"{contender}-{layout}-{round_}"
                if contender == "ckptd":
                    inside = move_all(staged, tmp / f"watched-{name}")
                    phase = with_ckptd(
                        server, inside, tmp, name, layout, args.workers, args.profile
                    )
                    for path, moved in zip(staged, inside, strict=True):
                        final_name(moved).rename(path)
                else:
                    phase = raw_sdk(server, staged, tmp, name, contender == "pipelined")
                results[contender].append(phase)
                print(f"round {round_}: {phase.describe()}")
    best = {k: max(v, key=lambda p: p.mb_s) for k, v in results.items()}
    daemon = best["ckptd"]
    sdk = max(best["serial"], best["pipelined"], key=lambda p: p.mb_s)
    server_share = daemon.cpu.get("server+harness", 0.0) / daemon.seconds
    label = f"throughput, {layout} {args.count}x{args.size_mib} MiB{shards}"
    if not args.server_md5:
        label += " (server does not hash)"
    return [
        c.Row(
            f"{label}: ckptd vs raw SDK ({sdk.name.removeprefix('raw SDK, ')}, the faster)",
            f"{daemon.mb_s:,.0f} MB/s",
            f"{sdk.mb_s:,.0f} MB/s (serial {best['serial'].mb_s:,.0f}, pipelined "
            f"{best['pipelined'].mb_s:,.0f})",
            daemon.mb_s / sdk.mb_s,
            ">= 0.9",
            daemon.mb_s / sdk.mb_s >= 0.9,
        ),
        c.Row(
            f"{label}: ckptd vs md5 limit",
            f"{daemon.mb_s:,.0f} MB/s",
            f"{md5.mb_s:,.0f} MB/s",
            daemon.mb_s / md5.mb_s,
            ">= 0.5 (within 2x)",
            daemon.mb_s / md5.mb_s >= 0.5,
        ),
        c.Row(
            f"{label}: loopback server CPU in ckptd's best round",
            f"{server_share:.0%} of a core",
            "n/a",
            None,
            "not the bottleneck (< 100% of its core)",
            server_share < 1.0,
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=4, help="checkpoints per layout")
    parser.add_argument("--size-mib", type=int, default=512, help="size of each checkpoint")
    parser.add_argument("--shards", type=int, default=4, help="files per sharded checkpoint")
    parser.add_argument("--repeat", type=int, default=2, help="rounds per contender")
    parser.add_argument("--workers", type=int, default=4, help="ckptd's upload.workers")
    parser.add_argument("--layouts", default="single,sharded", help="single, sharded or both")
    parser.add_argument(
        "--no-server-md5", dest="server_md5", action="store_false",
        help="the loopback server drains uploads without checking their md5 (diagnostic)",
    )  # fmt: skip
    c.add_common_args(parser)
    args = parser.parse_args()
    c.print_preamble("throughput", ["bench.throughput", *sys.argv[1:]])
    rows: list[c.Row] = []
    with c.scratch(args.tmp, "throughput", args.keep) as tmp:
        for layout in args.layouts.split(","):
            rows += bench_layout(args, layout, tmp)
            print()
    c.print_table(rows)


if __name__ == "__main__":
    main()
