"""Running as a good neighbour: ckptd's CPU and I/O priority, and a cap on how fast it reads.

ckptd hashes every checkpoint byte on the disks the training job writes its next checkpoint
to and reads its data from. `upload.priority` lowers ckptd's CPU priority (nice) and I/O
priority (the kernel's I/O scheduling class) at start-up, before any thread or wandb-core
process exists: Linux keeps both per thread, and threads and child processes inherit them,
so every hashing thread and the SDK's wandb-core run at the same low priority.
`upload.max_read_rate` caps the bytes per second that hashing reads, across all its threads.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform
import threading
import time
from collections.abc import Callable

__all__ = ["PRIORITIES", "ReadRate", "describe", "io_priority", "lower_priority"]

log = logging.getLogger(__name__)

# upload.priority -> (lowest niceness to run at, I/O class, I/O level); None keeps what it is.
PRIORITIES: dict[str, tuple[int, int, int] | None] = {
    "normal": None,
    "low": (10, 2, 7),  # nice 10, best-effort at its lowest level
    "idle": (19, 3, 0),  # nice 19, idle: disk time only when nobody else wants it
}
_IO_CLASSES = {1: "realtime", 2: "best-effort", 3: "idle"}
_IOPRIO_WHO_PROCESS = 1
_IOPRIO_CLASS_SHIFT = 13
_SYS_IOPRIO = {"x86_64": (251, 252), "aarch64": (30, 31), "ppc64le": (273, 274)}  # set, get


def lower_priority(priority: str) -> str:
    """Lower this thread's (and so every later thread's and child's) CPU and I/O priority
    as `upload.priority` says; return what it runs at, for the start-up log. Never raises: a
    priority that cannot be set (a seccomp filter, an unknown architecture) is reported."""
    wanted = PRIORITIES[priority]
    if wanted is not None:
        nice, io_class, io_level = wanted
        current = os.getpriority(os.PRIO_PROCESS, 0)
        if current < nice:
            try:
                os.setpriority(os.PRIO_PROCESS, 0, nice)
            except OSError as exc:
                log.warning("upload.priority: cannot lower the CPU priority: %s", exc.strerror)
        problem = _set_io_priority(io_class, io_level)
        if problem is not None:
            log.warning("upload.priority: cannot lower the I/O priority: %s", problem)
    return describe()


def describe() -> str:
    """This thread's CPU and I/O priority, as `nice 10, I/O best-effort 7`."""
    nice = os.getpriority(os.PRIO_PROCESS, 0)
    io = io_priority()
    if io is None:
        return f"nice {nice}"
    io_class, level = io
    name = _IO_CLASSES.get(io_class, "default")
    return f"nice {nice}, I/O {name}" + (f" {level}" if io_class in (1, 2) else "")


def _syscall(index: int) -> int | None:
    numbers = _SYS_IOPRIO.get(platform.machine())
    return None if numbers is None else numbers[index]


def _set_io_priority(io_class: int, level: int) -> str | None:
    number = _syscall(0)
    if number is None:
        return f"ioprio_set is not known on {platform.machine()}"
    value = (io_class << _IOPRIO_CLASS_SHIFT) | level
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(number, _IOPRIO_WHO_PROCESS, 0, value) != 0:
        return os.strerror(ctypes.get_errno() or errno.EPERM)
    return None


def io_priority(tid: int = 0) -> tuple[int, int] | None:
    """(class, level) of thread `tid` (0: this one); None where it cannot be read. Class 0
    means none was set: the thread follows its CPU priority."""
    number = _syscall(1)
    if number is None:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    value = libc.syscall(number, _IOPRIO_WHO_PROCESS, tid)
    if value < 0:
        return None
    return value >> _IOPRIO_CLASS_SHIFT, value & ((1 << _IOPRIO_CLASS_SHIFT) - 1)


class ReadRate:
    """A token bucket shared by every hashing thread: `take(n)` returns once reading `n`
    more bytes keeps the average under `bytes_per_second` (one second of burst)."""

    def __init__(
        self,
        bytes_per_second: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.rate = bytes_per_second
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = bytes_per_second
        self._stamp = clock()

    def take(self, n: int) -> None:
        with self._lock:  # reservations are made in order; the waits overlap
            now = self._clock()
            self._tokens = min(self.rate, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= n
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
