"""What an experiment cost: steps, tokens, trial time and (on GPU) GPU-hours per stage and in total, and for
a stage with a trial scheduler what it saved against training every one of its trials to the maximum.

Steps are the steps each trial trained (its last step; a scheduled trunk's steps across its rungs), plus
the cool-down forks a scheduler records. Trial time is the sum of the trials' own wall times (all
attempts); elapsed is the stage's first launch to its last end, from records.jsonl. GPU-hours count
trial time x processes for trials whose metrics show a CUDA device.
"""

from __future__ import annotations

from dataclasses import dataclass

from flame.experiments.report.collect import StageData


@dataclass
class Cost:
    name: str
    trials: int
    steps: int
    tokens: float | None
    trial_seconds: float | None
    elapsed_seconds: float | None
    gpu_hours: float | None


@dataclass
class Saving:
    """A scheduled stage against its full budget: every trial to ``max_steps``."""

    stage: str
    trials: int
    max_steps: float
    steps: int  # trained, cool-downs included
    full_steps: float
    full_seconds: float | None  # the full budget's time at this stage's measured seconds per step

    @property
    def fraction(self) -> float:
        return self.steps / self.full_steps if self.full_steps else 0.0

    @property
    def saving(self) -> float:
        return 1.0 - self.fraction


def _sum(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def stage_cost(stage: StageData) -> Cost:
    started = [t for t in stage.trials if t.status not in ("pending", "planned") or t.step > 0]
    cooldown = sum(int(d.get("cooldown_steps", 0) or 0) for d in stage.decisions)
    return Cost(
        name=stage.name,
        trials=len(started),
        steps=sum(t.step for t in started) + cooldown,
        tokens=_sum([t.tokens for t in started]),
        trial_seconds=_sum([t.wall_seconds for t in started]),
        elapsed_seconds=stage.elapsed_seconds,
        gpu_hours=_sum([t.gpu_hours for t in started]),
    )


def total_cost(costs: list[Cost], elapsed: float | None) -> Cost:
    return Cost(
        name="total",
        trials=sum(c.trials for c in costs),
        steps=sum(c.steps for c in costs),
        tokens=_sum([c.tokens for c in costs]),
        trial_seconds=_sum([c.trial_seconds for c in costs]),
        elapsed_seconds=elapsed,
        gpu_hours=_sum([c.gpu_hours for c in costs]),
    )


def saving(stage: StageData, cost: Cost) -> Saving | None:
    """The scheduler's saving; None for a stage without a scheduler (or without a numeric ``max``)."""
    sched = stage.scheduler
    if not sched or not isinstance(sched.get("max"), (int, float)) or not stage.trials:
        return None
    max_steps = float(sched["max"])
    if sched.get("resource") == "tokens":  # convert with the stage's measured tokens per step
        per_step = [t.tokens / t.step for t in stage.trials if t.tokens and t.step]
        if not per_step:
            return None
        max_steps /= sum(per_step) / len(per_step)
    n = len(stage.trials)
    full = n * max_steps
    seconds = None
    if cost.trial_seconds and cost.steps:
        seconds = cost.trial_seconds / cost.steps * full
    return Saving(stage.name, n, max_steps, cost.steps, full, seconds)
