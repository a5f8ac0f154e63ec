"""The local launcher: trials as processes on this machine, ``max_parallel`` at a time.

Each trial runs its kind's command (``bash train.sh --job.config_file <trial>/config.toml`` for training)
with ``NGPU`` from its stage, its console output in ``<trial>/train.log``, inside a small shell that
writes ``<trial>/exit.json`` (its exit code) when it ends. On a GPU machine the trials get disjoint
``CUDA_VISIBLE_DEVICES``; on a CPU-only one disjoint shares of the cores (``OMP_NUM_THREADS`` = cores /
(max_parallel x NGPU)). Trials run in their own session with a parent-death signal: when the driver
dies, even by SIGKILL, each gets SIGTERM, saves a checkpoint and exits 75, and ``run`` again resumes it.
SIGTERM / SIGINT to the driver stop the trials the same way and end the driver with exit code 75.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from flame.config.loader import save_toml
from flame.experiments.hooks import WorkItem
from flame.experiments.kinds import ROOT, stage_kind
from flame.experiments.records import Records, pid_alive
from flame.experiments.spec import Experiment
from flame.experiments.trial import Outcome, Trial, inspect, log_tail

# Runs the trial's command, forwards stop signals to it, and leaves its exit code in exit.json. A trial
# that was asked to stop and did not finish counts as preempted (75) whatever its code: a signal that came
# before its own handlers were installed (during start-up) killed it with 143, and it is resumable.
WRAPPER = (
    'rm -f "$0"; "$@" & c=$!; trap "t=1; kill -TERM $c 2>/dev/null" TERM INT HUP; wait $c; s=$?; '
    'while kill -0 $c 2>/dev/null; do wait $c; s=$?; done; [ -n "${t:-}" ] && [ $s -ne 0 ] && s=75; '
    'printf \'{"code": %d}\\n\' $s > "$0"; exit $s'
)


def _parent_death_signal() -> None:
    """In the child: get SIGTERM when the driver dies (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def describe(trial: Trial) -> dict[str, Any]:
    """trial.json's content: what the experiment knows about a trial, and its command."""
    return {
        "id": trial.id,
        "experiment": trial.experiment,  # the trial's W&B group (flame.components.metrics.wandb_grouping)
        "stage": trial.stage,
        "kind": trial.kind,
        "contender": trial.contender,
        "params": trial.params,
        "lineage": trial.lineage,
        "values": trial.values,
        "ngpu": trial.ngpu,
        "nnode": trial.nnode,
        "command": stage_kind(trial.kind).command(trial),
    }


def write_trial_files(item: WorkItem) -> None:
    """config.toml and trial.json in the trial's folder (by the driver, before the trial starts)."""
    trial = item.trial
    os.makedirs(trial.folder, exist_ok=True)
    if trial.config is not None:
        save_toml(trial.config, os.path.join(trial.folder, "config.toml"))
    tmp = os.path.join(trial.folder, "trial.json.tmp")
    with open(tmp, "w") as f:
        json.dump(describe(trial), f, indent=2, default=str)
    os.replace(tmp, os.path.join(trial.folder, "trial.json"))


def visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d for d in env.split(",") if d.strip()]
    if not any(n.startswith("nvidia") and n[6:].isdigit() for n in os.listdir("/dev")):
        return []
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


@dataclass
class Running:
    item: WorkItem
    proc: subprocess.Popen
    start: float
    gpus: list[str]
    log: Any


