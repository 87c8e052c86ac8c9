"""py-spy profiles of a running daemon, summarised as text a reader can check in a diff.

`Profile.attach(pid, path)` samples the process from outside (no change to what is measured
beyond py-spy's own CPU) until it exits or `stop()` is called; `summary()` turns py-spy's
collapsed stacks into a table per thread group: the share of samples and the functions with
the most samples, inclusive and self. Idle threads are not sampled, so a share is CPU time.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

RATE = 200  # samples per second

_THREAD = re.compile(r"^thread \(\d+\): (?P<name>[^;]*);?")
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]*?)(?::\d+)?\)$")


class Profile:
    def __init__(self, pid: int, raw: Path) -> None:
        beside = Path(sys.executable).parent / "py-spy"  # the venv's, when not on PATH
        exe = str(beside) if beside.exists() else shutil.which("py-spy")
        if exe is None:
            raise SystemExit("--profile needs py-spy: pip install -e '.[bench]'")
        raw.parent.mkdir(parents=True, exist_ok=True)
        self.raw = raw
        self.proc = subprocess.Popen(
            [exe, "record", "--pid", str(pid), "--rate", str(RATE), "--format", "raw",
             "--threads", "--nonblocking", "--output", str(raw)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def stop(self) -> None:
        """End sampling (py-spy writes its file on SIGINT) and write the summary beside it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        self.proc.wait(60)
        if self.raw.exists():
            self.raw.with_suffix(".txt").write_text(summary(self.raw))


def summary(raw: Path, top: int = 15) -> str:
    """Per thread group (names without their pool index): samples, then the functions that
    appear in the most samples (inclusive) and that were on top of the most (self)."""
    inclusive: dict[str, Counter[str]] = defaultdict(Counter)
    own: dict[str, Counter[str]] = defaultdict(Counter)
    samples: Counter[str] = Counter()
    unwound = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        match = _THREAD.match(stack)
        if not match or not count_text.isdigit():
            continue
        count = int(count_text)
        group = re.sub(r"_\d+$", "", match["name"]) or "unnamed"
        frames = [_name(f) for f in stack[match.end() :].split(";") if f]
        if not frames:
            unwound += count  # no Python frame on the stack (in native code or waiting)
            continue
        samples[group] += count
        for frame in set(frames):
            inclusive[group][frame] += count
        if frames:
            own[group][frames[-1]] += count
    total = sum(samples.values())
    out = [
        f"# py-spy, {RATE} Hz, idle threads excluded: {total} samples = {total / RATE:.1f}s "
        f"(and {unwound} with no Python frame, left out)"
    ]
    for group, n in samples.most_common():
        out.append(f"\n## thread {group}: {n} samples ({n / max(1, total):.0%}), {n / RATE:.2f}s")
        for title, table in (("inclusive", inclusive[group]), ("self", own[group])):
            out.append(f"{title}:")
            out += [f"  {c / n:6.1%}  {frame}" for frame, c in table.most_common(top)]
    return "\n".join(out) + "\n"


def _name(frame: str) -> str:
    match = _FRAME.match(frame)
    if not match:
        return frame
    file = match["file"]
    for marker in ("/ckptd/", "/site-packages/", "/lib/python3.11/"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{match['func']} ({file})"
