"""The experiment's own records: ``<root>/records.jsonl``, appended by one process only.

The writer is the local driver, or on Slurm the controller job (one at a time: each controller runs
after the previous array ended). Trials never write here; they write their own run folders. A record
line is written whole and fsync'ed, and a reader skips a torn last line (a writer killed mid-line).

Events: ``ask`` (a search round's sampled points, recorded before any of its trials is launched, so a
resumed driver launches exactly these), ``launch`` (a trial started: pid and host, or a Slurm job),
``end`` (exit code, status, metric, wall seconds, the tail of a failed trial's log), ``stage`` (a stage
complete: its survivors), ``experiment`` (the experiment ended, or stopped with a message).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from typing import Any

from flame.config.errors import ConfigError

RECORDS = "records.jsonl"


class Records:
    def __init__(self, root: str, writable: bool = False) -> None:
        self.root = root
        self.path = os.path.join(root, RECORDS)
        self.writable = writable
        self.events: list[dict[str, Any]] = []
        try:
            with open(self.path) as f:
                for line in f:
                    try:
                        self.events.append(json.loads(line))
                    except ValueError:
                        continue  # a torn line
        except OSError:
            pass

    def append(self, event: str, **data: Any) -> dict[str, Any]:
        record = {"event": event, "time": time.time(), **data}
        self.events.append(record)
        if self.writable:
            os.makedirs(self.root, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(record, default=str) + "\n")
                f.flush()
                os.fsync(f.fileno())
        return record

    def asks(self, stage: str, group: str, round_index: int) -> list[dict[str, Any]] | None:
        for e in self.events:
            if e["event"] == "ask" and e["stage"] == stage and e["group"] == group and e["round"] == round_index:
                return e["asks"]
        return None

    def last(self, event: str, stage: str, trial: str) -> dict[str, Any] | None:
        for e in reversed(self.events):
            if e["event"] == event and e.get("stage") == stage and e.get("trial") == trial:
                return e
        return None

    def running(self, stage: str, trial: str) -> bool:
        """Launched and not ended, by a process still alive on this host (or a Slurm job not finished)."""
        launch = self.last("launch", stage, trial)
        end = self.last("end", stage, trial)
        if launch is None or (end is not None and end["time"] >= launch["time"]):
            return False
        if "pid" in launch and launch.get("host") == socket.gethostname():
            return pid_alive(launch["pid"])
        if "job" in launch:
            return job_active(str(launch["job"]))
        return False


# Until when (time.monotonic) Slurm's controller is taken as unreachable: squeue takes ~18 s to give up,
# so a status of many trials asks it once a minute, not once per trial.
_slurm_unreachable_until = 0.0


def job_state(job: str) -> bool | None:
    """Whether a Slurm job (or array task ``ID_i``) is still pending or running: True, False (ended, or
    unknown to Slurm), or None when Slurm cannot be asked (no client here, its controller unreachable)."""
    global _slurm_unreachable_until
    import subprocess
    import time

    if time.monotonic() < _slurm_unreachable_until:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True)
    except OSError:  # no Slurm client here (the folder was driven on a cluster)
        return None
    if out.returncode != 0 and "Unable to contact" in out.stderr:
        _slurm_unreachable_until = time.monotonic() + 60
        return None
    return out.returncode == 0 and bool(out.stdout.strip())


def job_active(job: str) -> bool:
    """``job_state`` is True: the job is known to be pending or running."""
    return job_state(job) is True


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DriverLock:
    """An exclusive lock on ``<root>/driver.lock``: one driver (or controller job) at a time."""

    def __init__(self, root: str) -> None:
        self.path = os.path.join(root, "driver.lock")
        self.file: Any = None

    def __enter__(self) -> DriverLock:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.file = open(self.path, "a+")  # held until __exit__
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise ConfigError(
                f"{os.path.dirname(self.path)}: another driver is running this experiment ({holder}); "
                "watch it with `python -m flame.experiment status`"
            ) from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}")
        self.file.flush()
        return self

    def __exit__(self, *exc: Any) -> None:
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()