class LocalLauncher:
    def __init__(self, exp: Experiment, records: Records, echo=print) -> None:
        self.max_parallel = exp.max_parallel
        self.metrics = {stage.name: exp.metric_of(stage)[0] for stage in exp.stages}
        self.records = records
        self.echo = echo
        self.gpus = visible_gpus()
        self.free_gpus = list(self.gpus)
        self.cores = len(os.sched_getaffinity(0))
        self.running: dict[str, Running] = {}
        self.stopping = False
        self.durations: list[float] = []
        self.counts = {"done": 0, "failed": 0}

    # ---- resources --------------------------------------------------------------------------------

    def can_start(self, item: WorkItem) -> bool:
        if self.stopping or len(self.running) >= self.max_parallel:
            return False
        return not self.gpus or len(self.free_gpus) >= item.trial.ngpu

    def why_not(self, item: WorkItem) -> str:
        return f"trial {item.trial.id} needs {item.trial.ngpu} GPUs; this machine has {len(self.gpus)} ({','.join(self.gpus)})"

    def _env(self, item: WorkItem, gpus: list[str]) -> dict[str, str]:
        env = dict(os.environ)
        env["NGPU"] = str(item.trial.ngpu)
        env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("PYTHON", sys.executable)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        else:
            env["OMP_NUM_THREADS"] = str(max(1, self.cores // (self.max_parallel * item.trial.ngpu)))
        return env

    # ---- running ----------------------------------------------------------------------------------

    def start(self, item: WorkItem) -> None:
        trial = item.trial
        previous = self.records.last("launch", trial.stage, item.key)
        if previous and previous.get("host") == socket.gethostname() and pid_alive(previous.get("pid", -1)):
            self.echo(f"{trial.stage}/{item.key}: waiting for its earlier process {previous['pid']} to stop")
            while pid_alive(previous["pid"]):
                time.sleep(0.2)
        write_trial_files(item)
        gpus = self.free_gpus[: trial.ngpu] if self.gpus else []
        self.free_gpus = self.free_gpus[len(gpus) :]
        log = open(os.path.join(trial.folder, "train.log"), "ab")
        command = stage_kind(trial.kind).command(trial)
        proc = subprocess.Popen(
            ["bash", "-c", WRAPPER, os.path.join(trial.folder, "exit.json"), *command],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self._env(item, gpus),
            start_new_session=True,  # a Ctrl-C in the terminal reaches the driver, which stops trials in order
            preexec_fn=_parent_death_signal,
        )
        self.running[item.key] = Running(item, proc, time.monotonic(), gpus, log)
        attempt = sum(
            e["event"] == "launch" and e["stage"] == trial.stage and e["trial"] == item.key for e in self.records.events
        )
        self.records.append(
            "launch", stage=trial.stage, trial=item.key, pid=proc.pid, host=socket.gethostname(), attempt=attempt + 1
        )
        self.echo(f"{trial.stage}/{item.key}: started" + (" (resuming)" if attempt else ""), event=True)

    def wait(self, poll: float = 0.1) -> list[tuple[WorkItem, Outcome]]:
        """Block until at least one trial ended (or a stop was requested); their outcomes."""
        ended: list[tuple[WorkItem, Outcome]] = []
        while not ended and not self.stopping:
            for key, run in list(self.running.items()):
                code = run.proc.poll()
                if code is None:
                    continue
                del self.running[key]
                run.log.close()
                self.free_gpus += run.gpus
                ended.append((run.item, self._ended(run, code)))
            if not ended:
                self.echo(None)  # refresh the status line
                time.sleep(poll)
        return ended

    def _ended(self, run: Running, code: int) -> Outcome:
        trial = run.item.trial
        outcome = inspect(trial, self.metrics[trial.stage])
        outcome.exit_code = code
        if code != 0 and outcome.status == "done":
            outcome.status = "failed"
        if code == 0 and outcome.status != "done":  # exited 0 but left no finished run (e.g. killed kernel)
            outcome.status = "failed"
        if code == 75 or (code != 0 and self.stopping):
            outcome.status = "preempted"
        seconds = time.monotonic() - run.start
        if outcome.status in ("done", "failed"):
            self.counts[outcome.status] += 1
            self.durations.append(seconds)
        tail = log_tail(trial) if outcome.status == "failed" else ""
        self.records.append(
            "end",
            stage=trial.stage,
            trial=run.item.key,
            code=code,
            status=outcome.status,
            metric=outcome.metric,
            seconds=seconds,
            tail=tail,
        )
        shown = f"{outcome.metric:.4g}" if outcome.metric is not None else "-"
        self.echo(
            f"{trial.stage}/{run.item.key}: {outcome.status} in {seconds:.1f} s (exit {code}, metric {shown})",
            event=True,
        )
        return outcome

    def stop_all(self, timeout: float = 300.0) -> None:
        """SIGTERM every running trial (each saves a checkpoint and exits 75) and wait for them."""
        self.stopping = True
        for run in self.running.values():
            try:
                os.killpg(run.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        end = time.monotonic() + timeout
        while self.running and time.monotonic() < end:
            for key, run in list(self.running.items()):
                code = run.proc.poll()
                if code is not None:
                    del self.running[key]
                    run.log.close()
                    self._ended(run, code)
            time.sleep(0.1)

    def eta_seconds(self, pending: int) -> float | None:
        if not self.durations:
            return None
        mean = sum(self.durations) / len(self.durations)
        now = time.monotonic()
        left = [max(mean - (now - r.start), 0.0) for r in self.running.values()]
        return (max(left) if left else 0.0) + mean * -(-pending // self.max_parallel)
