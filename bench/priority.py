"""Priority: how much ckptd slows a training job's checkpoint write while it hashes the last one.

Each round writes checkpoint A (`--size-mib`, renamed into place, then evicted from the page
cache so that ckptd's md5 reads it from disk), waits until ckptd queued it (its hashing starts
at once), then times the training loop writing checkpoint B in place with an fsync, the way
`torch.save` plus a durable filesystem does. Variants: no ckptd (the baseline), ckptd with
`upload.priority: normal`, `low` (the default: nice 10, I/O best-effort 7) and `idle` (nice 19,
I/O idle). The figure is B's write time; the ratio is to no ckptd in the same round, median
over `--rounds`.

    python -m bench.priority [--size-mib 1024] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from bench import _common as c

VARIANTS = ("none", "normal", "low", "idle")


def evicted(path: Path) -> None:
    """Flush `path` and drop it from the page cache: the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed_write(path: Path, size: int, seed: int) -> float:
    """Seconds to write `path` in place and fsync it, as a training loop's save does."""
    start = time.perf_counter()
    c.write_payload(path, size, seed)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - start


def one_round(root: Path, variant: str, size: int, seed: int) -> float:
    ck = root / "ck"
    ck.mkdir(parents=True)
    daemon = None
    if variant != "none":
        env = c.wandb_env(root / "wandb", None)
        watch = c.watch_entry(ck, "priority", patterns=["*.bin"])
        daemon = c.Ckptd(root / "ckptd", [watch], env, online=False, upload={"priority": variant})
        daemon.start()
        daemon.wait_for_log("ckptd started")
    try:
        previous = ck / ".a.bin.tmp"
        c.write_payload(previous, size, seed)
        evicted(previous)
        previous.rename(ck / "a.bin")
        if daemon is not None:
            daemon.wait_for_log("a.bin (step")  # "finished checkpoint ... queued": hashing
        # B is not a watched name: the figure is A's hashing beside the write, nothing else.
        return timed_write(ck / "b.partial", size, seed + 1)
    finally:
        if daemon is not None:
            daemon.stop()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench.priority", description=__doc__)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    c.add_common_args(parser)
    args = parser.parse_args(argv)
    c.print_preamble("priority: the training loop's write beside ckptd's hashing", sys.argv)
    size = args.size_mib * c.MiB
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for round_ in range(args.rounds):
        for index, variant in enumerate(VARIANTS):
            with c.scratch(args.tmp, f"priority-{variant}", args.keep) as root:
                seconds = one_round(root, variant, size, seed=100 * round_ + 10 * index)
            times[variant].append(seconds)
            print(f"round {round_ + 1}, {variant}: B written in {seconds:.2f} s", flush=True)
    base = statistics.median(times["none"])
    rows = []
    for variant in VARIANTS[1:]:
        figure = statistics.median(times[variant])
        ratio = figure / base
        rows.append(
            c.Row(
                f"priority: {args.size_mib} MiB checkpoint write beside ckptd hashing, "
                f"upload.priority {variant} / no ckptd, median of {args.rounds}",
                f"{figure:.2f} s",
                f"no ckptd: {base:.2f} s",
                ratio,
                "report",
                None,
            )
        )
    print()
    c.print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
