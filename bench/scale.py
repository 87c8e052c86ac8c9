"""Scale: start-up with many existing checkpoints that the journal already knows.

`--dirs` watched directories (100) hold `--per-dir` checkpoint files each (100: 10,000 in
all), every one already recorded in the journal as published, as after a restart. ckptd
starts (offline: nothing is to be published) and must recognise each as known. "Ready" is
the moment every existing checkpoint is reconciled: the earlier of a sentinel (one new
checkpoint in the last directory, whose "queued" log line comes after every directory before
it was reconciled) and the coordinator going quiet (under 5% of a core for a second), since
a sentinel without a sidecar also waits out `sidecar.wait` itself.
Reported: time from process start to /readyz answering 200 and to ready, peak RSS up to
ready, CPU spent until ready, and idle CPU afterwards. Cases:
- `sidecars`: every checkpoint has its metrics sidecar, so none waits for one;
- `no-sidecars`: none has, and the default `sidecar.wait` (30s) applies to each.
Baseline: the same daemon on the same directories holding only the sentinel.

The journal is filled through ckptd's own Detector and Journal (on tmpfs, for speed) and
copied into place, so its rows are exactly what the daemon would have written.

    python -m bench.scale [--dirs 100] [--per-dir 100] [--idle-seconds 20]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import _common as c
from ckptd import sidecar
from ckptd.config import load_config
from ckptd.detect import Detector
from ckptd.journal import Journal, NewRow

AN_HOUR_AGO = time.time() - 3600  # mtimes: long settled
SETTLE = 5.0  # seconds: the default settle window, which the watch entries keep


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_tree(root: Path, dirs: int, per_dir: int, sidecars: bool) -> list[Path]:
    """`dirs` directories of `per_dir` small checkpoints, settled an hour ago."""
    roots = []
    for d in range(dirs):
        directory = root / f"run{d:03d}"
        directory.mkdir(parents=True)
        roots.append(directory)
        for i in range(1, per_dir + 1):
            path = directory / f"ckpt_{i * 100}.pt"
            c.write_payload(path, 4096, seed=d * 100_000 + i)
            written = [path]
            if sidecars:
                written.append(sidecar.write(path, step=i * 100, metrics={"val_loss": 1 / i}))
            for p in written:
                os.utime(p, (AN_HOUR_AGO, AN_HOUR_AGO))
    return roots


def add_sentinel(directory: Path, with_sidecar: bool) -> Path:
    path = directory / "ckpt_999999.pt"
    c.write_payload(path, 4096, seed=7)
    written = [path]
    if with_sidecar:
        written.append(sidecar.write(path, step=999999, metrics={"val_loss": 0.0}))
    for p in written:
        os.utime(p, (AN_HOUR_AGO, AN_HOUR_AGO))
    return path


def prefill(config_path: Path, state_dir: Path, skip: Path) -> int:
    """Record every checkpoint the daemon would find (but `skip`) as published; count them."""
    config = load_config(config_path)
    count = 0
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        journal = Journal(Path(shm)).open()
        now = time.time()
        for watch in config.watch:
            detector = Detector(watch)
            detector.scan(now)
            # Past the settle window, then past the sidecar wait that starts after it.
            polls = [detector.poll(now + hours * 3600) for hours in range(3)]
            found = {r.unit: r for ready in polls for r in ready}
            for ready in found.values():
                if ready.unit == skip:
                    continue
                new = NewRow(
                    collection=watch.artifact, watch_path=watch.path, relpath=ready.relpath,
                    fingerprint=ready.fingerprint, format=ready.format, step=ready.info.step,
                    files=ready.files, info=ready.info, snapshot=None,
                )  # fmt: skip
                row_id = journal.add(new, now)
                assert row_id is not None
                md5s = {f.name: "AAAAAAAAAAAAAAAAAAAAAA==" for f in ready.files}
                journal.mark_hashed(row_id, now, md5s=md5s, digest=f"prefill-{row_id}")
                journal.mark_published(row_id, now, version=f"v{count}", aliases=(), best={})
                journal.mark_aliased(row_id, now)
                count += 1
        journal.close()
        state_dir.mkdir(parents=True, exist_ok=True)
        for f in Path(shm).glob("journal.sqlite3*"):
            shutil.copy2(f, state_dir / f.name)
    return count


@dataclass
class Startup:
    case: str
    checkpoints: int
    readyz_s: float
    ready_s: float
    peak_rss: int
    cpu_to_ready: float
    idle_share: float

    def describe(self) -> str:
        return (
            f"{self.case} ({self.checkpoints:,} known checkpoints): /readyz after "
            f"{self.readyz_s:.2f}s, ready after {self.ready_s:.2f}s; peak RSS "
            f"{c.fmt_mb(self.peak_rss)} until ready; {self.cpu_to_ready:.1f}s CPU until "
            f"ready; idle afterwards {self.idle_share:.2%} of a core"
        )


def start_up(tmp: Path, case: str, args: argparse.Namespace) -> Startup:
    sidecars = case != "no-sidecars"
    per_dir = 0 if case == "empty" else args.per_dir
    roots = make_tree(tmp / case / "watched", args.dirs, per_dir, sidecars)
    sentinel = add_sentinel(roots[-1], sidecars)
    written = time.time()
    watches = [{"path": str(r), "artifact": f"scale-{i}"} for i, r in enumerate(roots)]
    port = free_port()
    daemon = c.Ckptd(
        tmp / case / "ckptd", watches, c.wandb_env(tmp / case / "wandb", None),
        online=False, metrics_listen=f"127.0.0.1:{port}",
        profile=args.profile / f"scale-{case}.raw" if args.profile else None,
    )  # fmt: skip
    known = prefill(daemon.config_path, daemon.state_dir, skip=sentinel)
    os.sync()
    # utime set the mtimes an hour back, but ctime is now and the detector counts it too:
    # let the settle window pass, as it long has for checkpoints that exist at a restart.
    time.sleep(max(0.0, written + SETTLE + 0.5 - time.time()))
    with daemon:
        start = daemon.started_at
        tree = c.ProcTree(daemon.pid, interval=0.05).start()
        readyz = c.wait_until("/readyz", lambda: _ready(port), 300, interval=0.01)
        daemon.wait_for_log(f"{sentinel} (step", timeout=600)
        sentinel_at = daemon.events(r"finished checkpoint .*ckpt_999999\.pt")[0][0]
        quiet_at = quiet_since(tree, readyz)
        ready = min(sentinel_at, quiet_at) if quiet_at is not None else sentinel_at
        tree.interval = 1.0
        time.sleep(5.0)  # the sentinel is published (offline) meanwhile: not idle yet
        idle_from = time.time()
        time.sleep(args.idle_seconds)
        tree.stop()
    peak = max((rss for t, rss in tree.series if t <= ready), default=0)
    cpu_to_ready = tree.cpu_between(start, ready + 0.05).get("root", 0.0)
    idle = tree.cpu_between(idle_from, time.time())
    idle_share = (idle.get("root", 0.0) + idle.get("wandb-core", 0.0)) / args.idle_seconds
    return Startup(case, known, readyz - start, ready - start, peak, cpu_to_ready, idle_share)


def quiet_since(tree: c.ProcTree, after: float, window: float = 1.0) -> float | None:
    """When the daemon's coordinator went quiet: the first sample after `after` from which
    it used under 5% of a core for `window` seconds (reconciling keeps it near 100%)."""
    history = [(t, procs[tree.root].cpu) for t, procs in tree.history if tree.root in procs]
    for i, (t, cpu) in enumerate(history):
        if t < after:
            continue
        later = [(u, v) for u, v in history[i:] if u <= t + window]
        if later[-1][0] - t >= 0.9 * window and later[-1][1] - cpu < 0.05 * window:
            return t
    return None


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as answer:
            status: Any = answer.status
            return bool(status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dirs", type=int, default=100)
    parser.add_argument("--per-dir", type=int, default=100)
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    parser.add_argument("--cases", default="empty,sidecars,no-sidecars")
    c.add_common_args(parser)
    args = parser.parse_args()
    c.print_preamble("scale", ["bench.scale", *sys.argv[1:]])
    results: dict[str, Startup] = {}
    with c.scratch(args.tmp, "scale", args.keep) as tmp:
        for case in args.cases.split(","):
            results[case] = start_up(tmp, case, args)
            print(results[case].describe())
    print()
    base = results.get("empty")
    rows = []
    for case, result in results.items():
        if case == "empty" or base is None:
            continue
        label = f"scale: start-up, {args.dirs} dirs, {result.checkpoints:,} known ckpts, {case}"
        rows += [
            c.Row(
                f"{label}: time to ready",
                f"{result.ready_s:.2f}s ({result.cpu_to_ready:.1f}s CPU)",
                f"empty dirs {base.ready_s:.2f}s ({base.cpu_to_ready:.1f}s CPU)",
                result.ready_s / base.ready_s,
                "report (no numeric goal in the issue)",
                None,
            ),
            c.Row(
                f"{label}: peak RSS until ready",
                c.fmt_mb(result.peak_rss),
                f"empty dirs {c.fmt_mb(base.peak_rss)}",
                result.peak_rss / base.peak_rss,
                "report (<= 150 MB as for footprint)",
                None,
            ),
            c.Row(
                f"{label}: idle CPU once ready",
                f"{result.idle_share:.2%} of a core",
                f"empty dirs {base.idle_share:.2%}",
                result.idle_share / max(1e-9, base.idle_share),
                "<= 1% of a core (footprint's idle goal)",
                result.idle_share <= 0.01,
            ),
        ]
    c.print_table(rows)


if __name__ == "__main__":
    main()
