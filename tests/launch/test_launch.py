"""train.sh as a launcher: two "nodes" on localhost, a restart after a killed rank, a preemption signal.

Each test runs the launch tests' job (see conftest.py) and compares it with the uninterrupted
reference run: identical losses at every step.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess

import pytest

from tests.helpers import ROOT, env, free_port, read_metrics
from tests.launch.conftest import STEPS, losses, train_sh
from tests.launch.procs import wait_for, worker_pid


def popen(cmd: list[str], log, **extra_env: str) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=env(**extra_env), stdout=log, stderr=subprocess.STDOUT, text=True)


def num_records(dump) -> int:
    path = dump / "metrics.jsonl"
    return sum(1 for _ in open(path)) if path.exists() else 0


@pytest.mark.slow  # CI's slow tier: two torchrun agents, ~45 s
def test_two_nodes_on_localhost_match_two_ranks_on_one_node(launch_flags, reference, tmp_path):
    """NNODE=2 x NGPU=1 (two train.sh processes, c10d rendezvous) trains exactly like NGPU=2."""
    dump, port = tmp_path / "run", str(free_port())
    logs = [open(tmp_path / f"node{rank}.log", "w+") for rank in (0, 1)]
    cluster = dict(NNODE="2", NGPU="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    nodes = [popen(train_sh(launch_flags(dump)), logs[rank], NODE_RANK=str(rank), **cluster) for rank in (0, 1)]
    codes = [node.wait(timeout=300) for node in nodes]
    outputs = [log.seek(0) or log.read() for log in logs]
    assert codes == [0, 0], outputs
    for output in outputs:  # each node ran one worker of a 2-rank world
        assert "2 node(s) x 1 process(es)" in output and "world 2 (dp_replicate 1, dp_shard 2)" in output
    records = read_metrics(dump)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    # Two ranks either way: the loss and gradient reductions add the same two numbers.
    assert losses(records) == losses(reference)
    assert [r["grad_norm"] for r in records] == [r["grad_norm"] for r in reference]


@pytest.mark.slow  # CI's slow tier: a 2-rank run killed and restarted by torchrun, ~42 s
def test_killed_rank_restarts_from_the_latest_checkpoint(launch_flags, reference, tmp_path):
    """MAX_RESTARTS=1: SIGKILL of one worker after step-5 is saved restarts both; the run resumes and ends equal."""
    dump = tmp_path / "run"
    args = launch_flags(dump, checkpoint__enable_checkpoint="true", checkpoint__interval=5)
    with open(tmp_path / "train.log", "w+") as log:
        launcher = popen(train_sh(args), log, NGPU="2", MAX_RESTARTS="1")
        victim = worker_pid(launcher.pid, rank=1)
        wait_for(lambda: (dump / "checkpoint" / "step-5" / ".metadata").exists(), 120, "checkpoint step-5")
        os.kill(victim, signal.SIGKILL)
        killed_after = num_records(dump)
        code = launcher.wait(timeout=300)
        output = log.seek(0) or log.read()
    assert code == 0, output
    assert killed_after < STEPS  # the kill happened mid-run
    resumed = [int(s) for s in re.findall(r"resumed at step (\d+)", output)]
    assert len(resumed) == 1 and 5 <= resumed[0] <= killed_after, output
    attempts = {p.name for p in (dump / "logs").glob("*/attempt_*")}
    assert attempts == {"attempt_0", "attempt_1"}  # torchrun restarted the workers once
    records = read_metrics(dump)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert losses(records) == losses(reference)


@pytest.mark.slow  # CI's slow tier: ~18 s
def test_signal_to_one_rank_stops_every_rank_at_the_same_step(launch_flags, tmp_path):
    """SIGUSR1 to rank 1's worker only: both ranks stop after the same step, save it, train.sh exits 75."""
    dump = tmp_path / "run"
    args = launch_flags(dump, checkpoint__enable_checkpoint="true", checkpoint__interval=1000)
    with open(tmp_path / "train.log", "w+") as log:
        launcher = popen(train_sh(args), log, NGPU="2")
        victim = worker_pid(launcher.pid, rank=1)
        wait_for(lambda: num_records(dump) >= 3, 120, "3 logged steps")
        os.kill(victim, signal.SIGUSR1)
        code = launcher.wait(timeout=300)
        output = log.seek(0) or log.read()
    assert code == 75, output
    marker = json.loads((dump / "preempted.json").read_text())
    step = marker["step"]
    assert 3 <= step < STEPS and marker["signal"] == "SIGUSR1"
    # Rank 1 got the signal, rank 0 learned it through the all-reduce; both stopped after `step`.
    rank_logs = {
        rank: "".join(p.read_text() for p in (dump / "logs").glob(f"*/attempt_0/{rank}/stdout.log")) for rank in (0, 1)
    }
    assert f"SIGUSR1 (received here): stopping after step {step}" in rank_logs[1]
    assert f"SIGUSR1 (received by another rank): stopping after step {step}" in rank_logs[0]
    for rank in (0, 1):
        assert f"stopped by SIGUSR1 after step {step}" in rank_logs[rank]
    checkpoint = dump / "checkpoint"
    assert sorted(p.name for p in checkpoint.iterdir()) == [f"step-{step}"]
    assert (checkpoint / f"step-{step}" / ".metadata").exists()
    assert sorted(p.name for p in (checkpoint / f"step-{step}").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert read_metrics(dump)[-1]["step"] == step
    assert not (dump / "summary.json").exists()  # a stopped session is not a finished run
