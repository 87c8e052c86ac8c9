"""What every benchmark shares: the machine's description, the loopback W&B server, a ckptd
subprocess with a generated config, /proc sampling, payload files and the results table.

Nothing here reaches beyond 127.0.0.1: online runs talk to the fake server in this process,
offline runs get `WANDB_MODE=offline` and a base URL that refuses connections.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from bench._profile import Profile
from tests.support.fake_wandb import API_KEY, FakeWandbServer

REPO = Path(__file__).resolve().parents[1]
PROJECT = "ckptd-bench"
MiB = 1 << 20
_TICK = os.sysconf("SC_CLK_TCK")
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


# -- the machine and the table ------------------------------------------------------------


def machine() -> dict[str, str]:
    """What RESULTS.md records about the machine a figure came from."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": model,
        "python": platform.python_version(),
        "wandb": importlib.metadata.version("wandb"),
        "ckptd": importlib.metadata.version("ckptd"),
        "code": _revision(),
        "load average (1, 5, 15 min)": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def _revision() -> str:
    """The commit measured, and whether ckptd/ had uncommitted changes (read-only git)."""

    def git(*args: str) -> str:
        result = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=False
        )
        return result.stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "ckptd")
    return head + (" + uncommitted changes in ckptd/" if dirty else "")


def background_load(seconds: float = 1.0) -> float:
    """Share of all cores busy over `seconds` before a benchmark starts (other users' work)."""
    busy0, total0 = _system_jiffies()
    time.sleep(seconds)
    busy1, total1 = _system_jiffies()
    return (busy1 - busy0) / max(1, total1 - total0)


def machine_busy_seconds() -> float:
    """CPU seconds all processes of the machine have used since boot (steal included)."""
    return _system_jiffies()[0] / _TICK


def steal_seconds() -> float:
    """CPU seconds the hypervisor gave to other guests while this one wanted to run."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return int(fields[8]) / _TICK


def _system_jiffies() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def print_preamble(title: str, argv: list[str]) -> None:
    """The command, the machine and how busy it already was. Also makes SIGTERM unwind
    like Ctrl-C, so that the daemons a benchmark started are stopped with it."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    print(f"# {title}")
    print(f"command: python -m {' '.join(argv)}")
    for key, value in machine().items():
        print(f"{key}: {value}")
    print(f"background load before start: {background_load():.0%} of all cores")
    print()


@dataclass
class Row:
    """One line of a results table: a figure, its same-run baseline and their ratio."""

    benchmark: str
    figure: str
    baseline: str
    ratio: float | None
    goal: str
    met: bool | None

    def markdown(self) -> str:
        ratio = "n/a" if self.ratio is None else f"{self.ratio:.2f}"
        met = {True: "yes", False: "**no**", None: "n/a"}[self.met]
        cells = [self.benchmark, self.figure, self.baseline, ratio, self.goal, met]
        return "| " + " | ".join(cells) + " |"


def print_table(rows: Iterable[Row]) -> None:
    print("| benchmark | figure | baseline (same run) | ratio | goal | met? |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(row.markdown())
    sys.stdout.flush()


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linearly interpolated between closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tmp",
        type=Path,
        default=Path(tempfile.gettempdir()),
        help="where the benchmark's files go (the same filesystem as its checkpoints)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp directory")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="attach py-spy to each ckptd daemon and write its profile summary into DIR "
        "(pip install -e '.[bench]')",
    )


@contextlib.contextmanager
def scratch(parent: Path, name: str, keep: bool = False) -> Iterator[Path]:
    """A fresh directory under `parent`, removed afterwards unless `keep`."""
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"ckptd-bench-{name}-", dir=parent))
    try:
        yield path
    finally:
        if keep:
            print(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


# -- payloads and the md5 limit ----------------------------------------------------------

_BLOCK_SIZE = 8 * MiB
_TAG = b"ckptbnch"
_block: bytes | None = None


def write_payload(path: Path, size: int, seed: int) -> None:
    """`size` bytes of incompressible data, unique per `seed` (so no two files deduplicate).

    One random 8 MiB block is reused with a fixed tag and the seed in its first 16 bytes:
    md5 and the network cost the same, and writing gigabytes takes seconds instead of
    minutes. The tag keeps the file from starting like a zip (`PK`), which ckptd's structural
    check would take for a torn `torch.save`.
    """
    global _block
    if _block is None:
        _block = os.urandom(_BLOCK_SIZE)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb", buffering=0) as out:
        written = 0
        while written < size:
            block = _block if written else _TAG + seed.to_bytes(8, "little") + _block[16:]
            n = min(_BLOCK_SIZE, size - written)
            out.write(memoryview(block)[:n])
            written += n


def _worker_pid(_: int) -> int:
    return os.getpid()


def _md5_file(path: str) -> int:
    with open(path, "rb") as handle:
        hashlib.file_digest(handle, "md5")
    return os.path.getsize(path)


def md5_seconds(paths: list[Path]) -> float:
    """Seconds hashlib takes to md5 `paths` with every core (one process per core)."""
    workers = len(os.sched_getaffinity(0))
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_worker_pid, range(workers)))  # start the workers before timing
        start = time.perf_counter()
        list(pool.map(_md5_file, [str(p) for p in paths]))
        return time.perf_counter() - start


