"""Find a launcher's processes through /proc: the worker of one rank, to signal or kill it in a test."""

from __future__ import annotations

import os
import time


def _children(pid: int) -> list[int]:
    kids = []
    task_dir = f"/proc/{pid}/task"
    try:
        for tid in os.listdir(task_dir):
            with open(f"{task_dir}/{tid}/children") as f:
                kids += [int(p) for p in f.read().split()]
    except OSError:
        pass
    return kids


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children first)."""
    found, pending = [], [pid]
    while pending:
        kids = _children(pending.pop())
        found += kids
        pending += kids
    return found


def environ(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            items = f.read().split(b"\0")
    except OSError:
        return {}
    pairs = (item.decode(errors="replace").split("=", 1) for item in items if b"=" in item)
    return dict(pairs)


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def worker_pid(root: int, rank: int, timeout: float = 60.0) -> int:
    """The flame.train worker with global ``rank`` below process ``root`` (waits until it exists)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for pid in descendants(root):
            args = cmdline(pid)
            if "flame.train" in args and "torch.distributed.run" not in args and environ(pid).get("RANK") == str(rank):
                return pid
        time.sleep(0.05)
    raise TimeoutError(f"no flame.train worker with RANK={rank} below pid {root} after {timeout} s")


def wait_for(predicate, timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll ``predicate`` until it is true; fail the test after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
