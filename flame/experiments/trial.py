"""A trial and what its run folder says about it.

A trial is a normal flame run folder ``<root>/<stage>/<trial id>/`` holding a resolved ``config.toml``
(the schema train.sh takes) and ``trial.json`` (what the experiment knows: stage, contender, params,
lineage, the command), both written by the driver before launch; from then on only the trial writes
there. Its state is read from the folder alone (``summary.json``, ``metrics.jsonl``, complete checkpoints,
``preempted.json``, ``exit.json``), so ``status`` works while another process drives the experiment.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from flame.config.schema import JobConfig

EXIT_PREEMPTED = 75


@dataclass
class Trial:
    stage: str
    id: str
    kind: str
    folder: str
    contender: str | None = None
    params: dict[str, Any] = field(default_factory=dict)  # the values that vary: dotted key -> value
    lineage: dict[str, str] = field(default_factory=dict)  # earlier stage -> trial id
    config: JobConfig | None = None  # train-like kinds: the resolved config
    values: dict[str, Any] = field(default_factory=dict)  # kind-specific inputs (python kwargs, eval model)
    ngpu: int = 1
    nnode: int = 1
    steps: int = 0  # training.steps, for step/steps in the status
    experiment: str = ""  # the experiment's name (trial.json; the trials' W&B group)


@dataclass
class Outcome:
    """A trial as later stages and the status see it."""

    trial: Trial
    status: str  # pending | running | done | failed | preempted
    metric: float | None = None
    step: int = 0
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "done" and self.metric is not None and math.isfinite(self.metric)


def read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def last_records(folder: str, keys: tuple[str, ...] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """The last record of metrics.jsonl and, per key of ``keys``, its last logged value."""
    last: dict[str, Any] = {}
    found: dict[str, Any] = {}
    try:
        with open(os.path.join(folder, "metrics.jsonl")) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:  # a line being written right now
                    continue
                last = record
                found.update({k: record[k] for k in keys if record.get(k) is not None})
    except OSError:
        pass
    return last, found


def metric_value(folder: str, metric: str, summary: dict[str, Any] | None = None) -> float | None:
    """``metric`` from summary.json, else its last value in metrics.jsonl (validation_loss lives there)."""
    summary = read_json(os.path.join(folder, "summary.json")) if summary is None else summary
    if isinstance(summary, dict) and isinstance(summary.get(metric), (int, float)):
        return float(summary[metric])
    _, found = last_records(folder, (metric,))
    value = found.get(metric)
    return float(value) if isinstance(value, (int, float)) else None


def complete_checkpoints(folder: str, config: JobConfig | None) -> list[int]:
    """Steps of the complete checkpoints (``.metadata`` written) of the run in ``folder``."""
    ck_folder = os.path.join(folder, config.checkpoint.folder if config is not None else "checkpoint")
    try:
        names = os.listdir(ck_folder)
    except OSError:
        return []
    steps = [int(m.group(1)) for n in names if (m := re.fullmatch(r"step-(\d+)", n))]
    return sorted(s for s in steps if os.path.exists(os.path.join(ck_folder, f"step-{s}", ".metadata")))


def last_checkpoint(folder: str, config: JobConfig | None) -> str | None:
    steps = complete_checkpoints(folder, config)
    if not steps:
        return None
    return os.path.join(folder, config.checkpoint.folder if config is not None else "checkpoint", f"step-{steps[-1]}")


def inspect(trial: Trial, metric: str) -> Outcome:
    """The trial's state from its folder: done (a summary of a finished run), failed (a non-zero exit that
    is not a preemption), preempted (stopped after a checkpoint, resumable), else pending."""
    folder = trial.folder
    summary = read_json(os.path.join(folder, "summary.json"))
    exit_info = read_json(os.path.join(folder, "exit.json")) or {}
    code = exit_info.get("code")
    last, _ = last_records(folder)
    step = int(last.get("step", 0) or 0)
    finished = isinstance(summary, dict) and (trial.steps == 0 or int(summary.get("steps", -1)) >= trial.steps)
    if finished and code in (None, 0):
        return Outcome(trial, "done", metric_value(folder, metric, summary), max(step, trial.steps), summary, code)
    if code is not None and code not in (0, EXIT_PREEMPTED):
        return Outcome(trial, "failed", None, step, summary or {}, code)
    if os.path.exists(os.path.join(folder, "preempted.json")) or code == EXIT_PREEMPTED:
        return Outcome(trial, "preempted", None, step, {}, code)
    return Outcome(trial, "pending", None, step, {}, code)


def console_logs(folder: str) -> list[str]:
    """The trial's console logs, oldest first: train.log (the local launcher's capture, and a Slurm task's
    own lines) and, on Slurm, train.sbatch's per-node logs of each job (``logs/slurm-<job>-node0.out``)."""
    import glob

    paths = [os.path.join(folder, "train.log"), *glob.glob(os.path.join(folder, "logs", "slurm-*-node0.out"))]
    return sorted((p for p in paths if os.path.isfile(p)), key=os.path.getmtime)


def log_tail(trial: Trial, lines: int = 20) -> str:
    """The last lines of the trial's newest console log, for a failure's record."""
    logs = console_logs(trial.folder)
    if not logs:
        return ""
    with open(logs[-1], errors="replace") as f:
        return "".join(f.readlines()[-lines:])
