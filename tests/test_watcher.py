"""The watcher on real inotify: which hints each kind of rename produces."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckptd.config import WatchConfig
from ckptd.watcher import Hint, Watcher


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[Path, queue.SimpleQueue[Hint]]]:
    root = tmp_path / "watched"
    root.mkdir()
    hints: queue.SimpleQueue[Hint] = queue.SimpleQueue()
    watch = WatchConfig.model_validate({"path": root, "observer": "inotify"})
    watcher = Watcher((watch,), hints, threading.Event())
    watcher.start()
    try:
        yield root, hints
    finally:
        watcher.stop()


def hints_until(hints: queue.SimpleQueue[Hint], wanted: Path, timeout: float = 10.0) -> list[Hint]:
    """Every hint up to and including the first one for `wanted`, then whatever follows
    within a short grace period (the other half of a move)."""
    seen: list[Hint] = []
    deadline = time.monotonic() + timeout
    while not any(h.path == wanted for h in seen):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no hint for {wanted}; saw {seen}"
        try:
            seen.append(hints.get(timeout=remaining))
        except queue.Empty:
            continue
    grace = time.monotonic() + 0.3
    while (left := grace - time.monotonic()) > 0:
        try:
            seen.append(hints.get(timeout=left))
        except queue.Empty:
            break
    return seen


def test_rename_within_the_root_marks_the_destination_moved_in(
    watched: tuple[Path, queue.SimpleQueue[Hint]],
) -> None:
    root, hints = watched
    temp = root / ".ckpt_1.pt.tmp"
    temp.write_bytes(b"x")
    temp.rename(root / "ckpt_1.pt")
    seen = hints_until(hints, root / "ckpt_1.pt")
    assert Hint(0, root / "ckpt_1.pt", moved_in=True) in seen
    assert all(not h.moved_in for h in seen if h.path == temp)


def test_rename_in_from_outside_the_root_is_a_move_in_too(
    watched: tuple[Path, queue.SimpleQueue[Hint]], tmp_path: Path
) -> None:
    """`torch.save` to a scratch directory, then `mv` into place: inotify reports only the
    IN_MOVED_TO half, which must still count as the rename that commits the file."""
    root, hints = watched
    outside = tmp_path / "scratch.pt"
    outside.write_bytes(b"x")
    outside.rename(root / "ckpt_2.pt")
    seen = hints_until(hints, root / "ckpt_2.pt")
    assert Hint(0, root / "ckpt_2.pt", moved_in=True) in seen
    assert all(h.path != outside for h in seen)


def test_rename_out_of_the_root_hints_only_the_source(
    watched: tuple[Path, queue.SimpleQueue[Hint]], tmp_path: Path
) -> None:
    root, hints = watched
    inside = root / "ckpt_3.pt"
    inside.write_bytes(b"x")
    hints_until(hints, inside)
    inside.rename(tmp_path / "elsewhere.pt")
    seen = hints_until(hints, inside)
    assert all(h.path.is_relative_to(root) for h in seen), seen
    assert not any(h.moved_in for h in seen)
