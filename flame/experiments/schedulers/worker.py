"""ASHA on Slurm: each array task is a worker that claims the next piece of work from the experiment folder.

``python -m flame.experiments.schedulers.worker SPEC STAGE`` (submitted by the controller job as an
array of ``max_parallel`` tasks). A worker loops: under an exclusive lock on ``<root>/<stage>/claims.lock``
it rebuilds the stage's scheduler from the claim files and the run folders (read-only: it writes no
records and no decisions) and takes one piece: a piece another worker claimed whose worker is gone (a
preempted or cancelled task: it resumes from its checkpoint), else a cool-down fork or continuation
nobody claimed yet, else ASHA's next choice (a promotion or a new trial), written as a claim file
before the lock is released; then it runs the piece outside the lock and leaves ``exit.json`` in its
folder. No two workers take the same piece. It stops when the stage is done. The controller job that
runs after the array is the one writer of ``records.jsonl`` and ``decisions.jsonl``: it replays the
claims in order, so its decisions are the ones the workers took.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from typing import Any

from flame.experiments.schedulers.files import read_claims, write_claim


def worker_id() -> str:
    job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{job}_{task}" if job and task is not None else f"pid {os.getpid()}"


def alive(worker: str, me: str) -> bool:
    """Whether the worker that holds a claim still runs (this worker's own earlier claim is not alive:
    the task was requeued and takes its piece again)."""
    if worker == me:
        return False
    if worker.startswith("pid "):
        from flame.experiments.records import pid_alive

        return pid_alive(int(worker[4:]))
    from flame.experiments.records import job_active

    return job_active(worker)


def claim(exp: Any, stage_name: str, me: str) -> tuple[Any, bool]:
    """(the work item this worker takes or None, whether the stage is done). Call under the lock."""
    from flame.experiments.driver import walk
    from flame.experiments.records import Records

    states = walk(exp, Records(exp.root), "readonly")
    state = next(s for s in states if s.stage.name == stage_name)
    sched = state.scheduler
    if sched is None or sched.done():
        return None, True
    latest: dict[str, dict[str, Any]] = {}
    for c in read_claims(sched.claims_folder):
        latest[c["key"]] = c
    for item in state.to_launch:
        held = latest.get(item.key)
        if held is None or not alive(held["worker"], me):
            write_claim(sched.claims_folder, {"key": item.key, "worker": me, "retake": held is not None})
            return item, False
    sched.live = True
    sched.worker = me
    items = sched.ready(1)
    return (items[0], False) if items else (None, sched.done())


def run_piece(exp: Any, item: Any) -> int:
    """Run one piece like an array task of the Slurm launcher (train.sbatch for training)."""
    from flame.experiments.local import write_trial_files
    from flame.experiments.slurm import run_task, task_line

    write_trial_files(item)
    tasks = os.path.join(os.path.dirname(item.folder), f".{os.path.basename(item.folder)}.task")
    with open(tasks, "w") as f:
        f.write(task_line(item))
    return run_task(tasks, 0)


def main(argv: list[str] | None = None) -> int:
    from flame.experiments.spec import resolve

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m flame.experiments.schedulers.worker SPEC STAGE", file=sys.stderr)
        return 2
    exp = resolve(argv[0], "slurm")
    stage = argv[1]
    me = worker_id()
    lock_path = os.path.join(exp.root, stage, "claims.lock")
    os.makedirs(os.path.dirname(lock_path), exist_ok=True)
    while True:
        with open(lock_path, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                item, done = claim(exp, stage, me)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        if done:
            return 0
        if item is None:  # every piece is held by a running worker: wait for one to end
            time.sleep(1.0)
            continue
        print(f"worker {me}: {item.key}", flush=True)
        run_piece(exp, item)
        try:
            with open(os.path.join(item.folder, "exit.json")) as f:
                code = json.load(f).get("code")
        except (OSError, ValueError):
            code = None
        if code == 75:  # stopped after saving (preempted, cancelled): this worker ends, the piece is taken again
            return 0


if __name__ == "__main__":
    sys.exit(main())
