"""Footprint: memory and disk while ckptd publishes a big checkpoint, and CPU while it idles.

1. Publish: ckptd (online, loopback server) publishes a small checkpoint and then a big one
   (`--size-gib`, 4 by default) in one process. Peak RSS (the kernel's VmHWM) of ckptd's own
   process and of its wandb-core after each: the ratio shows whether memory grows with the
   checkpoint. Extra disk is every byte allocated under ckptd's state_dir and the W&B
   directories (WANDB_DIR, _CACHE_DIR, _DATA_DIR, _CONFIG_DIR, HOME, TMPDIR), each inode
   once and the checkpoint's own inode left out (a hard-link snapshot costs nothing),
   sampled during the upload and measured after it. Baseline: the raw SDK with default
   settings (`add_file` + `log_artifact` + `wait`) on the same file, which is what a training
   script does today.
2. Idle: ckptd watching `--dirs` empty directories, CPU over `--idle-seconds`, first before
   any publish (no W&B run yet), then after one publish (one run and wandb-core alive);
   baseline the same daemon watching one directory.

    python -m bench.footprint [--size-gib 4] [--small-mib 256] [--dirs 100] [--idle-seconds 30]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import _common as c
from tests.support.fake_wandb import FakeWandbServer

GIB = 1 << 30
RSS_GOAL = 150e6


@dataclass
class DiskWatch:
    """Samples the extra disk under `roots` from a thread; keeps the peak."""

    roots: list[Path]
    exclude: set[int]
    peak: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def now(self) -> int:
        return c.allocated_bytes(self.roots, self.exclude)

    def __enter__(self) -> DiskWatch:
        self._thread = threading.Thread(target=self._loop, name="bench-disk", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, self.now())


def wandb_dirs(env: dict[str, str]) -> list[Path]:
    names = ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "HOME", "TMPDIR")
    return [Path(env[n]) for n in names]


def make_checkpoint(root: Path, name: str, size: int, seed: int) -> Path:
    """A checkpoint under a temp name inside `root`; rename it to `name` to publish it."""
    temp = root / f".{name}.tmp"
    c.write_payload(temp, size, seed)
    return temp


@dataclass
class Publish:
    """Peak RSS after a publish, and its extra disk during and after."""

    ckptd_peak: int
    core_peak: int
    disk_peak: int
    disk_after: int
    seconds: float


def ckptd_publishes(
    server: FakeWandbServer, tmp: Path, small: int, big: int
) -> tuple[Publish, Publish]:
    root = tmp / "watched"
    root.mkdir()
    staged = {
        "warm-up": make_checkpoint(root, "warm_0.pt", 4096, seed=0),
        "small": make_checkpoint(root, "small_1.pt", small, seed=1),
        "big": make_checkpoint(root, "big_2.pt", big, seed=2),
    }
    os.sync()
    env = c.wandb_env(tmp / "wandb-ckptd", server)
    watch = c.watch_entry(root, "footprint")
    results: list[Publish] = []
    with c.Ckptd(tmp / "ckptd", [watch], env) as daemon:
        tree = c.ProcTree(daemon.pid).start()
        daemon.wait_for_log("ckptd started")
        dirs = [daemon.state_dir, *wandb_dirs(env)]
        # The warm-up publish starts the W&B run; a process's first publish also costs
        # some memory once (imports, caches), which is not what this compares.
        for version, key in enumerate(staged):
            path = staged[key]
            inode = path.stat().st_ino
            before = c.allocated_bytes(dirs, {inode})
            start = time.time()
            with DiskWatch(dirs, {inode}) as disk:
                path.rename(root / path.name.removeprefix(".").removesuffix(".tmp"))
                daemon.wait_for_log(f"as footprint:v{version} ", timeout=600)
            seconds = time.time() - start
            time.sleep(1.0)  # let the run's logs flush
            tree.sample()
            results.append(
                Publish(
                    ckptd_peak=tree.root_info().peak_rss,
                    core_peak=tree.peak_rss("wandb-core"),
                    disk_peak=max(0, disk.peak - before),
                    disk_after=max(0, c.allocated_bytes(dirs, {inode}) - before),
                    seconds=seconds,
                )
            )
        tree.stop()
    return results[1], results[2]


def sdk_publish(server: FakeWandbServer, tmp: Path, path: Path) -> Publish:
    """The raw SDK's default: `add_file` (mutable: a staging copy) + log + wait (a cache copy)."""
    env = c.wandb_env(tmp / "wandb-sdk", server)
    dirs = wandb_dirs(env)
    inode = path.stat().st_ino
    before = c.allocated_bytes(dirs, {inode})
    command = c.child_command("_sdk_upload", "--collection", "footprint-sdk", str(path))
    start = time.time()
    with DiskWatch(dirs, {inode}) as disk:
        proc = subprocess.Popen(command, env=env, cwd=c.REPO, stdout=subprocess.PIPE, text=True)
        tree = c.ProcTree(proc.pid).start()
        out, _ = proc.communicate(timeout=1800)
        tree.stop()
    if proc.returncode != 0:
        sys.exit(f"raw SDK failed:\n{out}")
    json.loads(out.split("RESULT ", 1)[1])
    return Publish(
        ckptd_peak=tree.root_info().peak_rss,
        core_peak=tree.peak_rss("wandb-core"),
        disk_peak=max(0, disk.peak - before),
        disk_after=max(0, c.allocated_bytes(dirs, {inode}) - before),
        seconds=time.time() - start,
    )


