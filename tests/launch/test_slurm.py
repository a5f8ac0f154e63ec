"""scripts/slurm/train.sbatch on a real (single-node) Slurm cluster: preemption -> checkpoint -> requeue.

`scancel --signal=USR1` reaches every process of the running job step; the ranks stop after the same
step, save it, and the batch script requeues the job; the next run of the script resumes from that
checkpoint and finishes with exactly the losses of the uninterrupted reference run.

Slurm holds a requeued job for ``cred_expire + 1`` seconds (121 s by default: the node has revoked the
job's credential until then, and releasing it early makes it fail with "Job credential revoked"). The
default test therefore checks that the job was requeued, cancels the held copy and submits the same
script with the same arguments again (what the requeued run would execute); the ``slow`` test waits
for Slurm to run the requeued job itself.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import PYTHON, ROOT, read_metrics, run
from tests.launch.conftest import STEPS, losses
from tests.launch.procs import wait_for

SBATCH = ROOT / "scripts" / "slurm" / "train.sbatch"
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")


def job_field(job: str, name: str) -> str:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
    match = re.search(rf"\b{name}=(\S*)", out)
    return match.group(1) if match else ""


def wait_for_state(job: str, states: tuple[str, ...], timeout: float) -> str:
    end = time.monotonic() + timeout
    while (state := job_field(job, "JobState")) not in states:
        if time.monotonic() > end or (state in FINAL_STATES and state not in states):
            subprocess.run(["scancel", job], capture_output=True)
            raise AssertionError(f"job {job} is {state}, not {states}, after {timeout} s")
        time.sleep(0.5)
    return state


def submit(dump: Path, args: list[str]) -> str:
    # Command-line options override the script's #SBATCH lines: one CPU-only node here.
    options = ["--parsable", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1", f"--output={dump}/batch-%j.out"]
    out = run(
        ["sbatch", *options, str(SBATCH), *args],
        NGPU="2",
        PYTHON=PYTHON,  # the job inherits this environment: an absolute interpreter path
        FLAME_ROOT=str(ROOT),
        NO_COLOR="",  # colours as a user gets them: train.sh sees a file and turns them off
    )
    return out.stdout.strip().split(";")[0]


def preempt(job: str, dump: Path) -> int:
    """Signal the running job after 3 steps; wait until it is requeued; the step its ranks stopped after."""
    metrics = dump / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, 180, "3 steps", 0.1)
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    wait_for(lambda: job_field(job, "Restarts") == "1", 120, f"job {job} requeued", 0.2)
    node_log = (dump / "logs" / f"slurm-{job}-node0.out").read_text()
    rank_logs = "".join(p.read_text() for p in (dump / "logs").glob(f"flame-{job}_*/attempt_0/*/stdout.log"))
    stopped = re.findall(r"stopped by SIGUSR1 after step (\d+)", rank_logs)
    assert len(stopped) == 2 and stopped[0] == stopped[1], rank_logs  # rank 0 and rank 1, same step
    step = int(stopped[0])
    assert 3 <= step < STEPS
    batch_log = (dump / f"batch-{job}.out").read_text()
    assert f'"step": {step}, "signal": "SIGUSR1"' in batch_log and f"requeueing job {job}" in batch_log
    assert "exit code 75" in node_log  # train.sh's "preempted" exit code
    assert re.search(rf"step +3/{STEPS}", node_log) and "\x1b" not in node_log  # the console lines, plain text
    assert (dump / "checkpoint" / f"step-{step}" / ".metadata").exists()
    return step


def check_resumed_exactly(job: str, dump: Path, step: int, reference: list[dict]) -> None:
    assert job_field(job, "ExitCode") == "0:0"
    assert f"resumed at step {step}" in (dump / "logs" / f"slurm-{job}-node0.out").read_text()
    assert not (dump / "preempted.json").exists()
    records = read_metrics(dump)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert losses(records) == losses(reference)


@pytest.mark.slow  # CI's slow tier: two 2-rank runs, ~64 s
def test_usr1_stops_saves_requeues_and_the_next_run_resumes_exactly(
    slurm_cluster, launch_flags, reference, tmp_path
):  # fmt: skip
    dump = tmp_path / "run"
    dump.mkdir()
    args = launch_flags(dump, checkpoint__enable_checkpoint="true", checkpoint__interval=1000)
    job = submit(dump, args)
    try:
        step = preempt(job, dump)
        assert wait_for_state(job, ("PENDING",), 60) == "PENDING"  # requeued, held by Slurm for now
        wait_for(lambda: job_field(job, "Reason") == "BeginTime", 30, f"job {job} held (BeginTime)", 0.2)
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    again = submit(dump, args)  # what the requeued job runs: the same script, the same arguments
    try:
        assert wait_for_state(again, ("COMPLETED",), 300) == "COMPLETED"
    finally:
        subprocess.run(["scancel", again], capture_output=True)
    check_resumed_exactly(again, dump, step, reference)


@pytest.mark.slow
def test_usr1_requeued_job_runs_again_and_resumes_exactly(slurm_cluster, launch_flags, reference, tmp_path):
    """The whole cycle by Slurm itself, including its two-minute hold of the requeued job."""
    dump = tmp_path / "run"
    dump.mkdir()
    args = launch_flags(dump, checkpoint__enable_checkpoint="true", checkpoint__interval=1000)
    job = submit(dump, args)
    try:
        step = preempt(job, dump)
        assert wait_for_state(job, ("COMPLETED",), 420) == "COMPLETED"
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    assert job_field(job, "Restarts") == "1"
    assert "(restart 1)" in (dump / f"batch-{job}.out").read_text()
    check_resumed_exactly(job, dump, step, reference)
