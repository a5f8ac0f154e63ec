"""Hooks for what plugs into experiments: trial schedulers on a stage, and reports when an experiment ends.

**Schedulers.** A stage's ``scheduler = { kind = "...", ... }`` names a factory registered here. The
driver runs a stage as a loop over *work items* that its scheduler hands out (``ready``), launching each
(max_parallel at a time locally, as array tasks on Slurm) and telling the scheduler each outcome
(``finished``) until it is ``done``. A work item is a trial (a run folder and its config) that may be a
new trial, the continuation of one to a larger ``training.steps``, or a fork into another folder; the
scheduler decides which and when. Without ``scheduler`` a stage runs ``RunOnce``: every trial once, the
search asked in rounds (``flame/experiments/schedule.py``). A scheduler must be rebuildable from the
experiment's records and the run folders alone: the local driver after a kill, and the Slurm controller
job every time it runs, build it again and replay what is finished.

**Reports.** Functions registered with ``register_report`` are called with the experiment spec and its
``status`` object when an experiment ends (the driver finished its last stage), after the plain summary
table; an exception in a report is printed and does not fail the experiment.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from flame.experiments.trial import Outcome, Trial


@dataclass
class WorkItem:
    """One piece of work: run ``trial`` (its folder and command) until it exits."""

    trial: Trial
    key: str  # unique within the stage; the trial id for plain trials, e.g. "<id>@rung2" for a rung

    @property
    def folder(self) -> str:
        return self.trial.folder


class Scheduler(Protocol):
    def ready(self) -> list[WorkItem]:
        """Items that may start now (called whenever an item finished, and at the start)."""

    def finished(self, item: WorkItem, outcome: Outcome) -> None:
        """``item`` ended with ``outcome`` (done, failed, or preempted: then it is handed out again)."""

    def done(self) -> bool:
        """True when the stage has nothing left to run."""

    def trials(self) -> list[Trial]:
        """Every trial of the stage known so far (for status, reduce and links)."""


# kind -> (check(stage, where, add), factory(context) -> Scheduler)
_SCHEDULERS: dict[str, tuple[Callable[..., None], Callable[..., Scheduler]]] = {}
_REPORTS: list[Callable[[Any, dict[str, Any]], Any]] = []
# Imported (by name) on the first lookup of a scheduler kind: they register theirs (sha, hyperband, asha).
SCHEDULER_MODULES = ["flame.experiments.schedulers"]


def _load_schedulers() -> None:
    import importlib

    for module in SCHEDULER_MODULES:
        importlib.import_module(module)


def register_scheduler(kind: str, check: Callable[..., None], factory: Callable[..., Scheduler]) -> None:
    """Make ``scheduler = { kind = <kind>, ... }`` available: ``check(stage, where, add)`` reports bad
    keys before any work (``add(where, message)``), ``factory(context)`` builds the stage's scheduler."""
    _SCHEDULERS[kind] = (check, factory)


def check_scheduler(stage: Any, where: str, add: Callable[[str, str], None]) -> None:
    _load_schedulers()
    kind = (stage.scheduler or {}).get("kind")
    if kind not in _SCHEDULERS:
        known = ", ".join(sorted(_SCHEDULERS)) or "none is installed"
        add(where, f"unknown scheduler kind {kind!r} (registered kinds: {known})")
        return
    _SCHEDULERS[kind][0](stage, where, add)


def scheduler_factory(stage: Any) -> Callable[..., Scheduler] | None:
    if stage.scheduler is None:
        return None
    _load_schedulers()
    return _SCHEDULERS[stage.scheduler["kind"]][1]


def register_report(fn: Callable[[Any, dict[str, Any]], Any]) -> None:
    """Call ``fn(experiment, status)`` whenever an experiment ends."""
    if fn not in _REPORTS:
        _REPORTS.append(fn)


def call_reports(experiment: Any, status: dict[str, Any]) -> None:
    for fn in list(_REPORTS):
        try:
            fn(experiment, status)
        except Exception:
            print(f"flame: report {getattr(fn, '__name__', fn)} failed:", file=sys.stderr)
            traceback.print_exc()