def idle_cpu(
    server: FakeWandbServer, tmp: Path, dirs: int, seconds: float
) -> tuple[dict[str, float], dict[str, float]]:
    """CPU share of a core (by process) while ckptd watches `dirs` idle directories: before
    any publish, and after one (a W&B run and wandb-core alive)."""
    name = f"idle-{dirs}"
    roots = [tmp / name / f"run{i:03d}" for i in range(dirs)]
    watches = [c.watch_entry(r, f"{name}-{i}") for i, r in enumerate(roots)]
    env = c.wandb_env(tmp / f"wandb-{name}", server)
    shares = []
    with c.Ckptd(tmp / f"ckptd-{name}", watches, env) as daemon:
        daemon.wait_for_log("ckptd started")
        tree = c.ProcTree(daemon.pid, interval=1.0).start()
        for phase in ("before", "after"):
            if phase == "after":
                temp = make_checkpoint(roots[0], "one_1.pt", 4096, seed=3)
                temp.rename(roots[0] / "one_1.pt")
                daemon.wait_for_log(f"as {name}-0:v0 ", timeout=120)
            time.sleep(3.0)  # start-up scan, run start-up and the first heartbeat are not idle
            tree.sample()
            start = time.time()
            time.sleep(seconds)
            tree.sample()
            spent = tree.cpu_between(start, time.time())
            spent.pop("other processes", None)
            spent.pop("server+harness", None)
            shares.append({("ckptd" if k == "root" else k): v / seconds for k, v in spent.items()})
        tree.stop()
    return shares[0], shares[1]


def independent(small_peak: int, big_peak: int, extra_bytes: int) -> bool:
    """Memory does not follow the checkpoint's size: whatever it grew by is under 1% of the
    extra bytes (a buffer per byte, or per part, would be far above that)."""
    return big_peak - small_peak < 0.01 * extra_bytes


