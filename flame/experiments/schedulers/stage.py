"""The scheduler of a stage with ``scheduler = { kind = "sha" | "hyperband" | "asha", ... }``.

``RungScheduler`` turns the stage's trials (its grid points, or points its search asks) into trunks and
cool-down forks (``trunks.py``) climbing the rungs of a ``Ladder``. It is rebuilt whenever a driver, a
status or a Slurm controller walks the experiment: the run folders say which work finished (the
driver's loop feeds them back in order), the records hold the asks of an adaptive search, and ASHA's
choices are the claim files ``<root>/<stage>/claims/NNNNNN.json`` (written by the local driver, or on
Slurm by the array tasks working as ASHA's workers, under ``claims.lock``). Decisions go to
``<root>/<stage>/decisions.jsonl``, appended only by the driver or the controller job (one writer): the
same history gives the same lines, so a rebuilt scheduler appends only the ones that are new.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from typing import Any

from flame.config.errors import ConfigError
from flame.experiments.hooks import WorkItem
from flame.experiments.schedulers import trunks
from flame.experiments.schedulers.files import jsonable, read_claims, read_lines, write_claim
from flame.experiments.schedulers.ladder import Ladder, Work
from flame.experiments.schedulers.rules import Settings, check_table
from flame.experiments.search import derived_seed
from flame.experiments.trial import Outcome, Trial

DECISIONS = "decisions.jsonl"


@dataclass
class RungItem(WorkItem):
    work: Work | None = None

    @property
    def array(self) -> str:
        """The Slurm array it belongs to: one per (bracket, rung), cool-down forks apart."""
        w = self.work
        assert w is not None
        return f"b{w.bracket}-r{w.rung}" + ("-cooldown" if w.cooldown else "")


class RungScheduler:
    live = True  # may take new decisions (False: a Slurm controller or a status replays only)
    worker: str | None = None  # who takes ASHA's choices here (a Slurm worker task; else this process)

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        exp, stage = ctx.exp, ctx.stage
        self.where = f"{exp.source}: [[stage]] {stage.name!r}"
        errors: list[str] = []
        settings = check_table(stage.scheduler, f"{self.where} scheduler", lambda w, m: errors.append(f"{w}: {m}"))
        if settings is None:
            raise ConfigError(errors)
        self.settings: Settings = settings
        self.folder = os.path.join(exp.root, stage.name)
        self.claims_folder = os.path.join(self.folder, "claims")
        self.workers = settings.kind == "asha" and exp.launcher == "slurm"  # array tasks are ASHA's workers
        self.live = ctx.record and not self.workers
        groups = ctx.expansion.groups
        self.group = groups[0]
        self.adaptive = any(g.dists for g in groups) and self.group.search.kind not in ("grid", "random")
        self.pool: list[Trial] = []
        self.by_id: dict[str, Trial] = {}
        self.asked: list[dict[str, Any]] = []
        self._prepare_pool(groups)
        first = self.pool[0] if self.pool else self._resolve({})
        self.per_step = trunks.tokens_per_step(first) if settings.resource == "tokens" else 1
        per = trunks.tokens_per_step(first)
        self.max_steps = trunks.to_steps(settings, settings.max, per)
        self.ladder = Ladder(
            settings,
            ctx.mode,
            self.pool_size,
            self._take,
            self._rung_steps,
            lambda steps: trunks.cooldown_steps(steps, settings.cooldown_ratio),
            per_step=self.per_step,
            budget=self._budget_left(),
            sequential=self.adaptive and settings.kind == "hyperband",
        )
        rungs = sorted(
            {self._rung_steps(b, k) for b, br in enumerate(self.ladder.brackets) for k in range(len(br.rungs))}
        )
        self.rungs = rungs
        if rungs and self.max_steps < 1:
            rungs = [0]
        for trial in self.pool or [first]:
            trunks.check_trial(trial, settings, rungs or [self.max_steps], self.max_steps, ctx.metric, self.where)
        self.written = len(read_lines(os.path.join(self.folder, DECISIONS)))
        self.claims = read_claims(self.claims_folder) if settings.kind == "asha" else []
        actions = []
        for c in self.claims:
            if c.get("action"):
                a = c["action"]
                if a[0] == "start" and a[1] not in self.by_id:
                    self._register(self._resolve(a[2]), a[2])
                actions.append(("start", a[1]) if a[0] == "start" else (a[0], a[1], a[2], a[3]))
        self.ladder.replay(actions)
        if not self.adaptive:  # the configurations ASHA started are the first of the pool's order
            self.next = sum(a[0] == "start" for a in actions)
        self.logged = len(actions)
        self.outcomes_: dict[str, Outcome] = {}
        self.released: set[str] = set()

    # ---- the pool of configurations --------------------------------------------------------------

    def _resolve(self, searched: dict[str, Any]) -> Trial:
        return self.ctx.expansion.resolve(self.group, searched)

    def _register(self, trial: Trial, params: dict[str, Any] | None = None) -> None:
        if trial.id not in self.by_id:
            self.by_id[trial.id] = trial
            if params is not None:
                self.asked.append(params)

    def _prepare_pool(self, groups: list) -> None:
        exp, stage = self.ctx.exp, self.ctx.stage
        if self.adaptive:
            if len(groups) > 1 or len(self.group.grid) > 1:
                raise ConfigError(
                    f"{self.where} scheduler: search {self.group.search.kind!r} with a scheduler takes a space of "
                    "sampled keys only (no grid axes, contenders or fanned-out links)"
                )
            self.pool_size = self.group.search.samples or 0
            return
        trials: list[Trial] = []
        for group in groups:
            asks = self.ctx.asks(group, 0, []) if group.dists else [{}]
            trials += self.ctx.expansion.trials(group, 0, asks or [])
        if self.settings.kind != "sha":  # Hyperband and ASHA draw configurations in a seeded random order
            seed = derived_seed((stage.search.seed if stage.search else 0), stage.name, "scheduler")
            random.Random(seed).shuffle(trials)
        for t in trials:
            self._register(t)
        self.pool = trials
        self.pool_size = len(trials)
        self.next = 0
        del exp

    def _history(self) -> list[tuple[dict[str, Any], float | None]]:
        out = []
        for params in self.asked:
            trial = self._resolve(params)
            level = None
            for rungs in self.ladder.results:
                for results in rungs:
                    if trial.id in results:
                        level = results[trial.id]
            if level is not None or trial.id in self.ladder.failed:
                out.append((params, level))
        return out

    def _take(self, n: int) -> list[str] | None:
        if not self.adaptive:
            ids = [t.id for t in self.pool[self.next : self.next + n]]
            self.next += len(ids)
            return ids
        from flame.experiments.search import ask_round

        round_index = len(self.asked)
        n = min(n, self.pool_size - len(self.asked))
        if n <= 0:
            return []
        recorded = self.ctx.records.asks(self.ctx.stage.name, self.group.key, round_index)
        if recorded is None:
            if not self.live:
                return None
            recorded = ask_round(
                self.group.search, self.group.dists, self.group.key, round_index, self._history(), n, self.ctx.mode
            )
            if self.settings.kind != "asha":
                self.ctx.records.append(
                    "ask", stage=self.ctx.stage.name, group=self.group.key, round=round_index, asks=recorded
                )
        ids = []
        for params in recorded:
            trial = self._resolve(params)
            trunks.check_trial(trial, self.settings, self.rungs, self.max_steps, self.ctx.metric, self.where)
            self._register(trial, params)
            ids.append(trial.id)
        return ids

    def _rung_steps(self, b: int, k: int) -> int:
        if k < 0:
            return 0
        per = self.per_step if self.settings.resource == "tokens" else 1
        return trunks.to_steps(self.settings, self.ladder.brackets[b].rungs[k].resource, int(per))

    def _budget_left(self) -> float | None:
        budget = self.ctx.exp.budget
        if budget is None:
            return None
        spent = 0.0
        for stage in self.ctx.exp.stages:
            if stage.name == self.ctx.stage.name:
                break
            for line in read_lines(os.path.join(self.ctx.exp.root, stage.name, DECISIONS)):
                if line.get("end"):
                    spent += float(line.get("spent", 0))
        return float(budget) - spent

    def describe(self) -> dict[str, Any]:
        """What ``plan --json`` shows: every bracket's (trials, resource) per rung, in the resource's unit.
        Hyperband's brackets are the formula's (the paper's table); the stage runs them filled from its pool."""
        from flame.experiments.schedulers.rules import hyperband

        shown = hyperband(self.settings) if self.settings.kind == "hyperband" else self.ladder.brackets
        return {
            "kind": self.settings.kind,
            "brackets": [b.as_dict() for b in shown],
            "unit": self.settings.resource,
            "pool": self.pool_size,
            "drawn": sum(b.rungs[0].trials for b in self.ladder.brackets),  # what this stage runs of the pool
            "rung_metric": self.settings.rung_metric,
            "steps": self.rungs,
        }

    # ---- the Scheduler protocol ------------------------------------------------------------------

    def _item(self, work: Work) -> RungItem:
        base = self.by_id[work.trial]
        keep = [self._rung_steps(work.bracket, k) for k in range(len(self.ladder.brackets[work.bracket].rungs))]
        trial = trunks.trunk(base, self._rung_steps(work.bracket, work.rung), self.max_steps, keep)
        if work.cooldown:
            trial = trunks.cooldown(trial, self.settings.cooldown_ratio)
        return RungItem(trial, work.key, work)

    def ready(self, free: int | None = None) -> list[WorkItem]:
        if self.settings.kind == "asha" and free is None and self.live:
            free = max(self.ctx.exp.max_parallel - len(self.ladder.out), 0)
        self.ladder.live = self.live  # type: ignore[attr-defined]
        works = self.ladder.ready(free)
        for action in self.ladder.actions[self.logged :]:
            self._log(action, None)
        self.logged = len(self.ladder.actions)
        self._write()
        return [self._item(w) for w in works]

    def _log(self, action: tuple, worker: str | None) -> None:
        """An ASHA choice made here, as a claim file (the log a rebuilt scheduler replays)."""
        if action[0] == "start":
            params = self.asked[-1] if self.adaptive else self.by_id[action[1]].params
            entry: list[Any] = ["start", action[1], params]
        else:
            entry = list(action)
        key = f"{action[1]}@rung{0 if action[0] == 'start' else action[2] + 1}"
        who = worker or self.worker or f"pid {os.getpid()}"
        write_claim(self.claims_folder, {"key": key, "action": entry, "worker": who})

    def finished(self, item: WorkItem, outcome: Outcome) -> None:
        if outcome.status not in ("done", "failed"):
            self.ladder.queue.insert(0, self.ladder.out.pop(item.key))  # preempted: handed out again
            self.ladder.spent -= self.ladder.cost(item.work)  # type: ignore[attr-defined, arg-type]
            return
        work: Work = item.work  # type: ignore[attr-defined]
        metric = outcome.metric
        if outcome.status == "done" and not work.cooldown:
            at = trunks.metric_at(item.trial.folder, self.ctx.metric, item.trial.steps)
            metric = at if at is not None else metric
        ok = outcome.status == "done" and metric is not None
        self.ladder.finished(work, ok, trunks.finite_or_nan(metric))
        if not work.cooldown:
            self.outcomes_[work.trial] = outcome
        self._write()

    def done(self) -> bool:
        return self.ladder.done()

    def lines(self) -> list[dict[str, Any]]:
        lines = list(self.ladder.decisions)
        if self.ladder.done():
            lines += self.ladder.closing()
            end = {"end": True, "spent": self.ladder.spent, "unit": self.settings.resource}
            budget = self.ctx.exp.budget
            if budget is not None:
                end["budget"] = budget
                end["budget_hit"] = self.ladder.budget_hit
            lines.append(end)
        return lines

    def _release(self) -> None:
        """Rung checkpoints of trials that will not go on (stopped, failed, or at their top rung) are
        released: ``keep_latest_k`` applies to them again (the newest complete one stays)."""
        from flame.components.fork import release_kept_steps

        for trial_id, (b, k) in self.ladder.where.items():
            if trial_id in self.released or any(
                w.trial == trial_id for w in [*self.ladder.out.values(), *self.ladder.queue]
            ):
                continue
            at_top = k == self.ladder.top(b) and trial_id in self.ladder.results[b][k]
            if at_top or self.ladder.stopped(trial_id):
                self.released.add(trial_id)
                trial = self.by_id[trial_id]
                assert trial.config is not None
                release_kept_steps(trial.folder, trial.config.checkpoint.folder, trial.config.checkpoint.keep_latest_k)

    def _write(self) -> None:
        if not self.ctx.record:
            return
        self._release()
        lines = self.lines()
        if len(lines) <= self.written:
            return
        os.makedirs(self.folder, exist_ok=True)
        with open(os.path.join(self.folder, DECISIONS), "a") as f:
            for line in lines[self.written :]:
                f.write(json.dumps(jsonable(line)) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.written = len(lines)

    def trials(self) -> list[Trial]:
        out = []
        for trial_id, (b, k) in self.ladder.where.items():
            keep = [self._rung_steps(b, i) for i in range(len(self.ladder.brackets[b].rungs))]
            out.append(trunks.trunk(self.by_id[trial_id], self._rung_steps(b, k), self.max_steps, keep))
        return out

    def row(self, trial_id: str) -> dict[str, Any]:
        """What the status shows of a trial besides its folder: its rung, stopped or not, its steps."""
        at = self.ladder.where.get(trial_id)
        if at is None:
            return {}
        b, k = at
        extra: dict[str, Any] = {"rung": k, "steps": self.max_steps}
        if self.settings.kind == "hyperband":
            extra["bracket"] = self.ladder.brackets[b].s
        if trial_id in self.ladder.failed:
            extra["status"] = "failed"
        elif self.ladder.stopped(trial_id):
            extra["status"] = "stopped"
        return extra

    def final_outcomes(self) -> list[Outcome]:
        """The stage's trials as later stages see them: the trials at the highest rung reached are done
        (ranked by their metric there); the others stopped, failed ones failed."""
        final = self.ladder.final()
        levels = {t: self._level(t) for t, _, _ in final}
        best = max((levels[t] for t, m, _ in final if m is not None and math.isfinite(m)), default=None)
        out = []
        for t, metric, _ in final:
            trial = next(x for x in self.trials() if x.id == t)
            if t in self.ladder.failed:
                status = "failed"
            else:
                status = "done" if levels[t] == best else "stopped"
            o = self.outcomes_.get(t)
            out.append(
                Outcome(trial, status, metric, o.step if o else 0, o.summary if o else {}, o.exit_code if o else None)
            )
        return out

    def _level(self, trial_id: str) -> int:
        """Steps of the highest rung the trial has a result at."""
        level = 0
        for b, rungs in enumerate(self.ladder.results):
            for k, results in enumerate(rungs):
                if trial_id in results:
                    level = max(level, self._rung_steps(b, k))
        return level
