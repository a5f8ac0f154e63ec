"""The experiment loop: stage by stage, a loop over the work items of the stage's scheduler.

``walk`` goes through the stages in order; a stage expands once the stages it links to are complete,
its scheduler hands out work items, and what happens to them depends on the mode:

* ``readonly`` (plan, status): nothing runs; finished trials are read from their folders.
* ``local``: the local launcher runs them, ``max_parallel`` at a time, and the loop waits for each to end.
* ``collect`` (the Slurm controller): the items that must run are returned, to be submitted as an array.

Every mode rebuilds the same state from the spec, the records and the run folders, so a resumed driver
(or the next controller job) skips finished trials, reruns interrupted ones (they resume from their
checkpoints) and asks a search exactly what an uninterrupted driver would have.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from flame.config.errors import ConfigError
from flame.experiments.hooks import WorkItem
from flame.experiments.plan import ExperimentError, StageExpansion, StageView, Waiting, survivors, validate_trials
from flame.experiments.records import Records
from flame.experiments.schedule import FINAL, StageContext, make_scheduler
from flame.experiments.spec import Experiment, Stage
from flame.experiments.trial import Outcome, log_tail


@dataclass
class StageState:
    stage: Stage
    waiting: list[str] = field(default_factory=list)  # stages it links to that are not complete
    scheduler: Any = None
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    view: StageView | None = None  # set when the stage is complete
    to_launch: list[WorkItem] = field(default_factory=list)


class Interrupted(Exception):
    """The driver was asked to stop (SIGTERM, SIGINT): running trials saved and stopped."""


def walk(
    exp: Experiment,
    records: Records,
    mode: str,
    launcher: Any = None,
    retry_failed: bool = False,
    device_type: str | None = None,
) -> list[StageState]:
    """Go through the stages as far as ``mode`` allows (see the module docstring)."""
    from flame.experiments.plan import check_device

    device_type = device_type or check_device(exp)
    views: dict[str, StageView] = {}
    states: list[StageState] = []
    for stage in exp.stages:
        state = StageState(stage)
        states.append(state)
        try:
            expansion = StageExpansion(exp, stage, views)
        except Waiting as w:
            state.waiting = w.stages
            continue
        metric, direction = exp.metric_of(stage)
        ctx = StageContext(exp, stage, expansion, records, metric, direction, record=mode != "readonly")
        state.scheduler = make_scheduler(ctx)
        _run_stage(ctx, state, mode, launcher, retry_failed, device_type)
        if state.scheduler.done():
            # A trial scheduler says which trials went to the end (the others stopped at a rung).
            final = getattr(state.scheduler, "final_outcomes", None)
            outs = final() if final is not None else list(state.outcomes.values())
            view = StageView(stage, outs, survivors(stage, outs, direction))
            state.view = views[stage.name] = view
            if mode != "readonly" and not any(
                e["event"] == "stage"
                and e["stage"] == stage.name
                and e["survivors"] == [o.trial.id for o in view.survivors]
                for e in records.events
            ):
                records.append("stage", stage=stage.name, survivors=[o.trial.id for o in view.survivors])
        elif mode == "local":
            raise ExperimentError(f"stage {stage.name!r} did not finish")
    return states


def _run_stage(
    ctx: StageContext, state: StageState, mode: str, launcher: Any, retry_failed: bool, device_type: str
) -> None:
    sched = state.scheduler
    records = ctx.records
    queue: deque[WorkItem] = deque()
    retried: set[str] = set()
    while True:
        items = sched.ready()
        validate_trials(ctx.exp, [i.trial for i in items], device_type)
        observed = 0
        for item in items:
            outcome = ctx.outcome(item.trial)
            if outcome.status == "failed" and retry_failed and item.key not in retried:
                retried.add(item.key)
                queue.append(item)
                continue
            if outcome.status in FINAL:
                _observe(ctx, item, outcome, records, mode)
                state.outcomes[item.trial.id] = outcome
                sched.finished(item, outcome)
                observed += 1
                continue
            queue.append(item)
        if mode != "local":
            if observed:  # finished work may let the scheduler hand out more (a next round or rung): replay on
                continue
            state.to_launch = list(queue)
            return
        _check_failures(ctx, state, launcher)
        while queue and launcher.can_start(queue[0]):
            launcher.start(queue.popleft())
        if not launcher.running:
            if queue:
                raise ExperimentError(launcher.why_not(queue[0]))
            if sched.done():
                return
            if not items:
                raise ExperimentError(f"stage {ctx.stage.name!r}: its scheduler has nothing to run and is not done")
            continue
        for item, outcome in launcher.wait():
            state.outcomes[item.trial.id] = outcome
            sched.finished(item, outcome)
        if launcher.stopping:
            launcher.stop_all()
            raise Interrupted()


def _observe(ctx: StageContext, item: WorkItem, outcome: Outcome, records: Records, mode: str) -> None:
    """Record the end of a trial that finished while no driver watched (a Slurm task, an earlier driver)."""
    if mode == "readonly":
        return
    end = records.last("end", ctx.stage.name, item.key)
    launch = records.last("launch", ctx.stage.name, item.key)
    if end is None or (launch is not None and launch["time"] > end["time"]):
        records.append(
            "end",
            stage=ctx.stage.name,
            trial=item.key,
            code=outcome.exit_code,
            status=outcome.status,
            metric=outcome.metric,
            tail=log_tail(item.trial) if outcome.status == "failed" else "",
        )


def _check_failures(ctx: StageContext, state: StageState, launcher: Any) -> None:
    failed = [o for o in state.outcomes.values() if o.status == "failed"]
    limit = ctx.stage.max_failures
    if limit is not None and len(failed) > limit:
        launcher.stop_all()
        last = failed[-1]
        tail = log_tail(last.trial, 3).strip().splitlines()
        raise ExperimentError(
            f"stage {ctx.stage.name!r}: {len(failed)} trials failed, more than max_failures = {limit}; stopping. "
            f"Last: {last.trial.id} (exit code {last.exit_code}) in {last.trial.folder}"
            + (f": {tail[-1]}" if tail else "")
        )


def precheck(exp: Experiment) -> list[StageState]:
    """The checks of ``run`` before any work: every trial that can be expanded now, validated like training."""
    records = Records(exp.root, writable=False)
    try:
        return walk(exp, records, "readonly")
    except ExperimentError as e:
        raise ConfigError(str(e)) from None


def describe_failures(states: list[StageState]) -> list[str]:
    lines = []
    for state in states:
        for o in state.outcomes.values():
            if o.status == "failed":
                lines.append(
                    f"{state.stage.name}/{o.trial.id}: exit code {o.exit_code}; log {os.path.join(o.trial.folder, 'train.log')}"
                )
    return lines