def fmt_share(share: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2%}" for k, v in sorted(share.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gib", type=float, default=4.0, help="the big checkpoint")
    parser.add_argument("--small-mib", type=int, default=256, help="the small checkpoint")
    parser.add_argument("--dirs", type=int, default=100, help="watched directories when idle")
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument("--skip-sdk", action="store_true", help="no raw-SDK disk baseline")
    c.add_common_args(parser)
    args = parser.parse_args()
    c.print_preamble("footprint", ["bench.footprint", *sys.argv[1:]])
    big, small = int(args.size_gib * GIB), args.small_mib * c.MiB
    free = shutil.disk_usage(args.tmp).free
    need = 3 * big + small + GIB  # the checkpoint, the SDK's staging and cache copies
    if free < need:
        sys.exit(f"{args.tmp} has {free / GIB:.1f} GiB free; this needs {need / GIB:.1f} GiB")
    print(f"{args.tmp}: {free / GIB:.0f} GiB free before start")
    with (
        c.scratch(args.tmp, "footprint", args.keep) as tmp,
        c.bench_server(tmp / "server") as server,
    ):
        small_run, big_run = ckptd_publishes(server, tmp, small, big)
        for label, run in (("small", small_run), ("big", big_run)):
            print(
                f"ckptd after the {label} checkpoint: peak RSS ckptd {c.fmt_mb(run.ckptd_peak)}, "
                f"wandb-core {c.fmt_mb(run.core_peak)}; extra disk peak {run.disk_peak:,} B, "
                f"after {run.disk_after:,} B; published in {run.seconds:.1f}s"
            )
        sdk = None
        if not args.skip_sdk:
            sdk = sdk_publish(server, tmp, next((tmp / "watched").glob("big_*.pt")))
            print(
                f"raw SDK default, big checkpoint: peak RSS python {c.fmt_mb(sdk.ckptd_peak)}, "
                f"wandb-core {c.fmt_mb(sdk.core_peak)}; extra disk peak {sdk.disk_peak:,} B, "
                f"after {sdk.disk_after:,} B; {sdk.seconds:.1f}s"
            )
        many_before, many_after = idle_cpu(server, tmp, args.dirs, args.idle_seconds)
        one_before, one_after = idle_cpu(server, tmp, 1, args.idle_seconds)
    for label, share in (
        (f"{args.dirs} dirs, before a publish", many_before),
        (f"{args.dirs} dirs, after one publish", many_after),
        ("1 dir, before a publish", one_before),
        ("1 dir, after one publish", one_after),
    ):
        print(f"idle CPU, {label}: {fmt_share(share)} of a core")
    print()
    size = f"{args.size_gib:g} GiB"
    rows = [
        c.Row(
            f"footprint: peak RSS of ckptd's process, {size} checkpoint",
            c.fmt_mb(big_run.ckptd_peak),
            f"{c.fmt_mb(small_run.ckptd_peak)} after {args.small_mib} MiB",
            big_run.ckptd_peak / small_run.ckptd_peak,
            "<= 150 MB, and independent of size: grows < 1% of the extra bytes",
            big_run.ckptd_peak <= RSS_GOAL
            and independent(small_run.ckptd_peak, big_run.ckptd_peak, big - small),
        ),
        c.Row(
            f"footprint: peak RSS of wandb-core, {size} checkpoint",
            c.fmt_mb(big_run.core_peak),
            f"{c.fmt_mb(small_run.core_peak)} after {args.small_mib} MiB",
            big_run.core_peak / max(1, small_run.core_peak),
            "independent of size: grows < 1% of the extra bytes",
            independent(small_run.core_peak, big_run.core_peak, big - small),
        ),
    ]
    if sdk is not None:
        rows += [
            c.Row(
                f"footprint: peak RSS of the publishing Python process, {size}",
                f"ckptd {c.fmt_mb(big_run.ckptd_peak)}",
                f"raw SDK default {c.fmt_mb(sdk.ckptd_peak)}",
                big_run.ckptd_peak / sdk.ckptd_peak,
                "report",
                None,
            ),
            c.Row(
                f"footprint: extra disk during the upload, {size}",
                f"{big_run.disk_peak:,} B",
                f"raw SDK default {sdk.disk_peak:,} B",
                big_run.disk_peak / max(1, sdk.disk_peak),
                "report",
                None,
            ),
            c.Row(
                f"footprint: extra disk after the upload, {size}",
                f"{big_run.disk_after:,} B",
                f"raw SDK default {sdk.disk_after:,} B",
                big_run.disk_after / max(1, sdk.disk_after),
                "0 bytes of checkpoint copies (< 1 MiB: run logs, journal)",
                big_run.disk_after < c.MiB,
            ),
        ]
    total_after = sum(many_after.values())
    rows.append(
        c.Row(
            f"footprint: idle CPU, {args.dirs} watched dirs (ckptd + wandb-core, after a publish)",
            f"{total_after:.2%} of a core ({fmt_share(many_after)})",
            f"1 dir: {sum(one_after.values()):.2%}",
            total_after / max(1e-9, sum(one_after.values())),
            "<= 1% of a core",
            total_after <= 0.01,
        )
    )
    c.print_table(rows)


if __name__ == "__main__":
    main()
