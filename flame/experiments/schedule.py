"""The default trial scheduler of a stage: every trial once, a search asked round by round.

``RunOnce`` hands out every trial of a grid or random stage at once (the launcher runs ``max_parallel``
of them at a time). For Optuna's adaptive samplers it asks a group's next round only when every trial of
the round before has finished, telling the sampler each ask's metric (the mean over the ask's grid
points, e.g. seeds; failed when none finished). A preempted or interrupted trial is handed out again.
The scheduler is rebuilt from the records and the run folders whenever a driver or controller starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from flame.experiments.hooks import WorkItem, scheduler_factory
from flame.experiments.plan import Group, StageExpansion
from flame.experiments.records import Records
from flame.experiments.search import ask_round, write_journal
from flame.experiments.spec import Experiment, Stage
from flame.experiments.trial import Outcome, Trial, inspect

FINAL = ("done", "failed")


@dataclass
class StageContext:
    """What a scheduler may use: the stage, its expansion into trials, the records, the metric."""

    exp: Experiment
    stage: Stage
    expansion: StageExpansion
    records: Records
    metric: str
    mode: str
    record: bool  # True for the driver / controller (records asks), False for plan and status

    def asks(
        self, group: Group, round_index: int, history: list[tuple[dict[str, Any], float | None]] | None
    ) -> list[dict[str, Any]] | None:
        """The sampled points of a round: recorded ones, else asked now (and recorded); None when the
        round cannot be asked yet (its history is not complete)."""
        if not group.dists:
            return [{}]
        recorded = self.records.asks(self.stage.name, group.key, round_index)
        if recorded is not None:
            return recorded
        if history is None:
            return None
        count = self.expansion.asks_in_round(group, round_index)
        asks = ask_round(group.search, group.dists, group.key, round_index, history, count, self.mode)
        if self.record:
            self.records.append("ask", stage=self.stage.name, group=group.key, round=round_index, asks=asks)
        return asks

    def outcome(self, trial: Trial) -> Outcome:
        return inspect(trial, self.metric)


class RunOnce:
    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        self.known: dict[str, Trial] = {}
        self.outcomes: dict[str, Outcome] = {}
        self.queue: list[WorkItem] = []
        self.rounds: dict[str, list[list[dict[str, Any]]]] = {g.key: [] for g in ctx.expansion.groups}
        self.blocked = False  # a round waits for results (plan and status only)
        for group in ctx.expansion.groups:
            self._next_round(group)

    def _history(self, group: Group) -> list[tuple[dict[str, Any], float | None]] | None:
        history = []
        width = len(group.grid)
        for r, asks in enumerate(self.rounds[group.key]):
            trials = group.trials[r]
            for i, ask in enumerate(asks):
                outcomes = [self.outcomes.get(t.id) for t in trials[i * width : (i + 1) * width]]
                if any(o is None or o.status not in FINAL for o in outcomes):
                    return None
                values = [o.metric for o in outcomes if o is not None and o.ok]
                history.append((ask, sum(values) / len(values) if values else None))  # type: ignore[arg-type]
        return history

    def _next_round(self, group: Group) -> None:
        r = len(self.rounds[group.key])
        if r >= self.ctx.expansion.num_rounds(group):
            return
        asks = self.ctx.asks(group, r, self._history(group) if r else [])
        if asks is None:
            self.blocked = True
            return
        self.rounds[group.key].append(asks)
        for trial in self.ctx.expansion.trials(group, r, asks):
            if trial.id not in self.known:
                self.known[trial.id] = trial
                self.queue.append(WorkItem(trial, trial.id))
        if self._round_finished(group):
            self._next_round(group)

    def _round_finished(self, group: Group) -> bool:
        r = len(self.rounds[group.key]) - 1
        return all(t.id in self.outcomes and self.outcomes[t.id].status in FINAL for t in group.trials.get(r, []))

    def ready(self) -> list[WorkItem]:
        items, self.queue = self.queue, []
        return items

    def finished(self, item: WorkItem, outcome: Outcome) -> None:
        if outcome.status not in FINAL:  # interrupted: run it again (it resumes from its checkpoint)
            self.queue.append(item)
            return
        self.outcomes[item.trial.id] = outcome
        for group in self.ctx.expansion.groups:
            if group.dists and any(item.trial in ts for ts in group.trials.values()) and self._round_finished(group):
                self._write_journal(group)
                self._next_round(group)

    def _write_journal(self, group: Group) -> None:
        history = self._history(group)
        if self.ctx.record and history:
            folder = os.path.join(self.ctx.exp.root, self.ctx.stage.name)
            os.makedirs(folder, exist_ok=True)
            index = [g.key for g in self.ctx.expansion.groups].index(group.key)
            name = "optuna.journal" if len(self.ctx.expansion.groups) == 1 else f"optuna-group{index}.journal"
            write_journal(os.path.join(folder, name), group.dists, history, self.ctx.mode)

    def done(self) -> bool:
        if self.queue or self.blocked:
            return False
        if any(t.id not in self.outcomes for t in self.known.values()):
            return False
        return all(len(self.rounds[g.key]) >= self.ctx.expansion.num_rounds(g) for g in self.ctx.expansion.groups)

    def trials(self) -> list[Trial]:
        return list(self.known.values())


def make_scheduler(ctx: StageContext):
    factory = scheduler_factory(ctx.stage)
    return factory(ctx) if factory is not None else RunOnce(ctx)
