"""``comm.init_timeout_seconds`` and ``comm.train_timeout_seconds`` are applied for real.

Ranks are started as plain processes with the torch.distributed environment variables (no torchrun
agent), so the test can stall one of them (SIGSTOP, like a hung node) and time how long the other
waits before it fails with flame's one-line timeout message.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.helpers import PYTHON, ROOT, env, free_port
from tests.launch.procs import wait_for


def start_rank(args: list[str], rank: int, world_size: int, port: int) -> subprocess.Popen:
    ranks = dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    return subprocess.Popen(
        [PYTHON, "-m", "flame.train", *args],
        cwd=ROOT,
        env=env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **ranks),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow  # CI's slow tier: ~16 s
def test_stalled_rank_makes_the_other_fail_within_the_train_timeout(launch_flags, tmp_path):
    """After the first step the 3 s train timeout applies (not the 60 s init timeout): a peer stopped
    with SIGSTOP makes rank 0 fail 3 s (plus at most one step) later, with one clear message."""
    dump = tmp_path / "run"
    args = launch_flags(
        dump, training__steps=100000, comm__train_timeout_seconds=3, comm__init_timeout_seconds=60
    )  # fmt: skip
    port = free_port()
    ranks = [start_rank(args, rank, 2, port) for rank in (0, 1)]
    try:
        metrics = dump / "metrics.jsonl"
        wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, 120, "3 steps")
        os.kill(ranks[1].pid, signal.SIGSTOP)
        stalled_at = time.monotonic()
        _, stderr = ranks[0].communicate(timeout=60)
        waited = time.monotonic() - stalled_at
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()
    assert ranks[0].returncode == 1, stderr
    assert 3.0 <= waited < 15.0, (waited, stderr)
    assert "flame: error: a collective operation timed out" in stderr
    assert "--comm.train_timeout_seconds 3" in stderr
    assert "Traceback" not in stderr


def test_missing_rank_makes_startup_fail_within_the_init_timeout(launch_flags, tmp_path):
    """Rank 1 never starts: rank 0 gives up after --comm.init_timeout_seconds 4 (the default is 300 s)."""
    args = launch_flags(tmp_path / "run", comm__init_timeout_seconds=4)
    started = time.monotonic()
    rank0 = start_rank(args, 0, 2, free_port())
    _, stderr = rank0.communicate(timeout=120)
    elapsed = time.monotonic() - started
    assert rank0.returncode == 1, stderr
    assert 4.0 <= elapsed < 40.0, (elapsed, stderr)  # start-up (imports) plus the 4 s wait
    assert "timed out" in stderr and "1/2 clients joined" in stderr
    assert "--comm.init_timeout_seconds 4" in stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "run").exists()  # it failed before writing anything
