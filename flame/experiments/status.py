"""The status of an experiment as one JSON-able object, its table, and the driver's console line.

Status is derived, never stored: the stages are walked read-only over the records and the run folders
(``driver.walk`` in ``readonly`` mode), so it works while another process (a driver, a Slurm controller)
runs the experiment. Trial status: ``pending`` (not started, or interrupted and resumable), ``running``,
``done``, ``failed``, ``masked`` (finished but reduced away: its stage's later stages never see it), and
``planned`` in a dry run.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from flame.experiments.driver import StageState
from flame.experiments.records import Records
from flame.experiments.spec import Experiment


def trial_row(state: StageState, trial, records: Records, planned: bool, metric: str) -> dict[str, Any]:
    from flame.experiments.trial import inspect

    outcome = state.outcomes.get(trial.id) or inspect(trial, metric)
    status = outcome.status if outcome.status in ("done", "failed") else "pending"
    if status == "pending" and records.running(trial.stage, trial.id):
        status = "running"
    if status == "pending" and planned:
        status = "planned"
    if status == "done" and state.view is not None and state.stage.top_k:
        if trial.id not in [o.trial.id for o in state.view.survivors]:
            status = "masked"
    end = records.last("end", trial.stage, trial.id)
    extra = state.scheduler.row(trial.id) if hasattr(state.scheduler, "row") else {}
    if extra.get("status") in ("stopped", "failed") and status == "done":
        status = extra["status"]  # stopped at its rung, or its cool-down fork failed
    row = {
        "id": trial.id,
        "contender": trial.contender,
        "params": trial.params,
        "status": status,
        "step": outcome.step,
        "steps": trial.steps,
        "metric": outcome.metric,
        "dump_folder": trial.folder,
        "lineage": trial.lineage,
        "exit_code": outcome.exit_code,
        "seconds": end.get("seconds") if end else None,
    }
    if extra:  # a scheduled stage: the rung reached (and bracket), steps of the maximum resource
        row.update({k: v for k, v in extra.items() if k != "status"})
    return row


def build(exp: Experiment, states: list[StageState], records: Records, planned: bool = False) -> dict[str, Any]:
    """``{"experiment", "root", "metric", "mode", "stages": [{"name", "kind", "best", "waiting_for",
    "complete", "trials": [...]}]}`` (the shape ``status --json`` prints)."""
    stages = []
    for state in states:
        stage = state.stage
        metric, mode = exp.metric_of(stage)
        trials = state.scheduler.trials() if state.scheduler is not None else []
        rows = [trial_row(state, t, records, planned, metric) for t in trials]
        stages.append(
            {
                "name": stage.name,
                "kind": stage.kind,
                "metric": metric,
                "mode": mode,
                "best": state.view.best.trial.id if state.view is not None and state.view.best else None,
                "complete": state.view is not None,
                "waiting_for": state.waiting,
                "trials": rows,
            }
        )
    return {
        "experiment": exp.name,
        "root": exp.root,
        "metric": exp.metric,
        "mode": exp.mode,
        "driver": driver(records),
        "stages": stages,
    }


def driver(records: Records) -> dict[str, Any]:
    """What carries the experiment on now, from the records: ``{"state", "by", "hint"}``.

    ``state``: ``none`` (never run), ``ended`` (its driver, or last controller, wrote the end: done,
    stopped or interrupted), ``running`` (the local driver's process is alive, or the Slurm controller
    job last submitted is still queued), ``lost`` (that process or job is gone and the experiment is not
    complete: killed, cancelled, crashed; ``hint`` says how to resume), ``unknown`` (a local driver on
    another host, or Slurm not reachable from here)."""
    import os
    import socket

    from flame.experiments.records import job_state, pid_alive

    drivers = [e for e in records.events if e["event"] in ("start", "controller")]
    ends = [e for e in records.events if e["event"] == "experiment"]
    if not drivers:
        return {"state": "none", "by": None, "hint": None}
    last = drivers[-1]
    if ends and ends[-1]["time"] >= last["time"]:
        return {"state": "ended", "by": None, "hint": None, "status": ends[-1].get("status")}
    again = "run the same `python -m flame.experiment run` command again to resume"
    if last["event"] == "controller":
        by = f"Slurm controller job {last['job']}"
        queued = job_state(str(last["job"]))
        if queued is None:
            return {"state": "unknown", "by": by, "hint": "Slurm cannot be asked from here (squeue failed)"}
        if queued:
            return {"state": "running", "by": by, "hint": None}
        return {"state": "lost", "by": by, "hint": f"{by} is no longer queued (cancelled or failed); {again}"}
    by = f"local driver pid {last['pid']} on {last.get('host', '?')}"
    if last["pid"] == os.getpid() and last.get("host") == socket.gethostname():
        return {"state": "running", "by": "this process", "hint": None}
    if last.get("host") != socket.gethostname():
        return {"state": "unknown", "by": by, "hint": None}
    if pid_alive(last["pid"]):
        return {"state": "running", "by": by, "hint": None}
    return {"state": "lost", "by": by, "hint": f"{by} has exited without ending the experiment (killed); {again}"}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ",".join(_fmt(v) for v in value)
    return str(value)


def table(status: dict[str, Any]) -> str:
    """The plain table: one block per stage, one line per trial, the best marked with '*'."""
    lines = [f"experiment {status['experiment']} in {status['root']}"]
    for stage in status["stages"]:
        head = f"stage {stage['name']} ({stage['kind']}, {stage['metric']} {stage['mode']})"
        if stage["waiting_for"]:
            lines.append(f"{head}: waits for {', '.join(stage['waiting_for'])}")
            continue
        counts: dict[str, int] = {}
        for t in stage["trials"]:
            counts[t["status"]] = counts.get(t["status"], 0) + 1
        lines.append(
            f"{head}: {len(stage['trials'])} trials, " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        )
        rungs = any("rung" in t for t in stage["trials"])
        rows = [["", "trial", "contender", "status", "step", "metric", "params"] + (["rung"] if rungs else [])]
        for t in stage["trials"]:
            params = " ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in t["params"].items())
            metric = _fmt(t["metric"]) if t["metric"] is not None else "-"
            step = f"{t['step']}/{t['steps']}" if t["steps"] else str(t["step"] or "-")
            mark = "*" if t["id"] == stage["best"] else ""
            rung = (
                []
                if not rungs
                else [str(t.get("rung", "-")) + (f" (bracket {t['bracket']})" if "bracket" in t else "")]
            )
            rows.append([mark, t["id"], t["contender"] or "-", t["status"], step, metric, params, *rung])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    d = status.get("driver") or {}
    if d.get("state") == "running" and d["by"] != "this process":  # the driver's own table needs no such line
        lines.append(f"driven by {d['by']}")
    elif d.get("state") == "lost":
        lines.append(f"not running: {d['hint']}")
    return "\n".join(lines)


class Console:
    """Event lines, and on a terminal one refreshing status line (done/running/failed, ETA)."""

    def __init__(self, stream=None, line=None) -> None:
        self.stream = stream or sys.stdout
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.line = line  # () -> str, the status line
        self._last = 0.0
        self._shown = False

    def __call__(self, message: str | None = None, event: bool = False) -> None:
        if message is not None:
            if self._shown:
                self.stream.write("\r\033[K")
                self._shown = False
            self.stream.write(f"{time.strftime('%H:%M:%S')} {message}\n")
            if not self.tty and event and self.line is not None:
                self.stream.write(f"{time.strftime('%H:%M:%S')} {self.line()}\n")
        if self.tty and self.line is not None and (message is not None or time.monotonic() - self._last > 1.0):
            self.stream.write("\r\033[K" + self.line())
            self._shown = True
            self._last = time.monotonic()
        self.stream.flush()

    def close(self) -> None:
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()
