"""The state of a scheduled stage: trials climbing the rungs of their brackets. No files, no processes.

A ``Ladder`` hands out ``Work`` (a trunk trained to its next rung, or a cool-down fork at a rung) and is
told each one's result; it applies the rules of ``rules.py`` and appends every rung decision to
``decisions`` in the format of ``<stage>/decisions.jsonl``. The same sequence of results gives the same
work and the same decisions, so a driver that was killed rebuilds it by replaying the run folders, and
the benchmark drives it with recorded metrics. ASHA's choices depend on the order results came in: they
are ``actions`` (``("start", trial)`` / ``("promote", trial, rung)``) that the caller logs and gives back
(``replay``) when it rebuilds the ladder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flame.experiments.schedulers.rules import Bracket, Settings, asha_choice, brackets, promote, ranked


@dataclass(frozen=True)
class Work:
    trial: str
    bracket: int  # index into Ladder.brackets
    rung: int
    cooldown: bool = False  # a cool-down fork at the rung (else the trunk trained up to it)

    @property
    def key(self) -> str:
        return f"{self.trial}@rung{self.rung}" + ("-cooldown" if self.cooldown else "")


@dataclass
class Ladder:
    settings: Settings
    mode: str  # min | max
    pool_size: int  # configurations the stage may draw
    take: Callable[[int], list[str] | None]  # the next n trial ids (None: cannot be asked yet)
    rung_steps: Callable[[int, int], int]  # (bracket, rung) -> training.steps of the trunk there
    cooldown_steps: Callable[[int], int]  # rung steps -> steps of its cool-down fork
    per_step: float = 1.0  # resource units of one step (tokens per step; 1 for steps)
    budget: float | None = None  # resource units left for this stage (None: no limit)
    sequential: bool = False  # Hyperband with an adaptive sampler: a bracket starts when the one before ended
    brackets: list[Bracket] = field(init=False)
    members: list[list[str]] = field(init=False)
    results: list[list[dict[str, float | None]]] = field(init=False)  # [bracket][rung] {trial: metric}
    promoted: list[list[set[str]]] = field(init=False)
    decided: list[list[bool]] = field(init=False)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    actions: list[tuple] = field(default_factory=list)  # ASHA's choices, in order
    spent: float = 0.0  # resource units handed out (trunk segments and cool-downs)
    budget_hit: bool = False
    where: dict[str, tuple[int, int]] = field(default_factory=dict)  # trial -> (bracket, rung) it is at
    failed: set[str] = field(default_factory=set)
    queue: list[Work] = field(default_factory=list)
    out: dict[str, Work] = field(default_factory=dict)  # handed out, not finished
    exhausted: bool = False
    live: bool = True  # may take new ASHA choices (False: replay what was taken only)
    cooldown_at: list[list[int]] = field(init=False)  # fork steps per rung, for the decision lines

    def __post_init__(self) -> None:
        self.brackets = brackets(self.settings, self.pool_size)
        n = len(self.brackets)
        self.members = [[] for _ in range(n)]
        self.results = [[{} for _ in b.rungs] for b in self.brackets]
        self.promoted = [[set() for _ in b.rungs] for b in self.brackets]
        self.decided = [[False for _ in b.rungs] for b in self.brackets]
        self.cooldown_at = [[0 for _ in b.rungs] for b in self.brackets]
        self.started = 0  # brackets started (SHA, Hyperband)
        self.replayed: list[tuple] = []

    @property
    def asha(self) -> bool:
        return self.settings.kind == "asha"

    def top(self, b: int) -> int:
        return len(self.brackets[b].rungs) - 1

    # ---- cost ----------------------------------------------------------------------------------

    def cost(self, work: Work) -> float:
        steps = self.rung_steps(work.bracket, work.rung)
        if work.cooldown:
            return self.cooldown_steps(steps) * self.per_step
        before = self.rung_steps(work.bracket, work.rung - 1) if work.rung else 0
        return (steps - before) * self.per_step

    def _affordable(self) -> bool:
        if self.budget is not None and self.spent >= self.budget:
            self.budget_hit = True
            return False
        return True

    # ---- handing out ---------------------------------------------------------------------------

    def _start_bracket(self) -> bool:
        b = self.started
        if b >= len(self.brackets):
            return False
        ids = self.take(self.brackets[b].rungs[0].trials)
        if ids is None:
            return False
        self.started += 1
        self.members[b] = list(ids)
        for t in ids:
            self.where[t] = (b, 0)
            self.queue.append(Work(t, b, 0))
        return True

    def apply(self, action: tuple) -> None:
        """Carry out an ASHA action (a live choice, or one replayed from the log)."""
        self.actions.append(action)
        if action[0] == "start":
            trial = action[1]
            self.members[0].append(trial)
            self.where[trial] = (0, 0)
            self.queue.append(Work(trial, 0, 0))
            return
        trial, k = action[1], action[2]
        self.promoted[0][k].add(trial)
        results = action[3] if len(action) > 3 else dict(self.results[0][k])  # the rung as it was then
        self.decisions.append(self._decision(0, k, results, [trial], []))
        self.where[trial] = (0, k + 1)
        self.queue.append(Work(trial, 0, k + 1))

    def _asha_next(self) -> tuple | None:
        if self.replayed:
            return self.replayed.pop(0)
        if not self.live:
            self.exhausted = self.exhausted or len(self.members[0]) >= self.pool_size
            return None
        choice = asha_choice(self.results[0], self.promoted[0], self.settings.eta, self.mode)
        if choice is not None:
            return ("promote", choice[1], choice[0], dict(self.results[0][choice[0]]))
        if self.exhausted or len(self.members[0]) >= self.pool_size:
            self.exhausted = True
            return None
        ids = self.take(1)
        if not ids:
            self.exhausted = ids is not None
            return None
        return ("start", ids[0])

    def replay(self, actions: list[tuple]) -> None:
        """Actions an earlier process took (ASHA): taken again first, in order, whatever the results."""
        self.replayed = list(actions)

    def _hand(self, work: Work) -> Work:
        self.spent += self.cost(work)
        if work.cooldown:
            self.cooldown_at[work.bracket][work.rung] += self.cooldown_steps(self.rung_steps(work.bracket, work.rung))
        self.out[work.key] = work
        return work

    def _bracket_done(self, b: int) -> bool:
        busy = any(w.bracket == b for w in [*self.queue, *self.out.values()])
        return not busy and all(self.decided[b][k] or not self._reached(b, k) for k in range(self.top(b)))

    def ready(self, free: int | None = None) -> list[Work]:
        """Work that may start now; ``free`` workers (ASHA decides one piece per free worker; None: any)."""
        if not self.asha:
            while self.started < len(self.brackets) and self._affordable():
                if self.sequential and self.started and not self._bracket_done(self.started - 1):
                    break
                if not self._start_bracket():
                    break
        else:
            while self.replayed:  # taken before: hand them out again, whatever the workers
                action = self._asha_next()
                assert action is not None
                self.apply(action)
        items: list[Work] = []
        while self.queue and (free is None or len(items) < free) and self._affordable():
            items.append(self._hand(self.queue.pop(0)))
        while self.asha and not self.queue and (free is None or len(items) < free) and self._affordable():
            action = self._asha_next()
            if action is None:
                break
            self.apply(action)
            items.append(self._hand(self.queue.pop(0)))
        return items

    # ---- results ---------------------------------------------------------------------------------

    def finished(self, work: Work, ok: bool, metric: float | None = None) -> None:
        """``work`` ended: ``ok`` with the rung metric (a trunk under ``rung_metric = "stable"``, at the top
        rung, or a cool-down fork), or not (failed, diverged: never promoted)."""
        self.out.pop(work.key, None)
        b, k = work.bracket, work.rung
        if not ok:
            self.failed.add(work.trial)
            self._result(b, k, work.trial, None)
            return
        if not work.cooldown and self.settings.rung_metric == "cooldown" and k < self.top(b):
            self.queue.insert(0, Work(work.trial, b, k, cooldown=True))
            return
        self._result(b, k, work.trial, metric)

    def _result(self, b: int, k: int, trial: str, metric: float | None) -> None:
        self.results[b][k][trial] = metric
        if self.asha:
            return
        entered = self.members[b] if k == 0 else sorted(self.promoted[b][k - 1])
        if len(self.results[b][k]) == len(entered) and k < self.top(b) and not self.decided[b][k]:
            self.decided[b][k] = True
            promoted, stopped = promote(self.results[b][k], self.settings.eta, self.mode)
            self.promoted[b][k] = set(promoted)
            self.decisions.append(self._decision(b, k, self.results[b][k], promoted, stopped))
            for t in promoted:
                self.where[t] = (b, k + 1)
                self.queue.append(Work(t, b, k + 1))

    def _decision(self, b: int, k: int, results: dict, promoted: list[str], stopped: list[str]) -> dict[str, Any]:
        d: dict[str, Any] = {"rung": k, "resource": self.brackets[b].rungs[k].resource}
        if self.settings.kind == "hyperband":
            d["bracket"] = self.brackets[b].s
        d["competitors"] = {t: results[t] for t in ranked(results, self.mode)}
        d["promoted"], d["stopped"] = list(promoted), list(stopped)
        d["steps"] = self.rung_steps(b, k)
        if self.settings.rung_metric == "cooldown" and not self.asha:
            d["cooldown_steps"] = self.cooldown_at[b][k]
        elif self.asha and self.settings.rung_metric == "cooldown":
            d["cooldown_steps"] = 0  # ASHA's fork steps go on its closing lines (one per rung)
        return d

    def done(self) -> bool:
        if self.out or (self.queue and not self.budget_hit):
            return False
        if self.budget_hit:
            return not self.out
        if self.asha:
            return (
                self.exhausted and asha_choice(self.results[0], self.promoted[0], self.settings.eta, self.mode) is None
            )
        return self.started >= len(self.brackets) and all(
            self.decided[b][k] or not self._reached(b, k) for b in range(len(self.brackets)) for k in range(self.top(b))
        )

    def _reached(self, b: int, k: int) -> bool:
        return bool(self.members[b] if k == 0 else self.promoted[b][k - 1])

    def closing(self) -> list[dict[str, Any]]:
        """ASHA's last lines once done: per rung below the top, who was never promoted (stopped there)."""
        if not self.asha:
            return []
        lines = []
        for k in range(self.top(0)):
            results = self.results[0][k]
            stopped = [t for t in ranked(results, self.mode) if t not in self.promoted[0][k]]
            line = self._decision(0, k, results, [], stopped)
            if self.settings.rung_metric == "cooldown":
                line["cooldown_steps"] = self.cooldown_at[0][k]
            lines.append(line)
        return lines

    # ---- what the stage shows ------------------------------------------------------------------

    def rung_of(self, trial: str) -> int | None:
        """The highest rung a trial has a result at (or is working towards)."""
        at = self.where.get(trial)
        return at[1] if at else None

    def stopped(self, trial: str) -> bool:
        """Whether the trial will not go on: failed, or passed over at its rung by a decision."""
        at = self.where.get(trial)
        if at is None:
            return False
        b, k = at
        if trial in self.failed:
            return True
        if k == self.top(b):
            return False
        decided = self.decided[b][k] or (self.asha and self.done())
        return decided and trial in self.results[b][k] and trial not in self.promoted[b][k]

    def final(self) -> list[tuple[str, float | None, int]]:
        """(trial, metric, rung) of every trial with a result, best first: the highest rung first, then the
        metric (failed and NaN last)."""
        best: dict[str, tuple[int, float | None]] = {}
        for b, rungs in enumerate(self.results):
            for k, results in enumerate(rungs):
                level = self.brackets[b].rungs[k].resource
                for t, m in results.items():
                    if t not in best or level >= best[t][0]:
                        best[t] = (level, m)  # type: ignore[assignment]
        keys = sorted(best, key=lambda t: (-best[t][0], *ranked_key(best[t][1], self.mode, t)))
        return [(t, best[t][1], self.rung_of(t) or 0) for t in keys]


def ranked_key(metric: float | None, mode: str, name: str) -> tuple:
    from flame.experiments.schedulers.rules import sort_key

    return sort_key(metric, mode, name)