def cpu_self() -> float:
    """CPU seconds of this process (the loopback server's threads and the harness)."""
    times = os.times()
    return times.user + times.system


# -- /proc sampling --------------------------------------------------------------------


@dataclass
class ProcInfo:
    pid: int
    name: str
    cpu: float = 0.0  # seconds, at the last sample
    rss: int = 0  # bytes, at the last sample
    peak_rss: int = 0  # bytes: the kernel's VmHWM, at the last sample


def read_proc(pid: int) -> ProcInfo | None:
    """CPU seconds, RSS and peak RSS of a live process; None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    name = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2 :].split()
    info = ProcInfo(pid, name, cpu=(int(fields[11]) + int(fields[12])) / _TICK)
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            info.rss = int(line.split()[1]) * 1024
        elif line.startswith("VmHWM:"):
            info.peak_rss = int(line.split()[1]) * 1024
    return info


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
    return out


@dataclass
class ProcTree:
    """Samples a process tree from a thread: per process CPU, RSS and peak RSS, and the
    root's RSS over time. Processes that exit keep their last sample. This process itself
    is sampled as pid 0, "server+harness": the loopback server lives in it."""

    root: int
    interval: float = 0.1
    procs: dict[int, ProcInfo] = field(default_factory=dict)
    series: list[tuple[float, int]] = field(default_factory=list)  # (time, root RSS)
    history: list[tuple[float, dict[int, ProcInfo]]] = field(default_factory=list)
    machine_busy: list[tuple[float, float]] = field(default_factory=list)  # (time, CPU s)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> ProcTree:
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="bench-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        now = time.time()
        for pid in descendants(self.root):
            info = read_proc(pid)
            if info is None:
                continue
            old = self.procs.get(pid)
            if old is not None:
                info.peak_rss = max(info.peak_rss, old.peak_rss)
            self.procs[pid] = info
            if pid == self.root:
                self.series.append((now, info.rss))
        # This process: the loopback server's threads (and the harness, this sampler).
        self.procs[0] = ProcInfo(0, "server+harness", cpu=cpu_self())
        self.history.append((now, dict(self.procs)))
        self.machine_busy.append((now, _system_jiffies()[0] / _TICK))

    def cpu_between(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds each process name spent between two times (the nearest samples
        inside the interval); the root process is called "root", and "other processes"
        is what the rest of the machine (other users' jobs) spent meanwhile."""
        inside = [i for i, (t, _) in enumerate(self.history) if start <= t <= end]
        if len(inside) < 2:
            return {}
        first, last = self.history[inside[0]][1], self.history[inside[-1]][1]
        spent: dict[str, float] = {}
        for pid, info in last.items():
            key = "root" if pid == self.root else info.name
            before = first[pid].cpu if pid in first else 0.0
            spent[key] = spent.get(key, 0.0) + info.cpu - before
        machine = self.machine_busy[inside[-1]][1] - self.machine_busy[inside[0]][1]
        spent["other processes"] = max(0.0, machine - sum(spent.values()))
        return spent

    def cpu(self, name: str | None = None) -> float:
        """CPU seconds of the processes called `name` (all when None)."""
        return sum(p.cpu for p in self.procs.values() if name is None or p.name == name)

    def peak_rss(self, name: str) -> int:
        """The highest peak RSS of any one process called `name`."""
        return max((p.peak_rss for p in self.procs.values() if p.name == name), default=0)

    def root_info(self) -> ProcInfo:
        return self.procs[self.root]


# -- W&B environments and the loopback server --------------------------------------------


def wandb_env(root: Path, server: FakeWandbServer | None) -> dict[str, str]:
    """An environment in which the wandb SDK reaches `server` (online) or nothing at all
    (offline), with every W&B directory and TMPDIR under `root`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    dirs = {
        "WANDB_DIR": root / "dir",
        "WANDB_CACHE_DIR": root / "cache",
        "WANDB_DATA_DIR": root / "data",
        "WANDB_CONFIG_DIR": root / "config",
        "HOME": root / "home",
        "TMPDIR": root / "tmp",
    }
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    env.update({name: str(path) for name, path in dirs.items()})
    env.update(
        WANDB_ERROR_REPORTING="false",
        WANDB_DISABLE_GIT="true",
        WANDB_DISABLE_CODE="true",
        WANDB_SILENT="true",
        WANDB_PROJECT=PROJECT,
    )
    if server is None:
        env.update(WANDB_MODE="offline", WANDB_BASE_URL="http://127.0.0.1:9")
    else:
        env.update(WANDB_MODE="online", WANDB_BASE_URL=server.url, WANDB_API_KEY=API_KEY)
    return env


def bench_server(storage: Path, verify: bool = True) -> FakeWandbServer:
    """The loopback server as the benchmarks use it: uploads hashed and dropped (never the
    bottleneck on disk), no cross-version file dedup (ckptd and the SDK baseline upload the
    same bytes and must both send them). `verify=False` drains uploads without hashing
    them, leaving the CPU to the client (a diagnostic: nothing is checked then)."""
    return FakeWandbServer(
        storage_dir=storage,
        discard_uploads=True,
        verify_uploads=verify,
        dedup_files=False,
    )


def committed(server: FakeWandbServer, collection: str) -> int:
    return sum(v.state == "COMMITTED" for v in server.versions(collection))


def wait_until(what: str, condition: Any, timeout: float, interval: float = 0.02) -> float:
    """Poll `condition()` until truthy; return the time it was; raise after `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
    return time.time()


def op_times(server: FakeWandbServer, operation: str, since: float = 0.0) -> list[float]:
    """Arrival times of the GraphQL `operation` at `server` since `since`."""
    return [r.at for r in server.timed_requests if r.operation == operation and r.at >= since]


# -- ckptd as a subprocess ---------------------------------------------------------------


def watch_entry(path: Path, artifact: str, **overrides: Any) -> dict[str, Any]:
    """A watch entry with benchmark-friendly settings: no remote retention (the benchmarks
    measure publishing) and no wait for sidecars the writers never write."""
    entry: dict[str, Any] = {
        "path": str(path),
        "artifact": artifact,
        "format": "file",
        "sidecar": {"wait": "0s"},
        "retention": {"remote": {"keep_last": None}},
    }
    entry.update(overrides)
    return entry


class Ckptd:
    """`python -m ckptd --config FILE` with a generated config; its log goes to a file."""

    def __init__(
        self,
        root: Path,
        watches: list[dict[str, Any]],
        env: dict[str, str],
        *,
        online: bool = True,
        workers: int = 4,
        metrics_listen: str | None = None,
        level: str = "info",
        profile: Path | None = None,
        upload: dict[str, Any] | None = None,
    ) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.profile_path = profile  # py-spy's raw stacks; a .txt summary goes beside them
        self.profile: Profile | None = None
        self.env = env
        self.config_path = root / "ckptd.yaml"
        self.log_path = root / "ckptd.log"
        config = {
            "state_dir": str(root / "state"),
            "wandb": {"mode": "online" if online else "offline", "project": PROJECT},
            "upload": {"workers": workers, **(upload or {})},
            "watch": watches,
            "metrics": {"listen": metrics_listen},
            "log": {"level": level},
        }
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Ckptd:
        self.started_at = time.time()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ckptd", "--config", str(self.config_path)],
                env=self.env,
                cwd=self.root,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if self.profile_path is not None:
            self.profile = Profile(self.proc.pid, self.profile_path)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self, pattern: str) -> list[tuple[float, re.Match[str]]]:
        """(time, match) of every log line matching `pattern`, timed by the log's clock."""
        out = []
        regex = re.compile(pattern)
        for line in self.log().splitlines():
            stamp = _LOG_TIME.match(line)
            found = regex.search(line)
            if stamp and found:
                at = datetime.strptime(stamp[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                out.append((at, found))
        return out

    def wait_for_log(self, text: str, timeout: float = 120) -> float:
        def seen() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ckptd exited ({self.proc.returncode}):\n{self.log()}")
            return text in self.log()

        return wait_until(repr(text), seen, timeout, interval=0.01)

    def stop(self, timeout: float = 120) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)
        finally:
            if self.profile is not None:
                self.profile.stop()
                print(f"profile: {self.profile.raw.with_suffix('.txt')}")

    def __enter__(self) -> Ckptd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        problems = [line for line in self.log().splitlines() if " ERROR " in line]
        if problems:
            print(f"ckptd logged errors ({self.log_path}):", *problems[:5], sep="\n  ")


def child_command(module: str, *args: str) -> list[str]:
    """`python -m bench.MODULE ARGS`: the benchmarks' own helper processes."""
    return [sys.executable, "-m", f"bench.{module}", *args]


def run_child(command: list[str], env: dict[str, str], timeout: float = 1800) -> str:
    """Run a helper process from the repository root; its stdout, or an error with stderr."""
    result = subprocess.run(
        command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def allocated_bytes(roots: Iterable[Path], exclude_inodes: Iterable[int] = ()) -> int:
    """Disk blocks held by the files under `roots`, each inode counted once, leaving out
    `exclude_inodes` (the checkpoints themselves, which a hard-link snapshot shares)."""
    seen: set[int] = set(exclude_inodes)
    total = 0
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                with contextlib.suppress(OSError):
                    st = os.lstat(os.path.join(dirpath, name))
                    if st.st_ino not in seen:
                        seen.add(st.st_ino)
                        total += st.st_blocks * 512
    return total


def fmt_mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"
